"""No crash loops: a damaged checkpoint is moved aside and the run completes
(twice); a mismatched one is never moved; a failed save is one line and
leaves nothing that blocks the rerun."""

import glob
import json
import os
import shutil
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import checkpoint_faults
from nitp_jax import flag_names
from nitp_jax import jitted
from nitp_jax import train
from nitp_jax.errors import CheckpointError
from tests.conftest import train_config
from tests.helpers import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(prepared_dir, **train_overrides):
  return train_config(prepared_dir, **({"steps": 8, "checkpoint_every": 4, "eval_every": 1000,
                                         "keep_checkpoints": 5} | train_overrides))


def _largest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _truncate(path, size=100):
  with open(path, "r+b") as f:
    f.truncate(size)


def _listing(directory):
  return sorted(os.listdir(directory))


@pytest.fixture(scope="module")
def trained(prepared_dir, tmp_path_factory):
  """A finished 8-step run with checkpoints 4 and 8 (copy before damaging)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  train.run(_cfg(prepared_dir), workdir)
  assert _listing(os.path.join(workdir, "checkpoints")) == ["4", "8"]
  return workdir


def _copy(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir, os.path.join(workdir, "checkpoints")


def test_rerunning_twice_after_a_damaged_checkpoint_completes(prepared_dir, trained, tmp_path,
                                                              caplog, capsys):
  workdir, ckpts = _copy(trained, tmp_path)
  _truncate(_largest_data_file(os.path.join(ckpts, "8")))
  cfg = _cfg(prepared_dir)

  assert train.run(cfg, workdir)["step"] == 8  # restores 4, retrains, saves 8 again
  aside = [n for n in _listing(ckpts) if n.startswith("8.corrupt-")]
  assert len(aside) == 1 and _listing(ckpts) == sorted(["4", "8", aside[0]])
  assert any(f"moved the damaged checkpoint {ckpts}/8 to {ckpts}/{aside[0]}" in r.getMessage()
             for r in caplog.records)
  # Orbax never lists the moved-aside one as a step.
  assert ocp.path.step.checkpoint_steps(ckpts) in ([4, 8], [8, 4])

  capsys.readouterr()
  assert train.run(cfg, workdir)["step"] == 8  # again: resumes at 8, nothing to redo
  assert ("nothing to train: the checkpoint is at step 8 and --config.train.steps=8"
          in capsys.readouterr().out)
  assert _listing(ckpts) == sorted(["4", "8", aside[0]])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]
  assert steps == list(range(1, 9))
  assert not os.path.exists(os.path.join(workdir, "lock.json"))


def test_a_checkpoint_of_another_train_state_is_never_moved(prepared_dir, trained, tmp_path):
  """Same config, other tree (as from another code version): one line, kept."""
  workdir, ckpts = _copy(trained, tmp_path)
  other = _cfg(prepared_dir)
  other.model.num_layers = 3
  trainer = train.Trainer(_cfg(prepared_dir), workdir)
  try:
    abstract = jitted.build(other, trainer.mesh).abstract_state
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpts}/8 holds another train state "
                       "than this config builds .*tree structures do not match"):
      trainer.checkpointer.restore_latest(abstract, trainer.train_iter, trainer.cfg)
  finally:
    trainer.close()
  assert _listing(ckpts) == ["4", "8"]
  # A config mismatch is refused before any restore, and moves nothing.
  with pytest.raises(CheckpointError, match="was written under another config"):
    train.run(other, workdir)
  assert _listing(ckpts) == ["4", "8"]


def test_a_checkpoint_that_fails_for_an_unknown_reason_is_never_moved(prepared_dir, trained,
                                                                     tmp_path):
  workdir, ckpts = _copy(trained, tmp_path)
  _to_directory(os.path.join(ckpts, "8", "config", "metadata"))
  with pytest.raises(CheckpointError, match=f"cannot restore checkpoint {ckpts}/8 "
                     r"\(IsADirectoryError: \[Errno 21\] Is a directory: .*\); it is left as it is"):
    train.run(_cfg(prepared_dir), workdir)
  assert _listing(ckpts) == ["4", "8"]


def test_all_checkpoints_damaged_is_an_error_every_time(prepared_dir, trained, tmp_path):
  workdir, ckpts = _copy(trained, tmp_path)
  for step in ("4", "8"):
    _truncate(_largest_data_file(os.path.join(ckpts, step)))
  for _ in range(2):
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints .* can be restored .*"
                       "Not starting from scratch"):
      train.run(_cfg(prepared_dir), workdir)
    assert _listing(ckpts) == ["4", "8"]


def _remove(path):
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _garbage(path):
  with open(path, "wb") as f:
    f.write(b"\x00garbage")


# What each kind of damage to checkpoint 8 makes Orbax 0.12.8 raise, and
# how checkpoint_faults classifies it (the table in its docstring).
DAMAGE = {
    "data file truncated": (lambda d: _truncate(_largest_data_file(d)), "damaged"),
    "data file deleted": (lambda d: _remove(_largest_data_file(d)), "damaged"),
    "data file overwritten": (lambda d: _garbage(_largest_data_file(d)), "damaged"),
    "state manifest deleted": (lambda d: _remove(f"{d}/state/manifest.ocdbt"), "damaged"),
    "state _METADATA overwritten": (lambda d: _garbage(f"{d}/state/_METADATA"), "damaged"),
    "state _METADATA deleted": (lambda d: _remove(f"{d}/state/_METADATA"), "mismatched"),
    "config overwritten": (lambda d: _garbage(f"{d}/config/metadata"), "damaged"),
    "config deleted": (lambda d: _remove(f"{d}/config/metadata"), "damaged"),
    "data iterator overwritten": (lambda d: _garbage(f"{d}/data/process_0-of-1.json"),
                                  "damaged"),
    "data iterator deleted": (lambda d: _remove(f"{d}/data/process_0-of-1.json"), "damaged"),
    "state deleted": (lambda d: _remove(f"{d}/state"), "damaged"),
    "config replaced by a directory": (lambda d: _to_directory(f"{d}/config/metadata"),
                                       "unknown"),
}


def _to_directory(path):
  os.remove(path)
  os.mkdir(path)


def test_how_orbax_reports_damage_and_how_it_is_classified(prepared_dir, trained, tmp_path):
  trainer = train.Trainer(_cfg(prepared_dir), str(tmp_path / "scratch"))
  seen = {}
  try:
    for name, (damage, _) in DAMAGE.items():
      workdir = str(tmp_path / name.replace(" ", "_"))
      shutil.copytree(os.path.join(trained, "checkpoints"), os.path.join(workdir, "checkpoints"))
      damage(os.path.join(workdir, "checkpoints", "8"))
      ckpt = ckpt_lib.Checkpointer(workdir, keep=5)
      try:
        ckpt.saved_config(8)
        ckpt.restore(8, trainer.steps.abstract_state, trainer.train_iter)
      except Exception as e:  # pylint: disable=broad-except
        seen[name] = checkpoint_faults.classify_restore_error(e)
      else:
        seen[name] = "restored"
      finally:
        ckpt.close()
  finally:
    trainer.close()
  assert seen == {name: kind for name, (_, kind) in DAMAGE.items()}


def test_a_failed_save_is_one_line_and_the_rerun_completes(prepared_dir, trained, tmp_path):
  """A file-size limit (EFBIG, as a full disk gives ENOSPC) during the save
  of step 8: small files (metrics, TensorBoard) still fit, arrays do not."""
  workdir, ckpts = _copy(trained, tmp_path)
  shutil.rmtree(os.path.join(ckpts, "8"))  # the limited run resumes at 4
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "from tests.conftest import train_config\n"
      "def get_config():\n"
      f"  return train_config({prepared_dir!r}, steps=8, checkpoint_every=4, "
      "eval_every=1000, keep_checkpoints=5)\n")
  limited = ("import resource, runpy, sys\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
             "sys.argv[0] = 'nitp_jax.train'\n"
             "runpy.run_module('nitp_jax.train', run_name='__main__', alter_sys=True)\n")
  out = subprocess.run([sys.executable, "-c", limited, f"--config={config_file}",
                        f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr == (
      "error: saving the checkpoint of step 8 failed: OSError: [Errno 27] File too large; the "
      f"last good checkpoint is step 4 in {ckpts}. Free space (or raise the quota or "
      "file-size limit) and rerun the same command to resume.\n")
  assert _listing(ckpts) == ["4"]  # no half-written step 8
  assert not os.path.exists(os.path.join(workdir, "lock.json"))

  assert train.run(_cfg(prepared_dir), workdir)["step"] == 8
  assert _listing(ckpts) == ["4", "8"]


def test_turning_nitp_off_or_on_names_nitp_weight():
  # λ = 0 builds no projector: an NITP checkpoint cannot resume as NTP (nor
  # the reverse), so the refusal names the field instead of Orbax's tree diff.
  nitp, ntp = small_config(), small_config(weight=0.0)
  for saved, current in ((nitp, ntp), (ntp, nitp)):
    with pytest.raises(CheckpointError, match=r"another config \(nitp.weight: "
                       r"\d.\d -> \d.\d \(the NITP projector exists only when nitp.weight > 0\)"):
      ckpt_lib.check_resumable(saved, current, "/ckpt")
  ckpt_lib.check_resumable(nitp, small_config(weight=0.5), "/ckpt")  # same train state
  with flag_names.spelled({"workdir": "--out"}, has_config=True):  # compare's arms
    with pytest.raises(CheckpointError, match="or use a new --out"):
      ckpt_lib.check_resumable(nitp, ntp, "/ckpt")
