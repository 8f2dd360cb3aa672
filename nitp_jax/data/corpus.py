"""Text corpora: documents from files, directories, globs, or the default.

A corpus yields documents (str). `.txt`/`.md` files (and any other file named
directly or matched by a glob) are one document each; `.jsonl`, `.jsonl.gz`
and `.jsonl.zst` files hold one document per line in a configurable field (read
as a stream of lines by nitp_jax.data.line_stream, in memory bounded by the
longest line), `.parquet` files one per row of that column (read with pyarrow).

Bad data follows one policy (nitp_jax.data.bad_records) however a file was
named: a malformed record (a line that is not JSON, a line or row without a
string text field, a line with undecodable bytes, a file that cannot be read
at all) is skipped and counted in `Corpus.bad`, and a pass over the corpus
ends with a DataError when bad records exceed `max_bad_fraction` of all
records. One exception: a single file named directly that cannot be read at
all (binary, not UTF-8, not a valid gzip/zstd/Parquet file, no text column)
is an immediate DataError naming it, since it is the whole corpus. A
compressed JSONL or a Parquet file that breaks after its first records keeps
those and counts one bad record for the rest ("lines from N on cannot be
read (...)", "rows from N on ...").

Already tokenized documents come as int64 id arrays instead of str: each
record of an `.array_record` file (int32 ids, the format of our own shards),
and each row of a Parquet column of integer lists (nitp_jax.data.token_files).

Several sources are separated by commas; a file reached twice (two sources,
a symlink, a symlink loop) is read once, for the first source naming it.
Paths may be gs://... (read through nitp_jax.storage).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import pathlib
import posixpath
import sys
import sysconfig
from typing import Iterator, Union

import numpy as np

from nitp_jax import storage
from nitp_jax.data import line_stream
from nitp_jax.data import token_files
from nitp_jax.data.bad_records import BadRecords
from nitp_jax.errors import DataError, StorageError
from nitp_jax.flag_names import flag

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
# Not .array_record: a prepared directory holds train- and validation- shards;
# name the ones to read by a glob (e.g. 'prepared/train-*.array_record').
DIRECTORY_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
Document = Union[str, np.ndarray]  # text, or token ids of a pre-tokenized file
DEFAULT_NAME = "default"
_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class _BadFile(Exception):
  """A file that cannot be read as a corpus file (reason in args[0])."""


@dataclasses.dataclass
class Corpus:
  """Documents from `files` (then `extra`), in a fixed order.

  Attributes:
    name: what the corpus is (the input spec, or "default").
    files: files to read, sorted.
    direct: True when a single file was named directly (a file that cannot
      be read at all is an immediate error).
    text_field: the jsonl field holding the document text.
    extra: in-memory (name, text) documents read after the files.
    max_bad_fraction: malformed records above this fraction of all records
      end a pass with a DataError.
    bad: the malformed records of the last pass (skipped, counted, located).
    empty_documents: documents skipped because they are blank.
    source_of: str(file) -> index of the comma-separated source that named
      it first (absent = 0).
    reading: while iterating, the file of the last document (None: `extra`).
  """
  name: str
  files: list[pathlib.Path]
  direct: bool = False
  text_field: str = "text"
  extra: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  max_bad_fraction: float = 0.01
  bad: BadRecords = dataclasses.field(default_factory=BadRecords)
  empty_documents: int = 0
  source_of: dict[str, int] = dataclasses.field(default_factory=dict)
  reading: pathlib.Path | None = None

  @property
  def skipped(self) -> list[tuple[str, str]]:
    """(location, reason) of the first skipped records of the last pass."""
    return self.bad.locations

  def __iter__(self) -> Iterator[Document]:
    """Yield non-blank documents; DataError if there are none or if bad
    records exceed `max_bad_fraction` (checked at the end of the pass)."""
    self.bad, self.empty_documents = BadRecords(self.max_bad_fraction), 0
    count = 0
    for path in self.files:
      self.reading = path
      try:
        for doc in _read_file(path, self.text_field, self.bad):
          self.bad.record_ok()
          if non_blank(doc):
            count += 1
            yield doc
          else:
            self.empty_documents += 1
      except _BadFile as e:
        if self.direct:
          raise DataError(f"{path}: {e.args[0]}") from None
        self.bad.skip(str(path), e.args[0])
    self.reading = None
    for _, doc in self.extra:
      self.bad.record_ok()
      if doc.strip():
        count += 1
        yield doc
      else:
        self.empty_documents += 1
    if not count:
      raise DataError(self._empty_message())
    self.bad.check()

  def fingerprint(self) -> str:
    """sha256 over relative file names and sizes (cheap: no contents read)."""
    h = hashlib.sha256()
    paths = [str(p) for p in self.files]
    # posixpath: keeps gs:// intact (os.path would normalise "//" away).
    root = posixpath.commonpath(paths) if paths else ""
    if len(paths) == 1:
      root = posixpath.dirname(root)
    for path, text in zip(self.files, paths):
      name = text[len(root):].lstrip("/")
      h.update(f"{name}\0{_size(path)}\n".encode())
    for name, doc in self.extra:
      h.update(f"{name}\0{len(doc)}\n".encode())
    return h.hexdigest()

  def _empty_message(self) -> str:
    msg = (f"corpus {self.name!r} is empty: no non-blank documents in "
           f"{len(self.files)} file(s)")
    if self.empty_documents:
      msg += f", {self.empty_documents} blank document(s)"
    if self.bad.count:
      shown = "; ".join(f"{p}: {r}" for p, r in self.skipped[:3])
      msg += f", {self.bad.count} skipped ({shown})"
    return msg + (f". Point {flag('data.input')} at text (.txt/.md), .jsonl(.gz/.zst) or "
                  ".parquet files.")


def open_corpus(spec: str, text_field: str = "text",
                max_bad_fraction: float = 0.01) -> Corpus:
  """Corpus for comma-separated files, directories or globs; "" =
  `default_corpus()`. A pass over it refuses more than `max_bad_fraction`
  malformed records.

  Raises DataError when a path does not exist, a glob matches no file, or a
  directory has no file of a known format.
  """
  if not spec:
    corpus = default_corpus()
  else:
    sources = [s.strip() for s in spec.split(",") if s.strip()]
    if len(sources) > 1:
      named = [(i, f) for i, s in enumerate(sources) for f in open_corpus(s, text_field).files]
      source_of = {}
      for i, f in named:
        source_of.setdefault(str(f), i)
      corpus = Corpus(spec, _unique([f for _, f in named]), direct=False,
                      text_field=text_field, source_of=source_of)
    else:
      corpus = _open_source(sources[0] if sources else spec, text_field)
      corpus.files = _unique(corpus.files)
  corpus.max_bad_fraction = max_bad_fraction
  return corpus


def _unique(files: list[pathlib.Path]) -> list[pathlib.Path]:
  """`files` without a second path to the same file, in order."""
  seen, out = set(), []
  for f in files:
    real = str(f) if storage.is_remote(str(f)) else os.path.realpath(f)
    if real not in seen:
      seen.add(real)
      out.append(f)
  return out


def _is_corpus_file(path: pathlib.Path) -> bool:
  return path.is_file() and path.name.lower().endswith(DIRECTORY_SUFFIXES)


def _size(path) -> int:
  """A file's size in bytes."""
  return storage.size(str(path))


