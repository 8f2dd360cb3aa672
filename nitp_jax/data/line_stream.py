"""The lines of a local or gs:// file, decompressed as they are read.

`read_lines(path)` yields a file's lines split on b"\\n" only, exactly as
`data.split(b"\\n")` would (the last one without its newline, possibly
empty), decompressing `.gz` and `.zst` files on the fly. Memory is bounded by
the longest line plus a few blocks, never by the file (for .zst, a block is
what 64 KiB of compressed input decompresses to: a few hundred KB of text):
a 5 GB `.jsonl.zst` shard is read in a few MB, and a reader that stops early
(streaming's sample of a source's first documents) fetches only the start of
a gs:// object, in REMOTE_BLOCK_BYTES ranges.

A file that cannot be read or decompressed raises `Unreadable`; since lines
were yielded before, the caller decides whether that is the whole file (no
line yet) or only the rest of it.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import Iterator

from nitp_jax import storage
from nitp_jax.errors import StorageError, one_line

READ_BYTES = 1 << 18            # decompressed bytes per read
ZSTD_INPUT_BYTES = 1 << 16      # compressed bytes per zstd step (bounds its output)
REMOTE_BLOCK_BYTES = 4 << 20    # one range request of a gs:// object


class Unreadable(Exception):
  """The file cannot be read (further).

  Attributes:
    reason: the whole file's problem, as a corpus names it ("is not a valid
      zst file (...)", "cannot be read (...)").
    detail: the cause alone, for a file that failed after some lines.
  """

  def __init__(self, reason: str, detail: str):
    super().__init__(reason)
    self.reason, self.detail = reason, detail


def read_lines(path: str) -> Iterator[bytes]:
  """Lines of `path` (local or gs://; .gz / .zst decompressed), without their
  b"\\n"; Unreadable when it cannot be opened, read or decompressed."""
  name = str(path).lower()
  kind = "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else ""
  try:
    raw = _open(str(path))
  except StorageError:  # a gs:// request that failed for good: not a bad file
    raise
  except OSError as e:
    raise Unreadable(f"cannot be read ({e.strerror or e})", one_line(e)) from None
  with raw:
    source = _Source(raw)
    chunks = (_gzip_chunks(source) if kind == "gz" else
              _zstd_chunks(source) if kind == "zst" else source.chunks())
    yield from _split(_checked(chunks, source, kind))


def _open(path: str):
  """A binary file; a gs:// object is read in REMOTE_BLOCK_BYTES ranges."""
  if not storage.is_remote(path):
    return open(path, "rb")
  return io.BufferedReader(storage.open_binary(path), buffer_size=REMOTE_BLOCK_BYTES)


class _Source:
  """Reads of the raw file, counted; an OSError becomes Unreadable."""

  def __init__(self, raw):
    self.raw, self.bytes_read = raw, 0

  def read(self, size: int = -1) -> bytes:
    try:
      data = self.raw.read(size)
    except StorageError:
      raise
    except OSError as e:
      raise Unreadable(f"cannot be read ({e.strerror or e})", one_line(e)) from None
    self.bytes_read += len(data)
    return data

  def chunks(self) -> Iterator[bytes]:
    while data := self.read(READ_BYTES):
      yield data


def _gzip_chunks(source: _Source) -> Iterator[bytes]:
  """Decompressed pieces of a gzip stream (every member). read1, not read:
  a read that meets damaged data loses what it had decompressed before."""
  with gzip.GzipFile(fileobj=source, mode="rb") as f:
    while data := f.read1(READ_BYTES):
      yield data


def _zstd_chunks(source: _Source) -> Iterator[bytes]:
  """Decompressed pieces of a zstd stream, frame after frame. Not
  `stream_reader`: it reads a stream that ends inside a frame (a truncated
  file) as a shorter one, without an error; a decompressor per frame knows
  whether its frame ended."""
  import zstandard  # pylint: disable=import-outside-toplevel
  decompressor, frame, pending = zstandard.ZstdDecompressor(), None, b""
  while True:
    if not pending and not (pending := source.read(ZSTD_INPUT_BYTES)):
      break
    if frame is None:
      frame = decompressor.decompressobj()
    data, pending = frame.decompress(pending), b""
    if frame.eof:  # the next frame starts in what this one did not use
      pending, frame = frame.unused_data, None
    if data:
      yield data
  if frame is not None:
    raise zstandard.ZstdError("the data ends inside a frame (the file is truncated)")


def _checked(chunks: Iterator[bytes], source: _Source, kind: str) -> Iterator[bytes]:
  """`chunks`, with decompression errors as Unreadable; a compressed file
  with bytes that decompress to nothing is not valid either."""
  errors = (OSError, EOFError, zlib.error)  # BadGzipFile, truncation, bad deflate data
  if kind == "zst":
    import zstandard  # pylint: disable=import-outside-toplevel
    errors = (zstandard.ZstdError,)
  out = 0
  try:
    for data in chunks:
      out += len(data)
      yield data
  except StorageError:  # an OSError, but a failed gs:// request, not bad data
    raise
  except errors as e:
    raise Unreadable(f"is not a valid {kind} file ({e})", f"damaged {kind} data: "
                     f"{one_line(e)}") from None
  if kind and source.bytes_read and not out:
    raise Unreadable(f"is not a valid {kind} file (no data decompressed)",
                     "no data decompressed")


def _split(chunks: Iterator[bytes]) -> Iterator[bytes]:
  """Lines of the concatenated chunks, as bytes.split(b"\\n") gives them."""
  line: list[bytes] = []  # pieces of the line not yet ended
  for chunk in chunks:
    parts = chunk.split(b"\n")
    if len(parts) == 1:
      line.append(chunk)
      continue
    line.append(parts[0])
    yield b"".join(line)
    yield from parts[1:-1]
    line = [parts[-1]]
  yield b"".join(line)
