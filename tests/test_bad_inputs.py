"""The bad-input catalogue: each wrong value, path, corpus or workdir gets one
clear line naming the problem, and nothing already on disk is changed."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from nitp_jax import config as config_lib
from nitp_jax import errors
from nitp_jax import flag_names
from nitp_jax import train
from nitp_jax.data import prepare
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
    ("prepared_dir_is_a_file", lambda p, b, t: (_cfg(str(b / "a_file")), t / "w"),
     "--config.data.prepared_dir="),
    ("data_seed", lambda p, b, t: (_set(_cfg(p), "data.seed", -1), t / "w"),
     "config.data.seed=-1 is invalid: must be an integer in [0, 2**31)"),
    ("train_seed", lambda p, b, t: (_set(_cfg(p), "train.seed", 2**31), t / "w"),
     "config.train.seed=2147483648 is invalid: must be an integer in [0, 2**31)"),
    ("nitp_weight_nan", lambda p, b, t: (_set(_cfg(p), "nitp.weight", float("nan")), t / "w"),
     "config.nitp.weight=nan is invalid: must be a finite number"),
    ("eval_batches", lambda p, b, t: (_set(_cfg(p), "train.eval_batches", 0), t / "w"),
     "config.train.eval_batches=0 is invalid: must be a positive number"),
    ("does_not_fit", lambda p, b, t: (config_lib.load_config_file(
        os.path.join(ROOT, "configs", "moe_9b.py")), t / "w"), "the model does not fit"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(case, prepared_dir, bad_files, tmp_path):
  _, build, expected = case
  cfg, workdir = build(prepared_dir, bad_files, tmp_path)
  before = snapshot(prepared_dir, bad_files, tmp_path)
  with pytest.raises(errors.UserError) as err:
    train.run(cfg, str(workdir))
  message = str(err.value)
  assert expected in message, message
  assert "\n" not in message.strip(), message
  assert snapshot(prepared_dir, bad_files, tmp_path) == before
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
  assert_one_line(run_command("nitp_jax.train", f"--workdir={tmp_path}/w", *args), [expected])
  assert not os.path.exists(tmp_path / "w")


# ------------------------------------------------------- every numeric config field

def _numeric_fields() -> list[tuple[str, object]]:
  """(field, out-of-range value) for every numeric field of base_config():
  NaN, inf and -2 for floats; -2 (below -1, the mesh's fill value) for ints."""
  cases = []
  for field, value in config_lib.leaves(config_lib.base_config()):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    bad = [float("nan"), float("inf"), -2.0] if isinstance(value, float) else [-2]
    cases += [(field, v) for v in bad]
  return cases + [("train.seed", 2**31), ("data.seed", 2**31)]


NUMERIC = _numeric_fields()


@pytest.mark.parametrize("field,value", NUMERIC, ids=[f"{f}={v}" for f, v in NUMERIC])
def test_every_numeric_config_field_is_range_checked(field, value):
  cfg = config_lib.base_config()
  if field.startswith("model.moe."):  # checked when the model has experts
    cfg.model.moe.num_experts = 4
  _set(cfg, field, value)
  with pytest.raises(errors.ConfigError) as err:
    config_lib.validate(cfg)
  message = str(err.value)
  assert message.startswith(f"config.{field}={value!r} is invalid: "), message
  assert "\n" not in message


def test_the_sweep_covers_the_schema():
  fields = {f for f, _ in NUMERIC}
  assert len(fields) >= 60, len(fields)
  assert {"data.seed", "train.seed", "nitp.weight", "train.eval_batches", "train.eps",
          "model.moe.z_loss_weight", "mesh.dcn_expert"} <= fields


# ------------------------------------------- messages name the command's own flags

PREPARE = (prepare.FLAG_NAMES, False)   # data.prepare: --input, --vocab_size, ...
TRAIN = ({}, True)                      # train: --config.data.input, ...


@pytest.mark.parametrize("spelling,expected,foreign", [
    (TRAIN, ["--config.data.input=", "--config.data.text_field"], ["--input", "--text_field"]),
    (PREPARE, ["--input=", "--text_field"], ["--config."]),
], ids=["train", "data.prepare"])
def test_data_messages_name_the_commands_flags(spelling, expected, foreign, bad_files, tmp_path):
  messages = []
  with flag_names.spelled(*spelling):
    for build in (lambda: prepare.prepare("/no/such/corpus", str(tmp_path / "a"), 512),
                  lambda: prepare.prepare(str(bad_files / "no_text.jsonl"), str(tmp_path / "b"),
                                          512)):
      with pytest.raises(errors.DataError) as err:
        build()
      messages.append(str(err.value))
  text = " ".join(messages)
  for flag in expected:
    assert flag in text, text
  for flag in foreign:
    assert flag not in text, text


def test_tokenizer_messages_name_the_commands_vocab_flag(prepared_dir, tmp_path):
  tokenizer = os.path.join(prepared_dir, "tokenizer.model")
  for spelling, flag in ((TRAIN, "--config.model.vocab_size=512"), (PREPARE, "--vocab_size=512")):
    with flag_names.spelled(*spelling), pytest.raises(errors.DataError) as err:
      prepare.prepare(CORPUS_GLOB, str(tmp_path / "p"), 300, tokenizer_path=tokenizer)
    assert flag in str(err.value) and str(err.value).count("--") == 1, str(err.value)


def test_a_vocabulary_the_demo_corpus_cannot_serve_asks_for_real_data(tmp_path):
  """The paper's 152,064 entries on a model that fits: ask for a corpus or a
  tokenizer, never for a smaller vocabulary."""
  cfg = train_config(str(tmp_path / "prep"), steps=1)
  cfg.model.vocab_size, cfg.data.input = 152_064, ""
  with pytest.raises(errors.DataError) as err:
    train.run(cfg, str(tmp_path / "w"))
  message = str(err.value)
  assert "needs a real corpus or a ready tokenizer" in message, message
  assert "--config.data.input=PATH_OR_GLOB" in message and "--config.data.tokenizer=" in message
  assert "vocab_size=146" not in message and "\n" not in message
  assert snapshot(tmp_path) == {}


# ------------------------------------------------------------ every command, as run

def run_command(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=timeout)


def assert_one_line(out: subprocess.CompletedProcess, expected: list[str],
                    foreign: list[str] = ()) -> str:
  """Exit status 2, no traceback, stderr one `error: ...` line with `expected`
  and none of `foreign` (flags the command does not accept)."""
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
  for text in expected:
    assert text in lines[0], lines[0]
  for text in foreign:
    assert text not in lines[0], lines[0]
  return lines[0]


# (id, module, args (with {t}: tmp_path, {p}: the prepared dir, {b}: bad files, {c}: the
# corpus), expected texts, texts that must not appear)
COMMAND_CASES = [
    ("train_positional_config", "nitp_jax.train", ["configs/tiny.py", "--workdir={t}/w"],
     ["--config=configs/tiny.py", "not as a positional argument"], []),
    ("train_data_seed", "nitp_jax.train",
     ["--config=configs/tiny.py", "--workdir={t}/w", "--config.data.seed=-1"],
     ["config.data.seed=-1 is invalid"], []),
    ("train_nitp_weight_nan", "nitp_jax.train",
     ["--config=configs/tiny.py", "--workdir={t}/w", "--config.nitp.weight=nan"],
     ["config.nitp.weight=nan is invalid: must be a finite number"], []),
    ("train_distributed_on_alone", "nitp_jax.train",
     ["--config=configs/tiny.py", "--workdir={t}/w", "--distributed=on"],
     ["--distributed=on but JAX found no cluster", "--coordinator_address"], []),
    ("train_jsonl_field", "nitp_jax.train",
     ["--config=configs/tiny.py", "--workdir={t}/w", "--config.data.input={b}/no_text.jsonl"],
     ["--config.data.text_field"], ["--text_field"]),
    ("prepare_missing_input", "nitp_jax.data.prepare", ["--input={t}/nope", "--output={t}/p"],
     ["--input=", "does not exist"], ["--config."]),
    ("prepare_seed", "nitp_jax.data.prepare",
     ["--input={b}/no_text.jsonl", "--output={t}/p", "--seed=-1"],
     ["--seed=-1 is invalid"], ["--config."]),
    ("prepare_jsonl_field", "nitp_jax.data.prepare",
     ["--input={b}/no_text.jsonl", "--output={t}/p"], ["--text_field"], ["--config."]),
    ("prepare_tokenizer_too_big", "nitp_jax.data.prepare",
     ["--input={c}", "--output={t}/p", "--tokenizer={p}/tokenizer.model",
      "--vocab_size=300"], ["--vocab_size=512"], ["--config."]),
    ("evaluate_no_run", "nitp_jax.evaluate", ["--workdir={t}/none"],
     ["no checkpoint", "--workdir"], []),
    ("evaluate_dispatch", "nitp_jax.evaluate", ["--workdir={t}/none", "--dispatch=sparse"],
     ["--dispatch=sparse", "dropless"], []),
    ("prepare_output_is_a_file", "nitp_jax.data.prepare", ["--input={c}", "--output={b}/a_file"],
     ["--output=", "is not a writable directory"], ["--config."]),
    ("export_out_is_a_file", "nitp_jax.export.hf", ["--workdir={t}/none", "--out={b}/a_file"],
     ["--out=", "is not a writable directory"], []),
    ("export_tokenizer", "nitp_jax.export.hf",
     ["--workdir={t}/none", "--out={t}/hf", "--tokenizer={t}/nope.model"],
     ["--tokenizer."], ["--config."]),
    ("sample_output_is_a_directory", "nitp_jax.sample",
     ["--workdir={t}/none", "--prompt=x", "--output={b}"], ["--output=", "Is a directory"], []),
    ("compare_ablation", "nitp_jax.experiments.compare",
     ["--config=configs/tiny.py", "--out={t}/c", "--ablation=bad"], ["--ablation="], []),
    ("compile_check_devices", "nitp_jax.compile_check",
     ["--config=configs/tiny.py", "--devices=-3"], ["--devices=-3 is invalid"], []),
    ("plot_not_a_run", "nitp_jax.plot", ["{b}", "--out={t}/x.png"], ["no metrics.jsonl"], []),
    ("params_inf", "nitp_jax.params", ["--config=configs/tiny.py", "--config.train.lr=inf"],
     ["config.train.lr=inf is invalid"], []),
]


@pytest.mark.parametrize("case", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_every_command_answers_a_user_error_in_one_line(case, prepared_dir, bad_files, tmp_path):
  _, module, args, expected, foreign = case
  args = [a.format(t=tmp_path, p=prepared_dir, b=bad_files, c=CORPUS_GLOB) for a in args]
  before = snapshot(prepared_dir, bad_files, tmp_path)
  assert_one_line(run_command(module, *args), expected, foreign)
  assert snapshot(prepared_dir, bad_files, tmp_path) == before


@pytest.mark.parametrize("tokenizer", [False, True], ids=["no_tokenizer", "tokenizer"])
def test_moe_9b_on_this_cpu_is_refused_before_allocating(tokenizer, prepared_dir, tmp_path):
  """The paper's headline model on a CPU box: one line naming the launchers
  and the mesh, in seconds, with nothing written (before: a vocabulary hint,
  or RESOURCE_EXHAUSTED after allocating when a tokenizer was given)."""
  args = ["--config=configs/moe_9b.py", f"--workdir={tmp_path}/w"]
  if tokenizer:
    args.append(f"--config.data.tokenizer={prepared_dir}/tokenizer.model")
  start = time.perf_counter()
  line = assert_one_line(run_command("nitp_jax.train", *args),
                         ["the model does not fit", "GB", "launch/tpu_vm.sh",
                          "launch/gpu_slurm.sh", "--config.mesh.fsdp=-1", "compile_check"],
                         ["vocab_size", "RESOURCE_EXHAUSTED"])
  assert time.perf_counter() - start < 60, line
  assert snapshot(tmp_path) == {}