def non_blank(doc: Document) -> bool:
  """A document with text (not only whitespace) or with token ids."""
  return bool(doc.strip()) if isinstance(doc, str) else doc.size > 0


def _open_source(spec: str, text_field: str) -> Corpus:
  if storage.is_remote(spec):
    return _open_remote_source(spec, text_field)
  path = pathlib.Path(spec).expanduser()
  if glob.has_magic(spec):
    files = sorted(pathlib.Path(p) for p in glob.glob(
        os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
    if not files:
      raise DataError(f"{flag('data.input')}={spec!r}: the glob matches no file. "
                      "Check the pattern (quote it so the shell does not "
                      "expand it).")
    return Corpus(spec, files, direct=False, text_field=text_field)
  if path.is_file():
    return Corpus(spec, [path], direct=True, text_field=text_field)
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if _is_corpus_file(p))
    if not files:
      raise DataError(f"{flag('data.input')}={spec!r}: the directory has no "
                      f"{'/'.join(DIRECTORY_SUFFIXES)} file. Add text files "
                      f"or point {flag('data.input')} at a glob such as 'dir/*.txt'.")
    return Corpus(spec, files, direct=False, text_field=text_field)
  raise DataError(f"{flag('data.input')}={spec!r} does not exist. Give an existing file, "
                  f"directory or glob, or an empty {flag('data.input')} for the default "
                  "corpus.")


def _open_remote_source(spec: str, text_field: str) -> Corpus:
  """A gs://... file, directory or glob, its files as etils.epath paths."""
  storage.check(spec)
  if glob.has_magic(spec):
    files = [p for p in storage.glob(spec) if storage.isfile(p)]
    kind = "glob matches"
  elif storage.isfile(spec):
    return Corpus(spec, [storage.epath(spec)], direct=True, text_field=text_field)
  elif not storage.isdir(spec):
    raise DataError(f"{flag('data.input')}={spec!r} does not exist: no object or directory "
                    "of that name in the bucket. Check the path.")
  else:
    files = [p for p in storage.glob(spec.rstrip("/") + "/**")
             if p.lower().endswith(DIRECTORY_SUFFIXES)]
    kind = "path (a directory) holds"
  if not files:
    raise DataError(f"{flag('data.input')}={spec!r}: the {kind} no "
                    f"{'/'.join(DIRECTORY_SUFFIXES)} file. Check the path.")
  return Corpus(spec, [storage.epath(p) for p in sorted(files)], direct=False,
                text_field=text_field)


def default_corpus() -> Corpus:
  """The embedded corpus: the stdlib's .py sources plus pydoc topics.

  Gathered at run time from this interpreter (no downloads); sorted, so the
  same Python version always gives the same documents.
  """
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(
      p for p in root.rglob("*.py")
      if not _EXCLUDED_STDLIB_DIRS & set(p.relative_to(root).parts))
  topics = pydoc_data.topics.topics
  extra = [(f"pydoc:{k}", topics[k]) for k in sorted(topics)]
  version = ".".join(map(str, sys.version_info[:3]))
  return Corpus(f"{DEFAULT_NAME}:python-{version}-stdlib", files,
                direct=False, extra=extra)


def _read_bytes(path: pathlib.Path) -> bytes:
  """The file's bytes, decompressed for .gz / .zst; _BadFile if it cannot be."""
  try:
    data = storage.read_bytes(str(path))
  except StorageError:  # GCS failed or refused: not a bad file
    raise
  except OSError as e:
    raise _BadFile(f"cannot be read ({e.strerror or e})") from None
  name = path.name.lower()
  if name.endswith(".gz"):
    decompress, errors = gzip.decompress, (OSError, EOFError)  # BadGzipFile, truncation
  elif name.endswith(".zst"):
    import zstandard  # pylint: disable=import-outside-toplevel
    decompress = lambda d: zstandard.ZstdDecompressor().stream_reader(  # every frame
        io.BytesIO(d), read_across_frames=True).read()
    errors = (zstandard.ZstdError,)
  else:
    return data
  kind = name.rsplit(".", 1)[1]
  try:
    out = decompress(data)
  except errors as e:
    raise _BadFile(f"is not a valid {kind} file ({e})") from None
  if data and not out:  # zstandard reads a truncated frame as nothing
    raise _BadFile(f"is not a valid {kind} file (no data decompressed)")
  return out


def _read_parquet(path: pathlib.Path, text_field: str, bad: BadRecords
                  ) -> Iterator[Document]:
  """One document per row of the `text_field` column; a row without a string
  is skipped into `bad`."""
  import pyarrow  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    table = pq.ParquetFile(_local_or_bytes(path))
    columns = table.schema_arrow.names
  except StorageError:
    raise
  except (pyarrow.ArrowException, OSError) as e:
    raise _BadFile(f"is not a readable Parquet file ({e})") from None
  if text_field not in columns:
    raise _BadFile(f"has no column {text_field!r} (it has {', '.join(columns)}); set "
                   f"{flag('data.text_field')} to the column holding the text")
  tokens = token_files.is_token_column(table.schema_arrow.field(text_field).type)
  what = "token ids" if tokens else "text"
  row = 0
  try:  # group by group: pyarrow reads ahead across groups, and a reader may stop early
    for batch in (b for group in range(table.num_row_groups) for b in table.iter_batches(
        columns=[text_field], batch_size=1024, row_groups=[group])):
      for value in batch.column(0).to_pylist():
        row += 1
        if isinstance(value, str) and not tokens:
          yield value
        elif tokens and value is not None:
          yield np.asarray(value, dtype=np.int64)  # ids checked against the tokenizer later
        else:
          bad.skip(f"{path}:row {row}",
                   f"row {row} has no {what} in column {text_field!r} ({type(value).__name__})")
  except StorageError:
    raise
  except (pyarrow.ArrowException, OSError) as e:  # a damaged row group
    bad.skip(f"{path}:row {row + 1}", f"rows from {row + 1} on cannot be read ({e})")


def _local(path) -> str:
  """A local file with `path`'s bytes (a remote one is downloaded to the cache)."""
  return storage.local_copy(str(path))


def _local_or_bytes(path):
  """What pyarrow opens: a local path, or a remote file read in ranges (a
  reader that stops early, such as streaming's sample of the first
  documents, fetches only the footer and the row groups it read)."""
  return storage.open_binary(str(path)) if storage.is_remote(str(path)) else path


def _read_file(path: pathlib.Path, text_field: str, bad: BadRecords) -> Iterator[Document]:
  """Documents of one file. Malformed records (jsonl lines, Parquet rows) are
  skipped into `bad` (`bad.skip`); the caller counts the good ones
  (`bad.record_ok`). _BadFile for a file that cannot be read at all."""
  if path.name.lower().endswith(PARQUET_SUFFIXES):
    yield from _read_parquet(path, text_field, bad)
    return
  if path.name.lower().endswith(token_files.ARRAY_RECORD_SUFFIXES):
    try:
      yield from token_files.read_array_record(_local(path))
    except token_files.BadTokenFile as e:
      raise _BadFile(e.args[0]) from None
    return
  if path.name.lower().endswith(JSONL_SUFFIXES):
    yield from _read_jsonl(path, text_field, bad)
    return
  data = _read_bytes(path)
  nul = data.find(b"\0")
  if nul >= 0:
    raise _BadFile(f"is binary (NUL byte at offset {nul}); only UTF-8 text "
                   "is supported")
  try:
    yield data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _BadFile(f"is not valid UTF-8 (byte offset {e.start}); convert it "
                   "with e.g. `iconv -t utf-8`") from None


def _read_jsonl(path: pathlib.Path, text_field: str, bad: BadRecords) -> Iterator[str]:
  """One document per line's `text_field`, read as a stream (memory bounded by
  the longest line); bad lines are skipped into `bad`. A file that fails
  before its first line is a _BadFile; one that fails later (damaged or
  truncated compressed data) ends with one bad record for the lines left."""
  lineno = 0
  try:
    for lineno, line in enumerate(line_stream.read_lines(str(path)), 1):
      doc = _jsonl_document(path, lineno, line, text_field, bad)
      if doc is not None:
        yield doc
  except line_stream.Unreadable as e:
    if not lineno:
      raise _BadFile(e.reason) from None
    bad.skip(f"{path}:{lineno + 1}", f"lines from {lineno + 1} on cannot be read ({e.detail})")


def _jsonl_document(path: pathlib.Path, lineno: int, raw: bytes, text_field: str,
                    bad: BadRecords) -> str | None:
  """The document of one line (split on b"\\n" only, not as str.splitlines():
  JSON strings may hold a raw U+2028); None for a blank line, or a bad one
  (skipped into `bad`: one undecodable byte costs only its line)."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    bad.skip(f"{path}:{lineno}", f"line {lineno} is not valid UTF-8 (byte {e.start} "
             "of the line)")
    return None
  if not line.strip():
    return None
  try:
    doc = json.loads(line)[text_field]
    if not isinstance(doc, str):
      raise TypeError
  except json.JSONDecodeError as e:
    reason = f"line {lineno} is not valid JSON ({e.msg})"
  except (KeyError, TypeError, IndexError):
    reason = (f"line {lineno} has no string field {text_field!r}; set "
              f"{flag('data.text_field')} to the field holding the text")
  else:
    return doc
  bad.skip(f"{path}:{lineno}", reason)
  return None
