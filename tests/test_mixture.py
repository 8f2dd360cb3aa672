"""Prepared data from several sources: mixtures by weight (shares of tokens,
deterministic, resumable), pre-tokenized inputs (Parquet lists of ids,
ArrayRecord id records) and gs:// inputs (the GCS emulator of
test_object_storage)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module

from nitp_jax import storage
from nitp_jax.data import heldout, pipeline
from nitp_jax.data import prepare as prepare_lib
from nitp_jax.errors import DataError
from tests.test_object_storage import BUCKET, emulator  # noqa: F401  # pylint: disable=unused-import
from tests.helpers import same_batches, take

VOCAB = 301            # "<|endoftext|>" = 0, then w1 ... w300
EOS = 0
A_IDS, B_IDS = (1, 150), (150, 301)   # source 0's ids, source 1's ids
SEQ, BATCH = 32, 4


def _word_level_json(directory) -> str:
  """A tokenizer.json whose ids are known: "wN" -> N, EOS 0 (built with the
  `tokenizers` library, no download)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  return path


def _docs(rng, count, ids, lengths):
  return [rng.integers(*ids, size=rng.integers(*lengths)).astype(np.int32)
          for _ in range(count)]


def _write_parquet(path, docs, column="text"):
  pq.write_table(pa.table({column: pa.array([d.tolist() for d in docs],
                                            type=pa.list_(pa.int32()))}), path)


