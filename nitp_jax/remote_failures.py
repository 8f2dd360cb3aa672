"""A gs:// request that failed for good, as one line that says what to do.

What gcsfs 2026.10.1 raises once a request has failed, checked against the
GCS emulator behind a proxy answering with these statuses
(tests/gcs_faults.py, tests/test_remote_failures.py):

  answer or event                 exception                        gcsfs retries it
  HTTP 500, 503, 504, 408, 429    gcsfs.retry.HttpError (.code)    6 tries, ~30 s of backoff
  HTTP 502                        requests.exceptions.ProxyError   yes
                                  (an OSError, without errno)
  HTTP 401                        HttpError, code 401              only "Invalid Credentials"
  HTTP 403                        OSError "Forbidden: <API path>   no
                                  \\n<message>" (two lines)
  connection dropped or refused   aiohttp.ClientError subclasses   yes
                                  (ServerDisconnectedError, ...)
  credentials not refreshed       google.auth RefreshError         yes
  timeout                         TimeoutError, FSTimeoutError     -

Only the 403 and 502 errors are OSErrors; none names the gs:// path. Grain
passes any of them (and a StorageError) from its worker processes to the
training loop unchanged. Not handled here: 404 (FileNotFoundError), 412
(FileExistsError) and local OSErrors, which callers handle themselves.
"""

from __future__ import annotations

import asyncio

from nitp_jax import errors
from nitp_jax.errors import StorageError

PERMISSION, TRANSIENT, OTHER = "permission", "transient", "other"
TRANSIENT_STATUSES = frozenset({408, 429, *range(500, 600)})
_CAUSE_CHARS = 160


def classify(error: BaseException) -> tuple[str, str] | None:
  """(PERMISSION | TRANSIENT | OTHER, the cause in a few words) of an error
  raised by a gs:// request; None for any other error."""
  try:
    import aiohttp  # pylint: disable=import-outside-toplevel
    import fsspec.exceptions  # pylint: disable=import-outside-toplevel
    import gcsfs.retry  # pylint: disable=import-outside-toplevel
    import google.auth.exceptions as auth  # pylint: disable=import-outside-toplevel
    import requests  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  text = errors.one_line(error)
  if isinstance(error, gcsfs.retry.HttpError):
    message = str(error.message).removesuffix(f", {error.code}")
    return _by_status(error.code, f"HTTP {error.code}: {message}")
  if isinstance(error, aiohttp.ClientResponseError):
    return _by_status(error.status, f"HTTP {error.status}: {error.message}")
  if type(error) is OSError and text.startswith("Forbidden:"):  # pylint: disable=unidiomatic-typecheck
    message = " ".join(line.strip() for line in str(error).splitlines()[1:]) or "Forbidden"
    return PERMISSION, _short(f"HTTP 403: {message}")
  if isinstance(error, requests.exceptions.ProxyError):
    return TRANSIENT, "HTTP 502: bad gateway"
  if isinstance(error, auth.RefreshError):
    return PERMISSION, _short(f"credentials could not be refreshed: {text}")
  if isinstance(error, (requests.exceptions.RequestException, aiohttp.ClientError,
                        auth.TransportError, gcsfs.retry.ChecksumError)):
    return TRANSIENT, _short(f"{type(error).__name__}: {text}")
  if isinstance(error, (asyncio.TimeoutError, fsspec.exceptions.FSTimeoutError)):
    return TRANSIENT, "timed out"
  if isinstance(error, auth.GoogleAuthError):
    return PERMISSION, _short(f"{type(error).__name__}: {text}")
  return None


def _by_status(status: int | None, cause: str) -> tuple[str, str]:
  if status in (401, 403):
    return PERMISSION, _short(cause)
  return (TRANSIENT if status in TRANSIENT_STATUSES else OTHER), _short(cause)


def _short(text: str) -> str:
  return text if len(text) <= _CAUSE_CHARS else text[:_CAUSE_CHARS - 3] + "..."


def as_storage_error(error: BaseException, path: str, action: str = "reading"
                     ) -> StorageError | None:
  """The one-line StorageError for `error` raised while `action` ("reading",
  "writing", ...) `path`; None when it is not a failed gs:// request."""
  if isinstance(error, StorageError):
    return error
  found = classify(error)
  if found is None:
    return None
  kind, cause = found
  if kind == PERMISSION:
    return StorageError(
        f"{action} {path} was refused ({cause}): check that your credentials (gcloud auth "
        "application-default login, or GOOGLE_APPLICATION_CREDENTIALS) may read and write "
        "it, then rerun the same command to resume")
  if kind == TRANSIENT:
    return StorageError(
        f"{action} {path} failed after gcsfs's retries ({cause}): GCS or the network is "
        "failing; rerun the same command to resume (training resumes from its last "
        "checkpoint)")
  return StorageError(f"{action} {path} failed ({cause}): check the path and the bucket")
