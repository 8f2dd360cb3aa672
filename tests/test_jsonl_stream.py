"""JSONL read as a stream (nitp_jax.data.line_stream): the lines and
documents of a whole-file read, in memory bounded by the longest line; a
compressed file damaged in the middle keeps the documents before the damage
and counts one bad record; a gs:// reader that stops early fetches only the
start of the object (against the GCS emulator of tests/test_object_storage)."""

import gzip
import itertools
import json
import os
import random
import tracemalloc

import pytest
import zstandard

from nitp_jax import storage
from nitp_jax.data import corpus as corpus_lib
from nitp_jax.data import line_stream
from nitp_jax.data import streaming
from nitp_jax.errors import DataError
from tests.test_object_storage import BUCKET, emulator  # noqa: F401  # pylint: disable=unused-import


def _zst_frames(data: bytes, frame_bytes: int) -> bytes:
  """`data` as one zstd frame per `frame_bytes` (cut anywhere, mid-line too)."""
  c = zstandard.ZstdCompressor()
  return b"".join(c.compress(data[i:i + frame_bytes]) for i in range(0, len(data), frame_bytes))


def _gz_members(data: bytes, member_bytes: int) -> bytes:
  return b"".join(gzip.compress(data[i:i + member_bytes], 1)
                  for i in range(0, len(data), member_bytes))