def _write_array_record(path, docs):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for d in docs:
    writer.write(d.astype("<i4").tobytes())
  writer.close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Source 0: Parquet of short documents (5-35 ids from A_IDS); source 1:
  ArrayRecord of long ones (30-90 ids from B_IDS, half ending in EOS)."""
  root = tmp_path_factory.mktemp("sources")
  rng = np.random.default_rng(0)
  a = _docs(rng, 120, A_IDS, (5, 36))
  b = _docs(rng, 40, B_IDS, (30, 91))
  b = [np.append(d, EOS).astype(np.int32) if i % 2 else d for i, d in enumerate(b)]
  (root / "a").mkdir()
  _write_parquet(root / "a" / "part-0.parquet", a[:70])
  _write_parquet(root / "a" / "part-1.parquet", a[70:])
  _write_array_record(root / "b.array_record", b)
  return {"tokenizer": _word_level_json(str(root)), "a": a, "b": b,
          "spec": f"{root / 'a'},{root / 'b.array_record'}"}


@pytest.fixture(scope="module")
def mixed_dir(sources, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mixed") / "prepared")
  prepare_lib.prepare(sources["spec"], out, VOCAB, tokenizer_path=sources["tokenizer"],
                      val_fraction=0.05, seed=0, workers=1)
  return out


def _source_of(token: int) -> int:
  return 0 if A_IDS[0] <= token < A_IDS[1] else 1


def _token_shares(batches) -> float:
  """Share of source 0 in the batches' tokens (EOS counted with its piece;
  pieces that hold only EOS are left out)."""
  counts = [0, 0]
  for b in batches:
    for tokens, seg in zip(b["tokens"], b["segment_ids"]):
      for s in range(1, seg.max() + 1):
        piece = tokens[seg == s]
        words = piece[piece != EOS]
        if words.size:
          counts[_source_of(int(words[0]))] += piece.size
  return counts[0] / sum(counts)


def _iterator(prepared, weights, seed=0, window=16):
  return pipeline.make_train_iterator(prepared, SEQ, BATCH, seed, 0, 1,
                                      shuffle_window=window, weights=weights)


def test_prepare_keeps_each_documents_source_and_the_unweighted_order(sources, mixed_dir):
  manifest = prepare_lib.load_manifest(mixed_dir)
  assert [s["shards"]["train"] for s in manifest["sources"]] == [
      ["train-s0-00000.array_record"], ["train-s1-00000.array_record"]]
  assert manifest["shards"]["train"] == ["train-s0-00000.array_record",
                                         "train-s1-00000.array_record"]
  # The concatenated shards hold the documents in corpus order, as the single
  # shard sequence did before per-source shards, so the unweighted order is
  # unchanged: EOS appended once (not to records that end with it already).
  plans = heldout.plan_sources([120, 40], 0.05, 0)  # each source split on its own
  val = plans[0].ids | {120 + i for i in plans[1].ids}
  expected = [d if d[-1] == EOS else np.append(d, EOS)
              for i, d in enumerate(sources["a"] + sources["b"]) if i not in val]
  got = list(pipeline._documents(mixed_dir, "train"))  # pylint: disable=protected-access
  assert len(got) == len(expected) and all(np.array_equal(g, e) for g, e in zip(got, expected))
  per_source = [s["documents"]["train"] + s["documents"]["validation"]
                for s in manifest["sources"]]
  assert per_source == [120, 40]
  assert sum(s["tokens"]["train"] for s in manifest["sources"]) == manifest["tokens"]["train"]


def test_each_source_holds_out_its_own_share(sources, mixed_dir, tmp_path):
  # The corpus-wide split gave source 1 one of 160 * 0.05 = 8 documents (7 + 1);
  # per source it is max(1, round(n_i * 0.05)) of each.
  assert sorted(heldout.plan(160, 0.05, 0).ids) == [20, 38, 43, 47, 59, 61, 70, 122]
  manifest = prepare_lib.load_manifest(mixed_dir)
  assert [s["documents"]["validation"] for s in manifest["sources"]] == [6, 2]
  assert manifest["heldout"] == {"mode": heldout.DOCUMENTS, "val_fraction": 0.05}
  # A tiny source gets one document, a single-document one its tails.
  spec = []
  for name, count in (("big", 40), ("tiny", 3), ("one", 1)):
    (tmp_path / f"{name}.jsonl").write_text("".join(
        json.dumps({"text": " ".join(f"w{(i * 7 + j) % 299 + 1}" for j in range(12))}) + "\n"
        for i in range(count)))
    spec.append(str(tmp_path / f"{name}.jsonl"))
  out = str(tmp_path / "p")
  m = prepare_lib.prepare(",".join(spec), out, VOCAB, tokenizer_path=sources["tokenizer"],
                          val_fraction=0.05, seed=0, workers=1)
  assert [s["documents"] for s in m["sources"]] == [
      {"train": 38, "validation": 2}, {"train": 2, "validation": 1},
      {"train": 1, "validation": 1}]
  assert [s["heldout"]["mode"] for s in m["sources"]] == [heldout.DOCUMENTS] * 2 + [heldout.TAILS]
  assert m["heldout"] == {"mode": heldout.MIXED, "val_fraction": 0.05}
  assert m["sources"][2]["tokens"] == {"train": 11, "validation": 2}  # 12 words + EOS
  assert prepare_lib.report_lines(out) == [
      f"held out: 4 of 44 documents ({m['tokens']['validation']} tokens, "
      f"--config.data.val_fraction=0.05); per source: {spec[0]} 2 of 40, {spec[1]} 1 of 3, "
      f"{spec[2]} 1 of 1 (the last 5% of their tokens: too few documents to hold out "
      "whole ones)"]
  # A directory prepared before per-source splits is reused with its split.
  old = {**m, "heldout": {"mode": heldout.DOCUMENTS, "val_fraction": 0.05},
         "sources": [{k: v for k, v in s.items() if k != "heldout"} for s in m["sources"]]}
  (tmp_path / "p" / "manifest.json").write_text(json.dumps(old))
  assert prepare_lib.prepare(",".join(spec), out, VOCAB, tokenizer_path=sources["tokenizer"],
                             val_fraction=0.05, seed=0, workers=1) == old
  assert "; per source (split over the whole corpus; a new --config.data.prepared_dir " \
         f"splits each source): {spec[0]} 2 of 40," in prepare_lib.report_lines(out)[0]


def test_held_out_plans_per_source_and_for_one_source_as_before():
  for n in (1, 2, 3, 19, 20, 21, 60, 1001):
    assert heldout.plan_sources([n], 0.05, 3) == [heldout.plan(n, 0.05, 3)]
    assert heldout.to_json([heldout.plan(n, 0.05, 3)]) == heldout.plan(n, 0.05, 3).to_json()
  counts = [1, 2, 3, 19, 20, 31, 1001]
  plans = heldout.plan_sources(counts, 0.05, 3)
  assert [p.mode for p in plans] == [heldout.TAILS] + [heldout.DOCUMENTS] * 6
  assert [len(p.ids) for p in plans[1:]] == [max(1, round(n * 0.05)) for n in counts[1:]]
  assert all(max(p.ids) < n for p, n in zip(plans[1:], counts[1:]))
  assert plans[5].ids != heldout.plan_sources([1001, 31], 0.05, 3)[1].ids  # own stream each
  assert plans == heldout.plan_sources(counts, 0.05, 3)                     # seeded
  assert plans != heldout.plan_sources(counts, 0.05, 4)
  assert {p.mode for p in heldout.plan_sources(counts, 0.0, 3)} == {heldout.NONE}
  empty = heldout.plan_sources([5, 0], 0.2, 3)  # its files all read by source 0
  assert heldout.to_json(empty)["mode"] == heldout.DOCUMENTS and not empty[1].ids


def test_weights_are_shares_of_tokens_deterministic_and_resumable(mixed_dir):
  batches = take(_iterator(mixed_dir, [0.8, 0.2]), 80)
  # 80 batches = 10,240 token slots: ~390 source-0 and ~34 source-1 documents.
  # grain's interleave is exact up to its integer proportions (~1%); what is
  # left is the spread of the drawn documents' lengths around the manifest's
  # mean and the ~20 pieces held in the shuffle window and packing bins.
  # Measured for seeds 0-3: within 0.011 of the weight at 60 batches, 0.005 at
  # 150. Mixing documents (not tokens) 0.8/0.2 would give a share near 0.57.
  share = _token_shares(batches)
  assert abs(share - 0.8) < 0.02, share
  assert abs(_token_shares(take(_iterator(mixed_dir, [0.5, 0.5]), 60)) - 0.5) < 0.02
  assert same_batches(take(_iterator(mixed_dir, [0.8, 0.2]), 20), batches[:20])  # same seed
  assert not same_batches(take(_iterator(mixed_dir, [0.8, 0.2], seed=1), 20), batches[:20])
  it = _iterator(mixed_dir, [0.8, 0.2])
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  resumed = _iterator(mixed_dir, [0.8, 0.2])
  resumed.set_state(state)
  assert same_batches(take(resumed, 10), batches[7:17])
  assert "a -> 0.800 (" in pipeline.describe_mixture(mixed_dir, [0.8, 0.2])


def test_weights_need_a_directory_prepared_per_source(mixed_dir, tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  for name in os.listdir(mixed_dir):
    os.symlink(os.path.join(mixed_dir, name), old / name)
  manifest = prepare_lib.load_manifest(mixed_dir)
  del manifest["sources"]  # as prepared before per-source shards
  os.remove(old / "manifest.json")
  (old / "manifest.json").write_text(json.dumps(manifest))
  assert next(_iterator(str(old), None))["tokens"].shape == (BATCH, SEQ)  # still loads
  from nitp_jax.data import heldout_sets  # pylint: disable=import-outside-toplevel
  one = heldout_sets.make_eval_sets(str(old), SEQ, BATCH, 2, [0.8, 0.2])  # one set, as before
  assert one.suffixes == [""] and same_batches(one.batches[0],
                                        pipeline.make_eval_batches(str(old), SEQ, BATCH, 2))
  with pytest.raises(DataError, match="not prepared per source.*data.prepared_dir"):
    _iterator(str(old), [0.8, 0.2])
  with pytest.raises(DataError, match="3 weights but .* 2 sources"):
    _iterator(mixed_dir, [0.2, 0.3, 0.5])


def test_pre_tokenized_needs_its_tokenizer_and_ids_inside_it(sources, tmp_path):
  with pytest.raises(DataError, match=r"part-0.parquet holds token ids: pass the tokenizer "
                     r"they came from with --config.data.tokenizer=FILE"):
    prepare_lib.prepare(sources["spec"], str(tmp_path / "p1"), VOCAB)
  bad = tmp_path / "bad.parquet"
  _write_parquet(bad, [np.array([5, 7], np.int32), np.array([3, 301], np.int32)])
  with pytest.raises(DataError, match=r"bad.parquet: token id 301 is outside the "
                     r"tokenizer's vocabulary \[0, 301\)"):
    prepare_lib.prepare(str(bad), str(tmp_path / "p2"), VOCAB,
                        tokenizer_path=sources["tokenizer"], val_fraction=0)


def test_text_and_token_sources_mix(sources, tmp_path):
  (tmp_path / "t.jsonl").write_text('{"text": "w3 w4 w5"}\n{"text": "w6"}\n')
  tokens = tmp_path / "ids.parquet"
  _write_parquet(tokens, [np.array([7, 8], np.int32)])
  m = prepare_lib.prepare(f"{tmp_path / 't.jsonl'},{tokens}", str(tmp_path / "p"), VOCAB,
                          tokenizer_path=sources["tokenizer"], val_fraction=0)
  docs = [d.tolist() for d in pipeline._documents(str(tmp_path / "p"), "train")]  # pylint: disable=protected-access
  assert docs == [[3, 4, 5, EOS], [6, EOS], [7, 8, EOS]]
  assert [s["documents"]["train"] for s in m["sources"]] == [2, 1]


def test_gs_inputs_glob_directory_and_token_file(emulator, sources, tmp_path):  # pylint: disable=redefined-outer-name
  base = f"gs://{BUCKET}/corpus-inputs"
  storage.write_text(f"{base}/x/1.jsonl", '{"text": "w1 w2"}\n{"text": "w3"}\n')
  storage.write_text(f"{base}/x/2.jsonl", '{"text": "w4"}\n')
  storage.write_text(f"{base}/x/skip.txt", "w9")  # not matched by the glob
  storage.write_text(f"{base}/d/sub/3.jsonl", '{"text": "w5 w6"}\n')
  ids = tmp_path / "ids.array_record"
  _write_array_record(ids, [np.array([7, 8, EOS], np.int32)])
  storage.upload(str(ids), f"{base}/ids.array_record")
  _write_parquet(tmp_path / "4.parquet", [np.array([9, 10], np.int32)])
  storage.upload(str(tmp_path / "4.parquet"), f"{base}/d/sub/4.parquet")
  spec = f"{base}/x/*.jsonl,{base}/d,{base}/ids.array_record"
  out = str(tmp_path / "p")
  m = prepare_lib.prepare(spec, out, VOCAB, tokenizer_path=sources["tokenizer"],
                          val_fraction=0)
  docs = [d.tolist() for d in pipeline._documents(out, "train")]  # pylint: disable=protected-access
  assert docs == [[1, 2, EOS], [3, EOS], [4, EOS], [5, 6, EOS], [9, 10, EOS], [7, 8, EOS]]
  assert [s["documents"]["train"] for s in m["sources"]] == [3, 2, 1]
  # Same inputs: reused (the fingerprint reads object names and sizes).
  assert prepare_lib.prepare(spec, out, VOCAB, tokenizer_path=sources["tokenizer"],
                             val_fraction=0) == m
  with pytest.raises(DataError, match="glob matches no"):
    prepare_lib.prepare(f"{base}/none/*.jsonl", str(tmp_path / "q"), VOCAB,
                        tokenizer_path=sources["tokenizer"])


def test_a_weighted_run_logs_its_mixture_and_reads_it(sources, tmp_path, capsys):
  """train.py's Trainer: the mixture line at start, and its iterator is the
  weighted one (a whole training run costs ~25 s more and adds nothing the
  iterator's state round trip above and test_train's resume do not check)."""
  from nitp_jax import train  # pylint: disable=import-outside-toplevel
  from tests.conftest import train_config  # pylint: disable=import-outside-toplevel
  cfg = train_config(str(tmp_path / "prepared"), steps=2, geometry_every=0)
  cfg.data.input, cfg.data.tokenizer, cfg.data.weights = (sources["spec"],
                                                          sources["tokenizer"], "0.8,0.2")
  trainer = train.Trainer(cfg, str(tmp_path / "run"))
  try:
    out = capsys.readouterr().out
    assert "data mixture (share of tokens): " in out
    a, b = sources["spec"].split(",")
    assert f"; per source: {a} 12 of 120, {b} 4 of 40" in out  # val_fraction 0.1
    assert ("held-out loss per source, combined into the headline: "
            f"{sources['spec'].split(',')[0]} -> ntp_s0 (1 batch(es), weight 0.800)") in out
    assert trainer.heldout.suffixes == ["_s0", "_s1"]
    t = cfg.train
    expected = pipeline.make_train_iterator(
        trainer.data_dir, t.seq_len, t.global_batch, cfg.data.seed, 0, 1,
        shuffle_window=cfg.data.shuffle_window, weights=[0.8, 0.2])
    assert same_batches(take(trainer.train_iter, 3), take(expected, 3))
  finally:
    trainer.close()


def _source_tokens(batches) -> set[int]:
  """Which sources the batches' word tokens come from (EOS and padding left out)."""
  words = {int(t) for b in batches for t in b["tokens"][b["segment_ids"] > 0] if t != EOS}
  return {_source_of(t) for t in words}


