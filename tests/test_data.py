"""Data: tokenizer round trips, corpus errors, prepare, Grain pipeline."""

import collections
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from nitp_jax.data import corpus as corpus_lib
from nitp_jax.data import pipeline
from nitp_jax.data import prepare as prepare_lib
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.data.corpus import DataError
from tests.helpers import same_batches, take

VOCAB = 400
SEQ = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRICKY = ("  leading spaces\n\ttab\t\tand  runs    of spaces  \n\n\n"
          "emoji 😀🚀👩‍💻 CJK 日本語のテキスト 中文 한국어 ünïcödé ß ﬁ Å\r\n"
          "zero\u200bwidth, combining e\u0301, rtl مرحبا, math ∑∫√ \x7f end  ")


def _documents(seed: int = 0) -> list[str]:
  """Deterministic synthetic documents of very different lengths."""
  rng = random.Random(seed)
  sylls = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zu", "pe", "de",
           "an", "or", "is"]
  seps = [" ", " ", " ", "  ", "\n", "\t", ", ", ". "]
  docs = []
  for _ in range(48):
    words = rng.choice([3, 12, 40, 150])
    docs.append("".join(
        "".join(rng.choice(sylls) for _ in range(rng.randint(1, 4)))
        + rng.choice(seps) for _ in range(words)))
  return docs + [TRICKY]


def _write_corpus(path, docs):
  """Text files plus one jsonl holding the last 8 documents."""
  path.mkdir()
  for i, doc in enumerate(docs[:-8]):
    (path / f"doc{i:03d}.{'md' if i % 5 == 0 else 'txt'}").write_text(
        doc, encoding="utf-8")
  with open(path / "more.jsonl", "w", encoding="utf-8") as f:
    for doc in docs[-8:]:
      f.write(json.dumps({"text": doc, "id": 1}) + "\n")
  return path


@pytest.fixture(scope="module")
def docs():
  return _documents()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, docs):
  d = _write_corpus(tmp_path_factory.mktemp("c") / "corpus", docs)
  (d / "blob.txt").write_bytes(b"abc\0\x01\x02binary")
  (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with open(d / "more.jsonl", "a") as f:
    f.write("{not json\n")
  (d / "ignored.bin").write_bytes(b"\0\0")
  return d


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_dir):
  out = str(tmp_path_factory.mktemp("p") / "prepared")
  manifest = prepare_lib.prepare(str(corpus_dir), out, VOCAB,  # 3 bad of 52
                                 val_fraction=0.1, seed=0, workers=1, max_bad_fraction=0.1)
  return out, manifest


@pytest.fixture(scope="module")
def tokenizer(prepared):
  return tok_lib.load_tokenizer(os.path.join(prepared[0], "tokenizer.model"))


def _pieces(ids, seq_len=SEQ):
  return [tuple(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]


def _batch_pieces(batches):
  """Every segment of every row, as a tuple of token ids."""
  out = []
  for b in batches:
    for tokens, seg in zip(b["tokens"], b["segment_ids"]):
      for s in range(1, seg.max() + 1):
        out.append(tuple(tokens[seg == s].tolist()))
  return out


def _epoch(prepared_dir, seed=0, index=0, count=1, batch=4, **kw):
  it = pipeline.make_train_iterator(prepared_dir, SEQ, batch, seed, index,
                                    count, num_epochs=1, **kw)
  return list(it)


# Tokenizer -----------------------------------------------------------------

def test_tokenizer_round_trips_arbitrary_text(tokenizer, docs):
  texts = [TRICKY, " ", "\n", "\t\t", "   x   ", "😀", "\U0001f9ec\U000e0001",
           "a\n\n\nb", "12345678901234567890", ""] + docs
  for text in texts:
    assert tokenizer.decode(tokenizer.encode(text)) == text, repr(text)


def test_tokenizer_ids(tokenizer):
  assert tokenizer.vocab_size == VOCAB
  assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 3)
  assert tokenizer.encode("\n") == tokenizer.encode("\n\n")[:1]
  assert len(tokenizer.encode("\n\n")) == 2


def test_check_fits():
  tok_lib.check_fits(400, 400)
  with pytest.raises(DataError, match=r"500 tokens.*vocab_size is 400.*"
                     r"--config\.model\.vocab_size=500"):
    tok_lib.check_fits(500, 400)