def _docs(n: int, seed: int, chars: int = 600) -> list[str]:
  rng = random.Random(seed)
  return [f"doc {i} " + rng.randbytes(rng.randint(chars // 2, chars)).hex() for i in range(n)]


def _jsonl(docs: list[str]) -> bytes:
  return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def _write(path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


def test_compressed_jsonl_reads_like_the_whole_file(tmp_path):
  long_doc = "x\u2028y " * 700_000  # a 3.5 MB line: spans several reads
  lines = [json.dumps({"text": "a raw\u2028separator, é"}, ensure_ascii=False).encode(),
           b"", b"{not json", b'{"text": "caf\xe9"}', b"   ", json.dumps({"text": "cr"}).encode()
           + b"\r", json.dumps({"text": long_doc}, ensure_ascii=False).encode(), b'{"id": 1}']
  lines += [json.dumps({"text": d}).encode() for d in _docs(3000, 0, 200)]
  data = b"\n".join(lines)  # no final newline
  paths = [_write(tmp_path / "a.jsonl", data),
           _write(tmp_path / "a.jsonl.gz", _gz_members(data, 1_500_000)),
           _write(tmp_path / "a.jsonl.zst", _zst_frames(data, 700_001))]
  expected = ["a raw\u2028separator, é", "cr", long_doc] + _docs(3000, 0, 200)
  for path in paths:
    assert list(line_stream.read_lines(path)) == data.split(b"\n"), path
    corpus = corpus_lib.open_corpus(path, max_bad_fraction=0.5)
    assert list(corpus) == expected, path
    assert [(os.path.basename(p), r.split(" (")[0]) for p, r in corpus.skipped] == [
        (f"{os.path.basename(path)}:3", "line 3 is not valid JSON"),
        (f"{os.path.basename(path)}:4", "line 4 is not valid UTF-8"),
        (f"{os.path.basename(path)}:8", "line 8 has no string field 'text'; set "
         "--config.data.text_field to the field holding the text")], path


def _damaged(tmp_path, docs: list[str]) -> dict[str, str]:
  """The JSONL of `docs`, cut or broken halfway: a truncated .gz and .zst,
  and a .gz whose second member is not deflate data (zlib.error)."""
  data = _jsonl(docs)
  gz, zst = gzip.compress(data, 1), _zst_frames(data, 300_000)
  bad_member = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 16  # invalid block type
  return {"truncated gz": _write(tmp_path / "t.jsonl.gz", gz[:len(gz) // 2]),
          "truncated zst": _write(tmp_path / "t.jsonl.zst", zst[:len(zst) // 2]),
          "bad deflate": _write(tmp_path / "d.jsonl.gz",
                                gzip.compress(data[:len(data) // 2]) + bad_member)}


CAUSES = {
    "truncated gz": "damaged gz data: Compressed file ended before the end-of-stream marker "
                    "was reached",
    "truncated zst": "damaged zst data: the data ends inside a frame (the file is truncated)",
    "bad deflate": "damaged gz data: Error -3 while decompressing data: invalid block type"}


@pytest.mark.parametrize("damage", list(CAUSES))
def test_damage_mid_file_keeps_the_documents_before_it(tmp_path, damage):
  docs = _docs(4000, 1)  # 2.5 MB
  path, cause = _damaged(tmp_path, docs)[damage], CAUSES[damage]
  corpus = corpus_lib.open_corpus(path)  # 1 bad record in ~2000: within the default 1%
  read = list(corpus)
  assert 1500 < len(read) < 2100 and read == docs[:len(read)], len(read)
  n = len(read) + 1
  assert corpus.skipped == [(f"{path}:{n}", f"lines from {n} on cannot be read ({cause})")]
  with pytest.raises(DataError, match=f"1 of {n} records are malformed.*{path}:{n}: lines from "
                     f"{n} on cannot be read") as e:
    list(corpus_lib.open_corpus(path, max_bad_fraction=0))
  assert "\n" not in str(e.value)


def test_damage_before_the_first_line_is_a_bad_file(tmp_path):
  data = _zst_frames(_jsonl(_docs(100, 2)), 1 << 20)
  path = _write(tmp_path / "t.jsonl.zst", data[:len(data) // 2])
  with pytest.raises(DataError, match=r"t\.jsonl\.zst: is not a valid zst file \(the data ends "
                     r"inside a frame \(the file is truncated\)\)$"):
    list(corpus_lib.open_corpus(path))


def _peak_bytes(path: str) -> tuple[int, int]:
  """(documents, peak bytes Python allocated) of one pass over `path`."""
  tracemalloc.start()
  try:
    count = sum(1 for _ in corpus_lib.open_corpus(path))
    return count, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_memory_is_bounded_by_the_longest_line_not_the_file(tmp_path):
  docs = _docs(16_000, 3)  # 15 MB of JSONL, lines < 1 KB
  data = _jsonl(docs)
  for path in (_write(tmp_path / "m.jsonl", data),
               _write(tmp_path / "m.jsonl.zst", _zst_frames(data, 8 << 20))):
    count, peak = _peak_bytes(path)
    # The whole-file reader peaked at 3x the data (bytes, str, lines); this one
    # at a few read blocks.
    assert count == len(docs) and peak < len(data) / 4, (path, peak, len(data))


def test_gs_reader_that_stops_early_fetches_the_start_only(emulator, tmp_path, monkeypatch):
  docs = _docs(10_000, 4, chars=1600)  # 22 MB of JSONL, ~12 MB as zstd (hex: 4 bits/char)
  local = _write(tmp_path / "big.jsonl.zst", _zst_frames(_jsonl(docs), 4 << 20))
  url = f"gs://{BUCKET}/jsonl/big.jsonl.zst"
  storage.upload(local, url)
  # Imported after storage set gcsfs up: imported first, gcsfs probes the
  # bucket type over gRPC (60 s against the emulator).
  import gcsfs.core  # pylint: disable=import-outside-toplevel
  fetched = []
  fetch = gcsfs.core.GCSFileSystem._cat_file_sequential  # every object download goes here

  async def counting(self, *args, **kwargs):
    out = await fetch(self, *args, **kwargs)
    fetched.append(len(out))
    return out

  monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_cat_file_sequential", counting)
  sample = itertools.islice(streaming.read_documents(streaming.Unit(url), "text"),
                            streaming.SAMPLE_DOCUMENTS)  # streaming's sample of a source
  assert [doc for _, doc in sample] == docs[:streaming.SAMPLE_DOCUMENTS]
  size = os.path.getsize(local)
  assert sum(fetched) <= line_stream.REMOTE_BLOCK_BYTES < size / 2, (fetched, size)
  fetched.clear()
  assert list(corpus_lib.open_corpus(url)) == docs  # a whole pass reads it all
  assert sum(fetched) == size
