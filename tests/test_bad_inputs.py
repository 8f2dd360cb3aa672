"""The bad-input catalogue: each wrong value, path, corpus or workdir gets one
clear line naming the problem, and nothing already on disk is changed."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from nitp_jax import errors
from nitp_jax import train
from tests.conftest import CORPUS_GLOB, train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(*dirs) -> dict:
  """Every file under `dirs` with its content hash."""
  out = {}
  for d in dirs:
    for root, _, files in os.walk(d):
      for name in files:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  (d / "empty").mkdir()
  (d / "empty" / "blank.txt").write_text("  \n\n\t \n")
  (d / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00data")
  (d / "latin1.txt").write_bytes("na\xefve caf\xe9".encode("latin-1"))
  (d / "no_text.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
  (d / "a_file").write_text("I am a file, not a directory")
  return d


def _cfg(prepared_dir, **data):
  cfg = train_config(prepared_dir, steps=2, eval_every=100)
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


def _set(cfg, dotted, value):
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  return cfg


# (id, builds (cfg, workdir) from (prepared_dir, bad_files dir, tmp_path), expected text)
CASES = [
    ("kv_heads", lambda p, b, t: (_set(_cfg(p), "model.num_kv_heads", 3), t / "w"),
     "config.model.num_kv_heads=3 is invalid: must divide model.num_heads=4"),
    ("target_layer", lambda p, b, t: (_set(_cfg(p), "nitp.target_layer", 7), t / "w"),
     "config.nitp.target_layer=7 is invalid: must be in [0, model.num_layers=2]"),
    ("nitp_loss", lambda p, b, t: (_set(_cfg(p), "nitp.loss", "l2"), t / "w"),
     "config.nitp.loss='l2' is invalid: must be one of cosine, mse, smooth_l1, kl"),
    ("microbatches", lambda p, b, t: (_set(_cfg(p), "train.microbatches", 3), t / "w"),
     "config.train.microbatches=3 is invalid: must divide train.global_batch=8"),
    ("seq_len", lambda p, b, t: (_set(_cfg(p), "train.seq_len", 128), t / "w"),
     "config.train.seq_len=128 is invalid: must be <= model.max_seq_len=64"),
    ("lr", lambda p, b, t: (_set(_cfg(p), "train.lr", 0.0), t / "w"),
     "config.train.lr=0.0 is invalid: must be a positive number"),
    ("top_k", lambda p, b, t: (_set(_set(_cfg(p), "model.moe.num_experts", 4), "model.moe.top_k", 5),
                               t / "w"),
     "config.model.moe.top_k=5 is invalid: must be <= model.moe.num_experts=4"),
    ("dispatch", lambda p, b, t: (_set(_set(_cfg(p), "model.moe.num_experts", 4),
                                       "model.moe.dispatch", "sparse"), t / "w"),
     "config.model.moe.dispatch='sparse' is invalid: must be one of dropless, ragged, dense, gather, capacity"),
    ("missing_path", lambda p, b, t: (_cfg(str(t / "prep"), input="/no/such/corpus"), t / "w"),
     "/no/such/corpus"),
    ("empty_glob", lambda p, b, t: (_cfg(str(t / "prep"), input=str(b / "*.nothing")), t / "w"),
     "*.nothing"),
    ("empty_corpus", lambda p, b, t: (_cfg(str(t / "prep"), input=str(b / "empty")), t / "w"),
     "empty"),
    ("binary_file", lambda p, b, t: (_cfg(str(t / "prep"), input=str(b / "binary.txt")), t / "w"),
     "binary.txt"),
    ("invalid_utf8", lambda p, b, t: (_cfg(str(t / "prep"), input=str(b / "latin1.txt")), t / "w"),
     "UTF-8"),
    ("jsonl_field", lambda p, b, t: (_cfg(str(t / "prep"), input=str(b / "no_text.jsonl")), t / "w"),
     "text"),
    ("tokenizer_too_big", lambda p, b, t: (
        _set(_cfg(str(t / "prep"), tokenizer=os.path.join(p, "tokenizer.model")),
             "model.vocab_size", 300), t / "w"),
     "--config.model.vocab_size="),
    ("tokenizer_missing", lambda p, b, t: (_cfg(str(t / "prep"), tokenizer=str(b / "nope.model")),
                                           t / "w"),
     "nope.model"),
    ("prepared_for_other_inputs", lambda p, b, t: (_cfg(p, val_fraction=0.3), t / "w"),
     "val_fraction"),
    ("workdir_is_a_file", lambda p, b, t: (_cfg(p), b / "a_file" / "run"),
     "is not a writable directory"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(case, prepared_dir, bad_files, tmp_path):
  _, build, expected = case
  cfg, workdir = build(prepared_dir, bad_files, tmp_path)
  before = snapshot(prepared_dir, bad_files)
  with pytest.raises(errors.UserError) as err:
    train.run(cfg, str(workdir))
  message = str(err.value)
  assert expected in message, message
  assert "\n" not in message.strip(), message
  assert snapshot(prepared_dir, bad_files) == before
  assert not os.path.exists(os.path.join(str(workdir), "checkpoints"))


def test_checkpoint_of_another_config_is_refused_and_kept(prepared_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.run(train_config(prepared_dir, steps=2, eval_every=100), workdir)
  before = snapshot(os.path.join(workdir, "checkpoints"))
  other = train_config(prepared_dir, steps=4, eval_every=100)
  other.nitp.target_layer = 2
  with pytest.raises(errors.UserError, match=r"nitp.target_layer: 1 -> 2.*new --workdir"):
    train.run(other, workdir)
  assert snapshot(os.path.join(workdir, "checkpoints")) == before


CLI_CASES = [
    ("flag_type", ["--config.train.steps=abc"], "steps"),
    ("unknown_field", ["--config.train.stepz=5"], "stepz"),
    ("missing_config", ["--config=configs/nope.py"], "nope.py"),
    ("bad_variant", ["--config=configs/tiny.py:huge"], "huge"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_flags_fail_fast_with_a_message(case, tmp_path):
  _, args, expected = case
  if not any(a.startswith("--config=") for a in args):
    args = ["--config=configs/tiny.py"] + args
  out = subprocess.run([sys.executable, "-m", "nitp_jax.train", f"--workdir={tmp_path}/w", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode != 0
  assert expected in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert not os.path.exists(tmp_path / "w")
