"""Where a run keeps its files: the one definition of a workdir's layout.

  <workdir>/
    checkpoints/<step>/   Orbax: train state, data-iterator state, config
    data/                 prepared data, unless config.data.prepared_dir is set
      manifest.json, tokenizer.model, {train,validation}-NNNNN.array_record
    metrics.jsonl         one JSON record per log/eval/probe step
    tensorboard/          event files

A workdir or prepared-data directory may be local or gs://... (`storage`).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Any

import ml_collections

from nitp_jax import errors
from nitp_jax import remote_failures
from nitp_jax import storage
from nitp_jax.errors import ConfigError

CHECKPOINTS = "checkpoints"
DATA = "data"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), CHECKPOINTS)


def metrics_path(workdir: str) -> str:
  return storage.join(workdir, METRICS)


def tensorboard_dir(workdir: str) -> str:
  return storage.join(workdir, TENSORBOARD)


def data_dir(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """The prepared data of a run: config.data.prepared_dir, else <workdir>/data."""
  return cfg.data.prepared_dir or storage.join(storage.absolute(workdir), DATA)


def tokenizer_path(prepared_dir: str) -> str:
  """The prepared data's tokenizer: tokenizer.json if it has one, else
  tokenizer.model."""
  json_path = storage.join(prepared_dir, TOKENIZER_JSON)
  return json_path if storage.isfile(json_path) else storage.join(prepared_dir, TOKENIZER)


def run_tokenizer(cfg: ml_collections.ConfigDict, workdir: str | None) -> str | None:
  """The tokenizer a run used: config.data.tokenizer, else the prepared
  data's own (a local copy when that is remote); None when neither file exists."""
  candidates = [cfg.data.tokenizer]
  if workdir:
    candidates.append(tokenizer_path(data_dir(cfg, workdir)))
  found = next((p for p in candidates if p and storage.isfile(p)), None)
  if found is None:
    return None
  config = storage.join(os.path.dirname(found), TOKENIZER_CONFIG)
  if found.endswith(".json") and storage.isfile(config):
    storage.local_copy(config)  # beside the copy: it names a tokenizer.json's special tokens
  return storage.local_copy(found)


def default_workdir(config_path: str) -> str:
  """runs/<config name>[_<variant>] for `configs/x.py[:variant]`."""
  path, _, variant = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", name + (f"_{variant}" if variant else ""))


def make_workdir(workdir: str) -> str:
  """The absolute path of `workdir`, created; ConfigError if it is not writable
  (StorageError if it is remote and unusable from here)."""
  if storage.is_remote(workdir):
    return _check_remote_workdir(workdir)
  return make_local_dir(workdir, "--workdir")


def make_local_dir(path: str, flag_name: str, error: type[Exception] = ConfigError) -> str:
  """The absolute path of the local directory `path`, created; `error`
  naming `flag_name` if it is not a writable directory (a file, say)."""
  absolute = os.path.abspath(path)
  try:
    os.makedirs(absolute, exist_ok=True)
    with tempfile.TemporaryFile(dir=absolute):  # a unique name: processes may share path
      pass
  except OSError as e:
    raise error(f"{flag_name}={path} is not a writable directory ({e.strerror or e}): "
                "pass a directory you can write to") from e
  return absolute


def _check_remote_workdir(workdir: str) -> str:
  storage.check(workdir)
  path = storage.absolute(workdir)
  probe = storage.join(path, f".write-test-{uuid.uuid4().hex}")  # processes may share path
  try:
    storage.write_text(probe, "")
    storage.remove(probe)
  except Exception as e:  # pylint: disable=broad-except  # gcsfs: OSError, HttpError, ...
    cause = e.__cause__ if isinstance(e, errors.StorageError) and e.__cause__ else e
    if (remote_failures.classify(cause) or ("",))[0] == remote_failures.TRANSIENT:
      raise  # GCS failing, not this path: storage's line says to rerun
    raise ConfigError(f"--workdir={workdir} is not writable ({type(cause).__name__}: "
                      f"{errors.one_line(cause)[:200]}): pass a bucket path your credentials "
                      "may write to") from e
  return path


def write_json(path: str, obj: Any) -> None:
  """Write `obj` as indented JSON, atomically (a reader never sees half a file)."""
  storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
