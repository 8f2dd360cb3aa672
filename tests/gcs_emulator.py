"""gcp-storage-emulator as the tests run it: `python -m tests.gcs_emulator PORT BUCKET`.

One gap of the emulator (2026.7.19) is filled, as real GCS behaves: object
downloads carry `x-goog-generation` / `x-goog-metageneration` headers and
honour `ifGenerationMatch` / `ifGenerationNotMatch` (412 / 304). Tensorstore,
which Orbax writes checkpoints through, reads an object's generation from
that header; without it, re-reading an OCDBT manifest fails with
"Malformed StorageGeneration".
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return _download(request, response, storage, *args, **kwargs)
  generation = str(obj["generation"])
  match = request.query.get("ifGenerationMatch", [None])[0]
  not_match = request.query.get("ifGenerationNotMatch", [None])[0]
  response["x-goog-generation"] = generation
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  if match is not None and match != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  if not_match is not None and not_match == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return None
  return _download(request, response, storage, *args, **kwargs)


def main() -> None:
  port, bucket = int(sys.argv[1]), sys.argv[2]
  objects.download = download  # objects.get calls it for ?alt=media
  for _, methods in server.HANDLERS:
    for method, handler in methods.items():
      if handler is _download:
        methods[method] = download
  srv = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  srv.run()


if __name__ == "__main__":
  main()
