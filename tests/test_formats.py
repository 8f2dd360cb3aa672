"""Corpus formats: .jsonl.gz, .jsonl.zst and .parquet read the same
documents as .jsonl; comma-separated sources; a file reached twice (two
sources, a symlink loop) is read once; bad compressed or Parquet files are
named in one line, or skipped inside a directory."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from nitp_jax.data import corpus as corpus_lib
from nitp_jax.data import prepare
from nitp_jax.errors import DataError

DOCS = [f"document {i}: " + "word " * (i % 7) + "\n\tend ünïcödé 😀" for i in range(30)]


def _jsonl(docs, field="text") -> bytes:
  return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def write_formats(d, docs=DOCS) -> dict[str, str]:
  """The same documents in every format, in one directory."""
  os.makedirs(d, exist_ok=True)
  paths = {k: os.path.join(d, f"docs.{k}") for k in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")}
  with open(paths["jsonl"], "wb") as f:
    f.write(_jsonl(docs))
  with open(paths["jsonl.gz"], "wb") as f:
    f.write(gzip.compress(_jsonl(docs)))
  with open(paths["jsonl.zst"], "wb") as f:  # two frames, as streaming writers make
    half = len(docs) // 2
    f.write(zstandard.ZstdCompressor().compress(_jsonl(docs[:half])))
    f.write(zstandard.ZstdCompressor().compress(_jsonl(docs[half:])))
  pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), paths["parquet"],
                 row_group_size=7)
  return paths


def test_every_format_reads_the_same_documents(tmp_path):
  paths = write_formats(tmp_path / "c")
  for kind, path in paths.items():
    assert list(corpus_lib.open_corpus(path)) == DOCS, kind
  everything = list(corpus_lib.open_corpus(str(tmp_path / "c")))
  assert sorted(everything) == sorted(DOCS * 4)


def test_comma_separated_sources_and_files_read_once(tmp_path):
  paths = write_formats(tmp_path / "c")
  spec = f"{paths['jsonl.gz']},{paths['parquet']},{paths['jsonl.gz']}"
  assert list(corpus_lib.open_corpus(spec)) == DOCS * 2
  os.symlink(tmp_path / "c", tmp_path / "c" / "loop")  # a directory symlink loop
  assert len(corpus_lib.open_corpus(str(tmp_path / "c")).files) == 4
  assert len(corpus_lib.open_corpus(str(tmp_path / "c" / "**" / "*.parquet")).files) == 1


def test_parquet_needs_the_text_column_and_skips_null_rows(tmp_path):
  path = str(tmp_path / "t.parquet")
  pq.write_table(pa.table({"body": ["a", None, "c"]}), path)
  with pytest.raises(DataError, match=r"has no column 'text' \(it has body\)") as e:
    list(corpus_lib.open_corpus(path))
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match=r"1 of 3 records are malformed.*row 2 has no text in "
                     "column 'body'"):
    list(corpus_lib.open_corpus(path, "body"))
  assert list(corpus_lib.open_corpus(path, "body", max_bad_fraction=0.5)) == ["a", "c"]
  os.makedirs(tmp_path / "d")
  os.replace(path, tmp_path / "d" / "t.parquet")
  c = corpus_lib.open_corpus(str(tmp_path / "d"), "body", max_bad_fraction=0.5)
  assert list(c) == ["a", "c"] and [r for _, r in c.skipped] == [
      "row 2 has no text in column 'body' (NoneType)"]


def test_damaged_files_are_named_or_skipped(tmp_path):
  write_formats(tmp_path / "c")
  (tmp_path / "c" / "bad.jsonl.gz").write_bytes(b"\x1f\x8b not gzip at all")
  (tmp_path / "c" / "bad.jsonl.zst").write_bytes(b"not zstd")
  (tmp_path / "c" / "bad.parquet").write_bytes(b"PAR1 nonsense")
  for name in ("bad.jsonl.gz", "bad.jsonl.zst", "bad.parquet"):
    with pytest.raises(DataError, match=f"{name}: is not a") as e:
      list(corpus_lib.open_corpus(str(tmp_path / "c" / name)))
    assert "\n" not in str(e.value)
  c = corpus_lib.open_corpus(str(tmp_path / "c"), max_bad_fraction=0.05)  # 3 of 123
  assert sorted(list(c)) == sorted(DOCS * 4)
  assert sorted(os.path.basename(p) for p, _ in c.skipped) == [
      "bad.jsonl.gz", "bad.jsonl.zst", "bad.parquet"]


def test_prepare_reads_a_mixed_directory(tmp_path):
  write_formats(tmp_path / "c", DOCS * 4)
  manifest = prepare.prepare(str(tmp_path / "c"), str(tmp_path / "p"), 300, val_fraction=0.1,
                             workers=1)
  assert sum(manifest["documents"].values()) == 4 * 4 * len(DOCS)
  assert manifest["skipped_count"] == 0
