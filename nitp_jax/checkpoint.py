"""Orbax checkpoints of a run: train state, data-iterator state and config,
under `<workdir>/checkpoints/<step>/`. Saves are asynchronous; restores
reshard into whatever shardings the caller's abstract state carries."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from nitp_jax import errors
from nitp_jax import layout
from nitp_jax import storage
from nitp_jax.errors import CheckpointError

# Fields that decide parameter shapes or the data order: a checkpoint only
# resumes under a config that agrees on all of them.
RESUME_FIELDS = ("model", "nitp.target_layer", "nitp.projector", "nitp.projector_mult",
                 "nitp.variant", "data.input", "data.seed", "data.val_fraction",
                 "data.text_field", "data.shuffle_window", "data.shuffle_seed",
                 "train.seq_len", "train.global_batch", "train.seed")


# How the same weights are computed with: free to change between runs.
COMPUTE_ONLY_FIELDS = frozenset({"model.attention_impl", "model.remat_policy",
                                 "model.ce_chunk", "model.compute_dtype",
                                 "model.moe.dispatch", "model.moe.capacity_factor"})


class Checkpointer:
  """Keeps the last `keep` checkpoints of one run."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = layout.checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save))

  def steps(self) -> list[int]:
    """Steps with a finished checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator,
           cfg: ml_collections.ConfigDict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(cfg.to_json()))), force=True)

  def saved_process_count(self, step: int) -> int | None:
    """How many processes wrote `step`'s data-iterator state (one file each)."""
    names = storage.glob(storage.join(self.directory, str(step), "data", "process_*-of-*.json"))
    counts = {int(re.search(r"-of-(\d+)\.json$", n).group(1)) for n in names}
    return counts.pop() if len(counts) == 1 else None

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator | None) -> Any:
    """The train state at `step`; also sets the iterator to where it was
    (unless `data_iterator` is None)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_latest(self, abstract_state: Any, data_iterator: grain.DatasetIterator,
                     cfg: ml_collections.ConfigDict) -> tuple[int, Any, bool] | None:
    """(step, state, data state restored?) of the newest checkpoint that
    restores, skipping (with a warning) unreadable ones; None when there is no
    checkpoint at all. Never falls back to a fresh start when checkpoints
    exist but none restores."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    self._warn_incomplete()
    failures = []
    for step in steps:
      try:
        saved = self.saved_config(step)
      except Exception as e:  # pylint: disable=broad-except
        failures.append(self._skip(step, e))
        continue
      check_resumable(saved, cfg, self.directory)
      iterator = data_iterator
      if self.saved_process_count(step) not in (None, jax.process_count()):
        iterator = None
        logging.warning(
            "checkpoint %s was written by another number of processes: its data-iterator "
            "state does not apply, so the data order restarts with a seed derived from the "
            "step (not the order of an uninterrupted run)", os.path.join(self.directory, str(step)))
      try:
        return step, self.restore(step, abstract_state, iterator), iterator is not None
      except Exception as e:  # pylint: disable=broad-except
        failures.append(self._skip(step, e))
    if failures:
      raise CheckpointError(
          f"none of the {len(failures)} checkpoints in {self.directory} can be restored "
          f"({'; '.join(failures)}). Not starting from scratch over them: repair or move "
          "that directory away, or use a new --workdir.")
    return None

  def _skip(self, step: int, error: Exception) -> str:
    reason = f"{os.path.join(self.directory, str(step))}: {type(error).__name__}: " + (
        str(error).strip().splitlines() or [""])[0][:200]
    logging.warning("skipping unreadable checkpoint %s; trying an older one", reason)
    return reason

  def _warn_incomplete(self) -> None:
    for tmp in sorted(str(t.get()) for t in ocp.path.step.all_temporary_paths(self.directory)):
      logging.warning("ignoring incomplete checkpoint %s (its write was interrupted)", tmp)

  def saved_config(self, step: int) -> ml_collections.ConfigDict:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def restore_params(self, step: int) -> dict:
    """The parameters at `step` as saved, without a target state or mesh."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    return restored["state"]["params"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
  if isinstance(value, (dict, ml_collections.ConfigDict)):
    out = {}
    for k in value.keys():
      out |= _flatten(value[k], f"{prefix}.{k}")
    return out
  return {prefix: value}


def config_mismatches(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict
                      ) -> list[str]:
  """'field: saved -> current' for every resume-relevant field that differs."""
  diffs = []
  for field in RESUME_FIELDS:
    a, b = _flatten(saved[field], field), _flatten(current[field], field)
    for key in sorted(set(a) | set(b)):
      if key not in COMPUTE_ONLY_FIELDS and a.get(key) != b.get(key):
        diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
  return diffs


# Saved configs from before a field existed hold its then-implied value.
FIELD_DEFAULTS = {"model.moe.balance_loss": "batch", "model.moe.bias_update_rate": 0.0,
                  "data.shuffle_window": 0, "data.shuffle_seed": -1}


def _with_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for field, value in FIELD_DEFAULTS.items():
    *parents, leaf = field.split(".")
    node = cfg[".".join(parents)]
    if leaf not in node:
      node[leaf] = value
  return cfg


def check_resumable(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict,
                    directory: str) -> None:
  diffs = config_mismatches(_with_defaults(saved), current)
  if diffs:
    bias = [d for d in diffs if d.startswith("model.moe.bias_update_rate")]
    hint = (" A router bias (bias_update_rate > 0) is part of the train state: a checkpoint "
            "with or without one restores only under the same bias_update_rate." if bias else "")
    raise CheckpointError(
        f"the checkpoint in {directory} was written under another config "
        f"({'; '.join(diffs)}). Resume with the same values, or use a new --workdir.{hint}")


def restore_params(workdir: str, step: int | None = None
                   ) -> tuple[int, ml_collections.ConfigDict, dict]:
  """(step, config, params) of a run's checkpoint (latest when step is None),
  as host arrays; for evaluation and export. CheckpointError when there is
  no such checkpoint or it cannot be read."""
  storage.check(workdir)
  if not storage.isdir(layout.checkpoint_dir(workdir)):
    raise CheckpointError(f"no checkpoint under {layout.checkpoint_dir(workdir)}: train "
                          "first, or pass the --workdir of a training run")
  ckpt = Checkpointer(workdir, keep=1_000_000, async_save=False)
  try:
    steps = ckpt.steps()
    if not steps:
      raise CheckpointError(f"no checkpoint under {ckpt.directory}: train first, or pass "
                            "the --workdir of a training run")
    if step is not None and step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} under {ckpt.directory} (have: "
                            f"{', '.join(map(str, steps))}); pass one of those to --step")
    step = steps[-1] if step is None else step
    try:
      return step, ckpt.saved_config(step), ckpt.restore_params(step)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot restore the checkpoint of step {step} in "
                            f"{ckpt.directory} ({type(e).__name__}: "
                            f"{errors.one_line(e)[:300]}); pass another --step") from e
  finally:
    ckpt.close()