def _with_manifest(prepared, manifest, tmp_path) -> str:
  """A copy of `prepared` (its files linked) with another manifest."""
  out = tmp_path / "edited"
  out.mkdir()
  for name in os.listdir(prepared):
    if name != "manifest.json":
      os.symlink(os.path.join(prepared, name), out / name)
  (out / "manifest.json").write_text(json.dumps(manifest))
  return str(out)


def test_eval_sets_are_per_source_and_weighted_by_data_weights(mixed_dir, tmp_path):
  from nitp_jax.data import heldout_sets  # pylint: disable=import-outside-toplevel
  manifest = prepare_lib.load_manifest(mixed_dir)
  sets = heldout_sets.make_eval_sets(mixed_dir, SEQ, BATCH, 100, [0.7, 0.3])
  assert sets.suffixes == ["_s0", "_s1"] and sets.weights == [0.7, 0.3]
  for i, batches in enumerate(sets.batches):  # only that source's tokens, all of them
    assert _source_tokens(batches) == {i}
    held = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert held == manifest["sources"][i]["tokens"]["validation"] > 0
  # Without weights: each source's share of the training tokens.
  train_tokens = [s["tokens"]["train"] for s in manifest["sources"]]
  assert heldout_sets.make_eval_sets(mixed_dir, SEQ, BATCH, 1).weights == pytest.approx(
      [t / sum(train_tokens) for t in train_tokens])
  # A source with nothing held out is left out; the others' weights renormalised.
  manifest["sources"][0]["documents"]["validation"] = 0
  only = heldout_sets.make_eval_sets(_with_manifest(mixed_dir, manifest, tmp_path), SEQ,
                                     BATCH, 100, [0.7, 0.3])
  assert only.suffixes == ["_s1"] and only.weights == [1.0]
  assert "a -> nothing held out, not evaluated; " in heldout_sets.describe(only, ["a", "b"])


