"""Entry points: library modules define no flags, and every command answers
a missing or stray argument with one line and exit status 2."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
COMMANDS = ("nitp_jax.train", "nitp_jax.evaluate", "nitp_jax.export.hf",
            "nitp_jax.data.prepare", "nitp_jax.experiments.compare", "nitp_jax.compile_check",
            "nitp_jax.params", "nitp_jax.plot", "nitp_jax.sample")

OUR_FLAGS = {"config", "workdir", "distributed", "coordinator_address", "num_processes",
             "process_id", "out", "step", "batches", "tokenizer", "input", "output",
             "vocab_size", "text_field", "val_fraction", "workers", "mesh", "devices",
             "batch", "seq_len", "compile", "ablation", "prompt", "prompts_file",
             "max_new_tokens", "temperature", "top_k", "top_p", "batch_size"}
IMPORT_ALL = """
import importlib, json, pkgutil
from absl import flags
import nitp_jax
before = set(flags.FLAGS)
names = [m.name for m in pkgutil.walk_packages(nitp_jax.__path__, "nitp_jax.")]
for name in names:
  importlib.import_module(name)
ours = [m for m in flags.FLAGS.flags_by_module_dict() if m.startswith("nitp_jax")]
new = sorted(set(flags.FLAGS) - before)
print(json.dumps({"modules": len(names), "ours": ours, "new": new}))
"""


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=120)


def test_importing_every_module_defines_no_flags():
  out = run("-c", IMPORT_ALL)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)
  assert result["modules"] >= 25, result
  assert result["ours"] == [], result  # no module of ours defined a flag
  assert not set(result["new"]) & OUR_FLAGS, result


def assert_one_line_error(out: subprocess.CompletedProcess, *expected: str) -> None:
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
  for text in expected:
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("module", COMMANDS)
def test_no_flags_is_one_line_naming_the_missing_flag(module):
  assert_one_line_error(run("-m", module), "is required: use ")


@pytest.mark.parametrize("module,flag", [("nitp_jax.train", "--config=configs/tiny.py"),
                                         ("nitp_jax.evaluate", "--step=1")])
def test_a_stray_positional_argument_is_one_line(module, flag, tmp_path):
  out = run("-m", module, flag, f"--workdir={tmp_path}/w", "extra")
  assert_one_line_error(out, "unexpected argument(s) 'extra'")
  assert not os.path.exists(tmp_path / "w")


def test_help_lists_the_config_flag():
  # absl's --help lists the main module's flags; --config is defined by
  # ml_collections, so cli.define_config_flag makes it one of the program's.
  out = run("-m", "nitp_jax.train", "--help")
  assert "--config: Config file" in out.stdout, out.stdout[-3000:]
  assert "--workdir:" in out.stdout, out.stdout[-3000:]


def test_an_override_of_a_missing_field_names_it():
  from nitp_jax import cli, config  # pylint: disable=import-outside-toplevel
  train_cfg = config.base_config().train
  with pytest.raises(AttributeError) as typo:  # the error ml_collections raises
    getattr(train_cfg, "stpes")
  with pytest.raises(AttributeError) as unknown:
    getattr(train_cfg, "qqq")
  argv = ["train", "--config=configs/tiny.py", "--config.train.stpes=5", "--config.train.qqq=1"]
  assert cli.unknown_field_message(typo.value, argv) == (
      "--config.train.stpes=5: the config has no field train.stpes; did you mean "
      "--config.train.steps? nitp_jax/config.py lists the fields")
  assert cli.unknown_field_message(unknown.value, argv) == (
      "--config.train.qqq=1: the config has no field train.qqq; nitp_jax/config.py lists "
      "the fields")
  assert cli.unknown_field_message(ValueError("'x'"), argv) is None
