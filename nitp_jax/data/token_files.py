"""Pre-tokenized documents: what a corpus reads instead of text.

  .array_record  one document per record: little-endian int32 ids (the format
                 of our own `train-*.array_record` shards, EOS last)
  .parquet       a `data.text_field` column of integer lists (one row each)

Their ids must come from `data.tokenizer`; prepare checks them against its
vocabulary (`check_ids`) and appends EOS unless the document already ends with
it (so another prepared directory's shards are read back unchanged).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from nitp_jax.errors import DataError
from nitp_jax.flag_names import flag

ARRAY_RECORD_SUFFIXES = (".array_record",)


class BadTokenFile(Exception):
  """An ArrayRecord file that is not int32 id records (reason in args[0])."""


def is_token_column(arrow_type) -> bool:
  """True for a Parquet column of integer lists (token ids)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  return ((pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type))
          and pa.types.is_integer(arrow_type.value_type))


def is_token_file(path: str, text_field: str) -> bool:
  """True when `path` holds token ids rather than text."""
  name = str(path).lower()
  if name.endswith(ARRAY_RECORD_SUFFIXES):
    return True
  if not name.endswith(".parquet"):
    return False
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    with (open(path, "rb") if isinstance(path, str) else path.open("rb")) as f:
      schema = pq.read_schema(f)
  except Exception:  # pylint: disable=broad-except  # unreadable: the corpus reports it
    return False
  index = schema.get_field_index(text_field)
  return index >= 0 and is_token_column(schema.field(index).type)


def read_array_record(path: str) -> Iterator[np.ndarray]:
  """Each record's ids (int64); BadTokenFile unless every record is int32s."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except Exception as e:  # pylint: disable=broad-except  # RuntimeError/ValueError by version
    raise BadTokenFile(f"is not a readable ArrayRecord file ({e})") from None
  if not reader.ok():  # a missing or damaged file opens "not ok", with no records
    reader.close()
    raise BadTokenFile("is not a readable ArrayRecord file")
  try:
    for index in range(reader.num_records()):
      record = reader.read()  # the next record
      if len(record) % 4:
        raise BadTokenFile(f"record {index} is {len(record)} bytes, not int32 token ids")
      yield np.frombuffer(record, dtype="<i4").astype(np.int64)
  finally:
    reader.close()


def check_ids(ids: np.ndarray, vocab_size: int, path) -> None:
  """DataError naming the file and the first id outside [0, vocab_size)."""
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    raise DataError(f"{path}: token id {int(ids[np.argmax(bad)])} is outside the tokenizer's "
                    f"vocabulary [0, {vocab_size}); pre-tokenized files must come from "
                    f"{flag('data.tokenizer')}")


def with_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
  """int32 ids ending with exactly the EOS they had, or one appended."""
  ids = ids.astype(np.int32)
  if ids.size and ids[-1] == eos_id:
    return ids
  return np.append(ids, np.int32(eos_id))