def test_mixture_eval_combines_per_source_losses_by_weight(mixed_dir):
  """A real (untrained) model's eval: each source's numbers are those of its
  batches evaluated alone, the headline their weighted mean; with no weights
  to give (streaming) the combination is the pooled token-weighted mean."""
  import jax  # pylint: disable=import-outside-toplevel
  from nitp_jax import evaluate, jitted  # pylint: disable=import-outside-toplevel
  from nitp_jax.data import heldout_sets  # pylint: disable=import-outside-toplevel
  from tests.conftest import train_config  # pylint: disable=import-outside-toplevel
  cfg = train_config("")
  t = cfg.train
  steps = jitted.build(cfg, evaluate.eval_mesh(cfg))
  params = steps.init(jax.random.key(0))["params"]
  sets = heldout_sets.make_eval_sets(mixed_dir, t.seq_len, t.global_batch, 4, [0.7, 0.3])
  alone = [evaluate.heldout(steps, params, b) for b in sets.batches]
  got = evaluate.heldout_sets(steps, params, sets)
  for key in ("ntp", "nitp", "nitp_cos"):
    assert got[key] == pytest.approx(0.7 * alone[0][key] + 0.3 * alone[1][key], rel=1e-6)
    assert [got[f"{key}_s0"], got[f"{key}_s1"]] == [alone[0][key], alone[1][key]]
  assert got["tokens"] == alone[0]["tokens"] + alone[1]["tokens"]
  assert got["ppl"] == pytest.approx(np.exp(got["ntp"]))
  assert alone[0]["ntp"] != pytest.approx(alone[1]["ntp"], abs=1e-3)  # so weights matter
  pooled = heldout_sets.combine(alone, sets.suffixes, None)
  assert pooled["ntp"] == pytest.approx(
      evaluate.heldout(steps, params, sets.all_batches)["ntp"], rel=1e-6)
