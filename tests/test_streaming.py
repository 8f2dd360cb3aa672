"""Streaming input (data.streaming=true): per-process files, on-the-fly
tokenization, a weighted mixture, exact resume, and a killed run that resumes
bitwise; the same from gs:// sources, tokenizer and workdir (the GCS
emulator of tests/test_object_storage.py)."""

import glob
import json
import os
import re
import shutil
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import config as config_lib
from nitp_jax import errors
from nitp_jax import evaluate
from nitp_jax import layout
from nitp_jax import storage
from nitp_jax import train
from nitp_jax.data import heldout_sets
from nitp_jax.data import prepare
from nitp_jax.data import streaming
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.errors import ConfigError, DataError
from nitp_jax.export import hf
from tests.conftest import CORPUS_GLOB, train_config
from tests.test_object_storage import BUCKET, emulator  # noqa: F401  # pylint: disable=unused-import
from tests.test_object_storage import _env, _finish, _records, _train
from tests.test_robust import Run, train_records

SEQ, BATCH = 32, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two sources: one .jsonl.zst and one .parquet file of distinct documents,
  the Parquet ones short."""
  root = tmp_path_factory.mktemp("stream_corpus")
  texts = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(CORPUS_GLOB))]
  lines = [t for text in texts for t in text.split("\n\n") if t.strip()]
  a, b = lines[:150], lines[150:300]
  jsonl = root / "a.jsonl.zst"
  jsonl.write_bytes(zstandard.ZstdCompressor().compress(
      "".join(json.dumps({"text": f"A{i} {t}"}) + "\n" for i, t in enumerate(a)).encode()))
  parquet = root / "b.parquet"
  pq.write_table(pa.table({"text": [f"B{i} {t[:40]}" for i, t in enumerate(b)]}), parquet,
                 row_group_size=32)
  return str(jsonl), str(parquet)


@pytest.fixture(scope="module")
def tokenizer_path(prepared_dir):
  return os.path.join(prepared_dir, "tokenizer.model")


def corpus_sources(corpus):
  return [[corpus[0]], [corpus[1]]]


def dataset(corpus, tokenizer_path, index=0, count=1, seed=0, **kw):
  return streaming.make_train_dataset(
      [[corpus[0]], [corpus[1]]], tokenizer_path, SEQ, BATCH * count, seed,
      proportions=[0.7, 0.3], heldout=5, process_index=index, process_count=count,
      shuffle_window=16, **kw)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_format_determinism_and_resume(corpus, tokenizer_path):
  it = iter(dataset(corpus, tokenizer_path))
  first = take(it, 3)
  for b in first:
    assert set(b) == {"tokens", "segment_ids", "positions"}
    assert all(v.dtype == np.int32 and v.shape == (BATCH, SEQ) for v in b.values())
    assert not b["tokens"][b["segment_ids"] == 0].any()  # padding is 0
  assert np.mean([(b["segment_ids"] > 0).mean() for b in first]) > 0.5
  state = it.get_state()
  json.dumps(state)  # JSON-able, as the checkpoint stores it
  after = take(it, 4)

  again = iter(dataset(corpus, tokenizer_path))
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(first, take(again, 3)) for k in x)
  resumed = iter(dataset(corpus, tokenizer_path))
  resumed.set_state(json.loads(json.dumps(state)))
  for x, y in zip(after, take(resumed, 4)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other_seed = next(iter(dataset(corpus, tokenizer_path, seed=1)))
  assert not np.array_equal(other_seed["tokens"], first[0]["tokens"])


def test_weights_are_shares_of_tokens(corpus, tokenizer_path):
  tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  means = [streaming.mean_document_tokens(f, tokenizer, "text") for f in corpus]
  assert means[0] > 2 * means[1]  # so shares of documents would be far off
  docs = iter(streaming.mixed_documents(
      [[corpus[0]], [corpus[1]]], tokenizer_path, 0, 0, 1,
      proportions=streaming.document_proportions([0.7, 0.3], means)))
  tokens = {"A": 0, "B": 0}
  for _ in range(1000):
    ids = next(docs)
    tokens[tokenizer.decode(ids[:2])[0]] += ids.size
  assert abs(tokens["A"] / (tokens["A"] + tokens["B"]) - 0.7) < 0.05, tokens


@pytest.fixture(scope="module")
def gs_corpus(emulator, corpus, tokenizer_path):  # pylint: disable=redefined-outer-name
  """`corpus` and the tokenizer as gs:// objects: the .jsonl.zst file in a
  directory (code/), the Parquet file matched by a glob (web/*.parquet)."""
  base = f"gs://{BUCKET}/streaming"
  storage.upload(corpus[0], f"{base}/code/a.jsonl.zst")
  storage.upload(corpus[1], f"{base}/web/b-000.parquet")
  storage.upload(tokenizer_path, f"{base}/tokenizer.model")
  return base


@pytest.mark.parametrize("where", ["local", "gs"])
def test_processes_read_disjoint_documents(corpus, where, request):
  if where == "gs":
    base = request.getfixturevalue("gs_corpus")
    corpus = (f"{base}/code/a.jsonl.zst", f"{base}/web/b-000.parquet")
  seen = []
  for index in range(2):
    docs = []
    for files in ([corpus[0]], [corpus[1]]):
      for unit in streaming.local_units(files, index, 2, heldout=5 if files == [corpus[0]]
                                        else 0):
        docs += [d for _, d in streaming.read_documents(unit, "text")]
    seen.append(docs)
  assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
  names = {d.split(" ", 1)[0] for d in seen[0] + seen[1]}
  assert names == {f"A{i}" for i in range(5, 150)} | {f"B{i}" for i in range(150)}
  # The Parquet file (row groups of 32) is split by row group: process 0 reads
  # groups 0, 2, 4; the .jsonl.zst file by line: process 0 keeps lines 0, 2, ...
  assert {d.split(" ", 1)[0] for d in seen[0]} == (
      {f"A{i}" for i in range(6, 150, 2)} |
      {f"B{i}" for i in [*range(0, 32), *range(64, 96), *range(128, 150)]})


def test_streaming_needs_a_tokenizer(tmp_path, corpus):
  cfg = train_config("", steps=2)
  cfg.data.input, cfg.data.streaming = corpus[0], True
  with pytest.raises(ConfigError, match="data.tokenizer"):
    streaming.ensure_heldout_dir(cfg, str(tmp_path / "data"))
  cfg.data.input, cfg.data.tokenizer = "", "tokenizer.model"
  with pytest.raises(ConfigError, match="embedded corpus"):
    streaming.ensure_heldout_dir(cfg, str(tmp_path / "data"))


def test_heldout_dir_reads_like_prepared_data(tmp_path, corpus, tokenizer_path):
  cfg = train_config("", steps=2)
  cfg.data.input, cfg.data.weights = ",".join(corpus), "0.7,0.3"
  cfg.data.streaming, cfg.data.tokenizer = True, tokenizer_path
  out = str(tmp_path / "data")
  held = streaming.ensure_heldout_dir(cfg, out)
  assert held == streaming.ensure_heldout_dir(cfg, out) > 0  # reused
  from nitp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  docs = pipeline.heldout_documents(out)
  manifest = prepare.load_manifest(out)
  assert len(docs) == held and manifest["streaming"]
  assert len(pipeline.make_eval_batches(out, 64, 8, 2)) >= 1
  # Every source holds out the leading documents of its first file, in a
  # validation shard of its own; training skips each source's.
  tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  names = [tokenizer.decode(d[:-1]).split(" ", 1)[0] for d in docs]
  counts = streaming.heldout_counts(manifest, 2)
  assert all(counts) and sum(counts) == held
  assert names == [f"A{i}" for i in range(counts[0])] + [f"B{i}" for i in range(counts[1])]
  assert [s["shards"]["validation"] for s in manifest["sources"]] == [
      ["validation-s0-00000.array_record"], ["validation-s1-00000.array_record"]]
  sets = heldout_sets.make_eval_sets(out, 64, 8, 2, [0.7, 0.3])
  assert sets.suffixes == ["_s0", "_s1"] and sets.weights == [0.7, 0.3]
  assert heldout_sets.make_eval_sets(out, 64, 8, 2).weights is None  # pooled: no token counts
  trained = iter(streaming.mixed_documents(corpus_sources(corpus), tokenizer_path, 0, 0, 1,
                                           heldout=counts))
  seen = {tokenizer.decode(next(trained)[:-1]).split(" ", 1)[0] for _ in range(200)}
  assert len(seen) == 200 and not seen & set(names)
  # A directory written before per-source sets (source 0's documents only,
  # inputs without "first_files") is still read as it is.
  old = tmp_path / "old"
  shutil.copytree(out, old)
  del manifest["sources"], manifest["inputs"]["first_files"]
  manifest["documents"]["validation"] = counts[0]
  manifest["shards"]["validation"] = ["validation-s0-00000.array_record"]
  (old / "manifest.json").write_text(json.dumps(manifest))
  assert streaming.ensure_heldout_dir(cfg, str(old)) == counts[0]
  assert streaming.heldout_counts(prepare.load_manifest(str(old)), 2) == [counts[0], 0]
  assert heldout_sets.make_eval_sets(str(old), 64, 8, 2, [0.7, 0.3]).suffixes == [""]
  manifest["inputs"]["first_files"] = [corpus[0], "elsewhere.parquet"]  # another first file
  (old / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(DataError, match="holds data of other inputs"):
    streaming.ensure_heldout_dir(cfg, str(old))
  one = tmp_path / "one.jsonl"
  one.write_text(json.dumps({"text": "a single document"}) + "\n")
  cfg.data.input, cfg.data.weights = str(one), ""
  with pytest.raises(DataError, match=r"nothing can be held out.*a \.txt or \.md file is one "
                     r"document.*--config\.data\.val_fraction=0"):
    streaming.ensure_heldout_dir(cfg, str(tmp_path / "data1"))


STEPS = 8


@pytest.fixture(scope="module")
def streaming_config(corpus, tokenizer_path, tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "stream.py"
  path.write_text(textwrap.dedent(f"""
      from tests.conftest import train_config
      def get_config():
        c = train_config("", steps={STEPS}, checkpoint_every=2, eval_every=1000,
                         keep_checkpoints=10, log_every=1, eval_batches=1,
                         geometry_every=0)
        c.data.input, c.data.weights = {",".join(corpus)!r}, "0.7,0.3"
        c.data.streaming, c.data.tokenizer = True, {tokenizer_path!r}
        return c
  """))
  return str(path)


def test_killed_streaming_run_resumes_bitwise(streaming_config, tmp_path):
  whole = str(tmp_path / "whole")  # uninterrupted, in this process
  train.run(config_lib.load_config_file(streaming_config), whole)
  parts = str(tmp_path / "parts" / "run")
  run = Run(streaming_config, parts)
  run.wait_for(lambda: os.path.isdir(os.path.join(parts, "checkpoints", "2")), "checkpoint 2")
  run.proc.kill()
  run.finish()
  assert run.logged_step() < STEPS
  rc, out = Run(streaming_config, parts).finish()
  assert rc == 0 and f"done: step {STEPS}" in out and "resuming from step" in out, out
  assert "held out: the first" in out and "data mixture (share of tokens)" in out, out
  a, b = train_records(whole), train_records(parts)
  assert [r["step"] for r in b] == list(range(1, STEPS + 1))
  for key in ("loss", "ntp", "nitp", "grad_norm"):
    assert [r[key] for r in a] == [r[key] for r in b], key

  # The run evaluated on its held-out documents (as `evaluate` reads them:
  # pipeline.make_eval_batches of the run's data dir); export.hf ships its tokenizer.
  with open(os.path.join(whole, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [STEPS] and np.isfinite(evals[0]["ntp"])
  # Both sources evaluated; the headline is their 0.7 / 0.3 mix, as `evaluate` says.
  ev = evals[0]
  assert ev["ntp"] == pytest.approx(0.7 * ev["ntp_s0"] + 0.3 * ev["ntp_s1"], rel=1e-6)
  assert ev["tokens_s0"] > 0 and ev["tokens_s1"] > 0
  cli = evaluate.evaluate_run(whole)
  assert [cli["loss"], cli["ntp_s0"], cli["ntp_s1"]] == pytest.approx(
      [ev["ntp"], ev["ntp_s0"], ev["ntp_s1"]], rel=1e-6)
  _, cfg, params = ckpt_lib.restore_params(whole)
  out = hf.export_from_params(params, cfg, str(tmp_path / "hf"), whole)
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_malformed_records_follow_data_max_bad_fraction(tmp_path):
  """The prepared path's policy while streaming: bad lines are skipped and
  counted, and a file with more of them than data.max_bad_fraction stops
  the run, naming the file and the first bad line."""
  path = tmp_path / "bad.jsonl"
  lines = [json.dumps({"text": f"document {i}"}) if i % 4 else "{not json" for i in range(40)]
  path.write_text("\n".join(lines) + "\n")
  unit = streaming.Unit(str(path))
  ok = [doc for _, doc in streaming.read_documents(unit, "text", max_bad_fraction=0.3)]
  assert ok == [f"document {i}" for i in range(40) if i % 4]
  with pytest.raises(DataError, match=r"10 of 40 records are malformed.*bad\.jsonl:1"):
    list(streaming.read_documents(unit, "text", max_bad_fraction=0.01))


GS_STEPS = 6


def _gs_config(base: str, **data) -> config_lib.ml_collections.ConfigDict:
  cfg = train_config("", steps=2)
  cfg.data.input, cfg.data.weights = f"{base}/code,{base}/web/*.parquet", "0.7,0.3"
  cfg.data.streaming, cfg.data.tokenizer = True, f"{base}/tokenizer.model"
  cfg.data.update(data)
  return cfg


@pytest.mark.parametrize("field,value,error,message", [
    ("input", "{base}/code/missing.jsonl.zst", DataError, "'{base}/code/missing.jsonl.zst' "
     "does not exist"),
    ("input", "{base}/code,{base}/none/*.parquet", DataError, "'{base}/none/\\*.parquet': "
     "the glob matches no"),
    ("input", "gs://no-such-bucket/code", errors.StorageError, "bucket gs://no-such-bucket "
     "does not exist"),
    ("tokenizer", "{base}/missing.model", DataError, "tokenizer '{base}/missing.model' does "
     "not exist")])
def test_gs_input_errors_are_one_line(gs_corpus, tmp_path, field, value, error, message):
  """What `train` prints as `error: <line>` (exit 2) for a missing object, an
  empty glob, a missing bucket and a missing tokenizer in gs://."""
  cfg = _gs_config(gs_corpus, **{field: value.format(base=gs_corpus)})
  with pytest.raises(error, match=message.format(base=gs_corpus)) as e:
    streaming.ensure_heldout_dir(cfg, str(tmp_path / "data"))
  assert isinstance(e.value, errors.UserError) and "\n" not in errors.one_line(e.value)


def test_gs_tokenizer_serves_prepare_too(gs_corpus, tokenizer_path, tmp_path):
  """data.tokenizer=gs://... on the prepared path: its local copy is the one used."""
  manifest = prepare.prepare(f"{gs_corpus}/code", str(tmp_path / "p"), 512,
                             tokenizer_path=f"{gs_corpus}/tokenizer.model", val_fraction=0)
  assert manifest["inputs"]["tokenizer_sha256"] == tok_lib.sha256_file(tokenizer_path)
  assert manifest["documents"]["train"] == 150


def _sources_in(batches, tokenizer) -> set[str]:
  """Which sources' documents ('A' or 'B' markers) the batches hold."""
  text = " ".join(tokenizer.decode(row) for b in batches for row in b["tokens"])
  return set(re.findall(r"\b([AB])\d+ ", text))


def test_gs_streaming_run_resumes_bitwise(gs_corpus, tmp_path):
  """A pod's run: sources, tokenizer and workdir in gs://. It reads both
  sources, writes its held-out set to the bucket, and a run killed after a
  checkpoint resumes to the same losses as an uninterrupted one."""
  config_file = tmp_path / "cfg.py"
  config_file.write_text(textwrap.dedent(f"""
      from tests.test_streaming import _gs_config
      def get_config():
        c = _gs_config({gs_corpus!r})
        c.train.update(steps={GS_STEPS}, checkpoint_every=3, eval_every=1000,
                       keep_checkpoints=10, log_every=1, eval_batches=1, geometry_every=0)
        return c
  """))
  cfg = config_lib.load_config_file(str(config_file))
  whole, parts = f"gs://{BUCKET}/streaming-runs/whole", f"gs://{BUCKET}/streaming-runs/parts"
  train.run(cfg, whole)

  run = _train(str(config_file), parts, _env())
  committed = storage.join(parts, "checkpoints", "3", "commit_success.txt")
  deadline = time.time() + 120
  while not (storage.exists(committed) and
             any(r["step"] == 3 for r in _records_or_none(parts))):
    assert run.poll() is None, run.communicate()[1][-3000:]
    assert time.time() < deadline, "timed out waiting for the checkpoint of step 3"
    time.sleep(0.05)
  run.kill()
  _finish(run)
  held_out = storage.join(layout.data_dir(cfg, parts), "manifest.json")
  generation = storage._fs().info(held_out)["generation"]  # pylint: disable=protected-access
  # Resumed as on another host (an empty cache, the tokenizer fetched again):
  # the bucket's held-out set is reused, not uploaded again.
  rc, out, err = _finish(_train(str(config_file), parts,
                                _env(**{storage.CACHE_ENV: str(tmp_path / "host2")})))
  assert rc == 0 and f"done: step {GS_STEPS}" in out, err[-3000:]
  resumed = re.search(r"resuming from step (\d+)", out)
  assert resumed and int(resumed.group(1)) < GS_STEPS, out
  assert "streaming 2 source(s)" in out and "held out: the first" in out, out
  assert f"{gs_corpus}/web/*.parquet -> 0.300" in out, out  # the mixture line
  assert storage._fs().info(held_out)["generation"] == generation  # pylint: disable=protected-access
  a, b = _records(whole), _records(parts)
  assert [r["step"] for r in b] == list(range(1, GS_STEPS + 1))
  for key in ("loss", "ntp", "nitp", "grad_norm"):
    assert [r[key] for r in a] == [r[key] for r in b], key

  # The held-out set is in the bucket and was evaluated on; the training
  # batches hold documents of both sources.
  data_dir = layout.data_dir(cfg, whole)
  manifest = json.loads(storage.read_text(storage.join(data_dir, "manifest.json")))
  assert manifest["documents"]["validation"] > 0 and manifest["inputs"]["first_file"] == (
      f"{gs_corpus}/code/a.jsonl.zst")
  assert storage.exists(storage.join(data_dir, manifest["shards"]["validation"][0]))
  evals = _records(whole, "eval")
  assert [r["step"] for r in evals] == [GS_STEPS] and np.isfinite(evals[0]["ntp"])
  batches = take(streaming.make_train_iterator(cfg, data_dir, config_lib.order_seed(cfg)), 4)
  tokenizer = tok_lib.load_tokenizer(streaming.require_tokenizer(cfg.data))
  assert _sources_in(batches, tokenizer) == {"A", "B"}
  assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "gs:")), "a local gs: folder was made"


def _records_or_none(workdir):
  try:
    return _records(workdir)
  except FileNotFoundError:
    return []