def test_tokenizer_too_large_for_model_is_an_error(prepared, corpus_dir,
                                                   tmp_path):
  model = os.path.join(prepared[0], "tokenizer.model")
  with pytest.raises(DataError, match="--config.model.vocab_size=400"):
    prepare_lib.prepare(str(corpus_dir), str(tmp_path / "o"), 300,
                        tokenizer_path=model, workers=1, max_bad_fraction=0.1)


def test_vocab_too_high_or_too_low_is_a_clear_error(tmp_path):
  texts = ["hello world, a tiny corpus"] * 10
  with pytest.raises(DataError, match=r"too small for a tokenizer.*at most"):
    tok_lib.train_tokenizer(texts, 5000, str(tmp_path / "a"))
  with pytest.raises(DataError, match=r"vocab_size=100 is too small"):
    tok_lib.train_tokenizer(texts, 100, str(tmp_path / "b"))


# Corpus ---------------------------------------------------------------------

def test_corpus_reads_documents_and_counts_bad_files(corpus_dir, docs,
                                                     prepared):
  c = corpus_lib.open_corpus(str(corpus_dir), max_bad_fraction=0.1)
  assert sorted(c) == sorted(docs)
  reasons = {os.path.basename(p): r for p, r in c.skipped}
  assert set(reasons) == {"blob.txt", "latin1.txt", "more.jsonl:9"}
  assert "binary" in reasons["blob.txt"]
  assert "UTF-8" in reasons["latin1.txt"]
  assert "JSON" in reasons["more.jsonl:9"]
  manifest = prepared[1]
  assert manifest["skipped_count"] == 3
  assert sum(manifest["documents"].values()) == len(docs)


def test_corpus_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    list(corpus_lib.open_corpus(str(tmp_path / "missing")))
  with pytest.raises(DataError, match="glob matches no file"):
    corpus_lib.open_corpus(str(tmp_path / "*.txt"))
  (tmp_path / "e").mkdir()
  (tmp_path / "e" / "a.txt").write_text("")
  (tmp_path / "e" / "b.txt").write_text("  \n ")
  with pytest.raises(DataError, match=r"is empty.*2 blank"):
    list(corpus_lib.open_corpus(str(tmp_path / "e")))
  with pytest.raises(DataError, match="is empty"):
    prepare_lib.prepare(str(tmp_path / "e"), str(tmp_path / "o"), VOCAB)
  (tmp_path / "x.bin").write_bytes(b"\x89PNG\0\0")
  with pytest.raises(DataError, match=r"x\.bin: is binary"):
    list(corpus_lib.open_corpus(str(tmp_path / "x.bin")))
  (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
  with pytest.raises(DataError, match=r"bad\.txt: is not valid UTF-8"):
    list(corpus_lib.open_corpus(str(tmp_path / "bad.txt")))
  (tmp_path / "b.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  with pytest.raises(DataError, match=r"line 2 has no string field 'text'"):
    list(corpus_lib.open_corpus(str(tmp_path / "b.jsonl")))
  (tmp_path / "c.jsonl").write_text('{"body": "b"}\n\n')
  assert list(corpus_lib.open_corpus(str(tmp_path / "c.jsonl"), "body")) == [
      "b"]
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a.png").write_bytes(b"\0")
  with pytest.raises(DataError, match="has no .txt/.md/.jsonl/.jsonl.gz/.jsonl.zst/.parquet file"):
    corpus_lib.open_corpus(str(tmp_path / "d"))


def test_default_corpus_is_stdlib_plus_pydoc_topics():
  c = corpus_lib.default_corpus()
  assert c.name.startswith("default:python-")
  assert len(c.files) > 500 and c.files == sorted(c.files)
  assert not any("site-packages" in str(p) for p in c.files)
  assert len(c.extra) > 50
  assert corpus_lib.open_corpus("").fingerprint() == c.fingerprint()


# Prepare --------------------------------------------------------------------

def test_prepare_is_a_noop_when_done_and_refuses_other_inputs(prepared,
                                                             corpus_dir):
  out, manifest = prepared
  mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns
            for n in os.listdir(out)}
  again = prepare_lib.prepare(str(corpus_dir), out, VOCAB, val_fraction=0.1,
                              seed=0, workers=1, max_bad_fraction=0.2)  # not an input
  assert again == manifest
  assert mtimes == {n: os.stat(os.path.join(out, n)).st_mtime_ns
                    for n in os.listdir(out)}
  with pytest.raises(DataError, match=r"other inputs \(seed: 0 -> 1\)"):
    prepare_lib.prepare(str(corpus_dir), out, VOCAB, val_fraction=0.1, seed=1,
                        max_bad_fraction=0.1)


def test_ensure_prepared_and_cli_with_given_tokenizer(prepared, corpus_dir,
                                                      tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  model = os.path.join(prepared[0], "tokenizer.model")
  cfg = ml_collections.ConfigDict(dict(
      input=str(corpus_dir / "*.txt"), tokenizer=model, text_field="text",
      val_fraction=0.0, seed=0, prepare_workers=1, max_bad_fraction=0.1))  # 2 bad of 34
  out = str(tmp_path / "o")
  m = prepare_lib.ensure_prepared(cfg, 512, out)
  assert m["documents"]["validation"] == 0 and not m["tokenizer"]["trained"]
  assert m["tokenizer"]["sha256"] == prepared[1]["tokenizer"]["sha256"]
  assert prepare_lib.ensure_prepared(cfg, 1024, out) == m  # still fits
  assert pipeline.make_eval_batches(out, SEQ, 4, 1) == []  # nothing held out
  proc = subprocess.run(
      [sys.executable, "-m", "nitp_jax.data.prepare", f"--input={cfg.input}",
       f"--output={out}", f"--tokenizer={model}", "--val_fraction=0",
       "--max_bad_fraction=0.1"],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert json.loads(proc.stdout.strip().splitlines()[-1])["documents"] == \
      m["documents"]


# Pipeline -------------------------------------------------------------------

def test_one_epoch_yields_every_token_once(prepared, tokenizer):
  out, manifest = prepared
  expected = []
  for doc in corpus_lib.open_corpus(manifest["inputs"]["input"], max_bad_fraction=0.1):
    expected += _pieces(tokenizer.encode(doc) + [tokenizer.eos_id])
  train = _batch_pieces(_epoch(out))
  val = _batch_pieces(pipeline.make_eval_batches(out, SEQ, 4, 10_000))
  assert collections.Counter(train + val) == collections.Counter(expected)
  assert len(train) > len(val) > 0
  assert sum(map(len, train)) == manifest["tokens"]["train"]


def test_two_processes_partition_each_epoch(prepared):
  out = prepared[0]
  single = _batch_pieces(_epoch(out, batch=4))
  p0 = _epoch(out, index=0, count=2, batch=4)
  p1 = _epoch(out, index=1, count=2, batch=4)
  assert p0[0]["tokens"].shape == (2, SEQ)
  a, b = _batch_pieces(p0), _batch_pieces(p1)
  assert collections.Counter(a + b) == collections.Counter(single)
  assert a and b and a != b


def test_packing_keeps_documents_apart(prepared, tokenizer):
  batches = take(pipeline.make_train_iterator(prepared[0], SEQ, 4, 0, 0, 1),
                  40)
  eos, multi = tokenizer.eos_id, 0
  for b in batches:
    assert set(b) == {"tokens", "segment_ids", "positions"}
    for k in b:
      assert b[k].dtype == np.int32 and b[k].shape == (4, SEQ)
    for tokens, seg, pos in zip(b["tokens"], b["segment_ids"], b["positions"]):
      n = int(np.count_nonzero(seg))
      assert np.all(seg[n:] == 0) and np.all(tokens[n:] == 0)
      assert np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
      assert seg[0] == 1
      multi += seg.max() > 1
      for s in range(1, seg.max() + 1):
        where = seg == s
        np.testing.assert_array_equal(pos[where], np.arange(where.sum()))
        eos_at = np.flatnonzero(tokens[where] == eos)
        # A document's EOS can only be its last token: no segment spans two.
        assert eos_at.size == 0 or list(eos_at) == [where.sum() - 1]
  assert multi > 0  # some rows really hold several documents


def test_determinism_and_seed(prepared):
  out = prepared[0]
  make = lambda seed: pipeline.make_train_iterator(out, SEQ, 4, seed, 0, 1)
  a, b, c = take(make(0), 6), take(make(0), 6), take(make(1), 6)
  assert same_batches(a, b)
  assert not same_batches(a, c)


def test_each_epoch_is_a_new_partition_of_the_documents(prepared):
  out, manifest = prepared
  n = manifest["documents"]["train"]
  key = lambda doc: tuple(doc.tolist())
  everything = collections.Counter(
      key(d) for d in pipeline.local_documents(out, 0, 0, 1, num_epochs=1))
  assert sum(everything.values()) == n
  orders = []
  for epoch in range(2):
    parts = [[key(d) for d in
              pipeline.local_documents(out, 0, p, 3)[epoch * k:(epoch + 1) * k]]
             for p, k in ((p, len(range(p, n, 3))) for p in range(3))]
    assert collections.Counter(sum(parts, [])) == everything
    orders.append(parts)
  assert orders[0] != orders[1]  # reshuffled every epoch


def test_training_data_runs_on_past_an_epoch(prepared):
  out = prepared[0]
  epoch = _epoch(out)
  it = pipeline.make_train_iterator(out, SEQ, 4, 0, 0, 1)
  assert same_batches(take(it, len(epoch) - 1), epoch[:-1])
  for b in take(it, 2 * len(epoch)):
    assert np.mean(b["segment_ids"] > 0) > 0.5


def test_iterator_state_restores_exactly(prepared):
  out = prepared[0]
  it = pipeline.make_train_iterator(out, SEQ, 4, 0, 0, 1)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  after = take(it, 10)
  fresh = pipeline.make_train_iterator(out, SEQ, 4, 0, 0, 1)
  fresh.set_state(state)
  assert same_batches(take(fresh, 10), after)


def test_iterator_state_in_orbax_checkpoint(prepared, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = prepared[0]
  it = pipeline.make_train_iterator(out, SEQ, 4, 0, 0, 1)
  take(it, 5)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(5, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  after = take(it, 6)
  fresh = pipeline.make_train_iterator(out, SEQ, 4, 0, 0, 1)
  mngr.restore(5, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(fresh)))
  assert same_batches(take(fresh, 6), after)
  mngr.close()


def test_eval_batches_are_fixed(prepared):
  a = pipeline.make_eval_batches(prepared[0], SEQ, 4, 2)
  b = pipeline.make_eval_batches(prepared[0], SEQ, 4, 2)
  assert len(a) == 2 and same_batches(a, b)
  assert a[0]["tokens"].shape == (4, SEQ)


def test_pipeline_argument_errors(prepared, tmp_path):
  with pytest.raises(DataError, match="not divisible by the 3 processes"):
    pipeline.make_train_dataset(prepared[0], SEQ, 4, 0, 0, 3)
  with pytest.raises(DataError, match="not a prepared data directory"):
    pipeline.make_train_dataset(str(tmp_path), SEQ, 4, 0, 0, 1)


def test_grain_worker_processes_are_deterministic_and_resumable(prepared):
  out = prepared[0]
  make = lambda: pipeline.make_train_iterator(out, SEQ, 4, 0, 0, 1,
                                              worker_count=2)
  it = make()
  first = take(it, 8)
  state = json.loads(json.dumps(it.get_state()))
  after = take(it, 4)
  again = make()
  assert same_batches(take(again, 12), first + after)
  again.set_state(state)
  assert same_batches(take(again, 4), after)
  epoch = _epoch(out, worker_count=2)
  assert collections.Counter(_batch_pieces(epoch)) == collections.Counter(
      _batch_pieces(_epoch(out)))


def _documents_per_batch(batches, docs) -> list[int]:
  """How many distinct documents each batch's pieces come from."""
  owner = {piece: i for i, doc in enumerate(docs) for piece in _pieces(doc.tolist())}
  out = []
  for b in batches:
    pieces = _batch_pieces([b])
    out.append(len({owner[p] for p in pieces}))
  return out


def test_piece_shuffle_mixes_documents_and_keeps_every_piece(prepared):
  out = prepared[0]
  docs = list(pipeline.local_documents(out, 0, 0, 1, num_epochs=1))
  ordered = _epoch(out, batch=4)
  shuffled = _epoch(out, batch=4, shuffle_window=64)
  # The same pieces, each once per epoch, packed into other batches.
  assert collections.Counter(_batch_pieces(shuffled)) == collections.Counter(
      _batch_pieces(ordered))
  assert not same_batches(shuffled, ordered)
  before = np.mean(_documents_per_batch(ordered, docs))
  after = np.mean(_documents_per_batch(shuffled, docs))
  assert after > 1.5 * before, (before, after)


def test_piece_shuffle_resumes_exactly_mid_window(prepared):
  out = prepared[0]
  make = lambda: pipeline.make_train_iterator(out, SEQ, 4, 0, 0, 1, shuffle_window=16)
  for skip in (1, 5, 9):
    it = make()
    take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    after = take(it, 8)
    fresh = make()
    fresh.set_state(state)
    assert same_batches(take(fresh, 8), after), skip
