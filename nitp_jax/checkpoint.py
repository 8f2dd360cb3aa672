"""Orbax checkpoints of a run: train state, data-iterator state and config,
under `<workdir>/checkpoints/<step>/`. Saves are asynchronous; restores
reshard into whatever shardings the caller's abstract state carries."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from nitp_jax import checkpoint_faults
from nitp_jax import errors
from nitp_jax import layout
from nitp_jax import model_config
from nitp_jax import remote_failures
from nitp_jax import storage
from nitp_jax.errors import CheckpointError
from nitp_jax.flag_names import flag

# Fields that decide parameter shapes or the data order: a checkpoint only
# resumes under a config that agrees on all of them.
RESUME_FIELDS = ("model", "nitp.target_layer", "nitp.projector", "nitp.projector_mult",
                 "nitp.variant", "data.input", "data.seed", "data.val_fraction",
                 "data.text_field", "data.shuffle_window", "data.shuffle_seed",
                 "data.weights", "data.streaming",
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
    self._saving: int | None = None  # the step of the save in flight
    checkpoint_faults.quiet_failed_save_noise()

  def steps(self) -> list[int]:
    """Steps with a finished checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator,
           cfg: ml_collections.ConfigDict) -> None:
    """Start saving `step` (asynchronously). CheckpointError, one line, when
    this save or the previous one failed (disk full, quota, ...)."""
    self.wait()
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          config=ocp.args.JsonSave(json.loads(cfg.to_json()))), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e
    self._saving = step

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
    restores; None when there is no checkpoint at all.

    A damaged checkpoint (files missing or unreadable: see checkpoint_faults)
    is skipped for an older one and, once an older one restores, moved aside
    to `<step>.corrupt-<UTC time>`, kept for inspection: left in place, a
    rerun would retrain up to it and then fail to save over it. A checkpoint
    of another config or train-state tree, or one that fails for any other
    reason, stops the run with one line and is never moved. Checkpoints that
    exist but none of which restores are an error, never a fresh start (and
    then nothing is moved)."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    self._warn_incomplete()
    damaged = []
    for step in steps:
      saved, error = _attempt(lambda: self.saved_config(step))
      if error := _failure_on_any_process(error):
        damaged.append(self._damaged_or_raise(step, error))
        continue
      check_resumable(saved, cfg, self.directory)
      iterator = data_iterator
      if self.saved_process_count(step) not in (None, jax.process_count()):
        iterator = None
        logging.warning(
            "checkpoint %s was written by another number of processes: its data-iterator "
            "state does not apply, so the data order restarts with a seed derived from the "
            "step (not the order of an uninterrupted run)", os.path.join(self.directory, str(step)))
      state, error = _attempt(lambda: self.restore(step, abstract_state, iterator))
      if error := _failure_on_any_process(error):
        damaged.append(self._damaged_or_raise(step, error))
        continue
      self._move_aside([s for s, _ in damaged])
      return step, state, iterator is not None
    if damaged:
      raise CheckpointError(
          f"none of the {len(damaged)} checkpoints in {self.directory} can be restored "
          f"({'; '.join(reason for _, reason in damaged)}). Not starting from scratch over "
          f"them: repair or move that directory away, or use a new {flag('workdir')}.")
    return None

  def _damaged_or_raise(self, step: int, error: Exception) -> tuple[int, str]:
    """(step, reason) of a damaged checkpoint, after a warning; a
    CheckpointError for any other failure."""
    path = os.path.join(self.directory, str(step))
    kind = checkpoint_faults.classify_restore_error(error)
    reason = checkpoint_faults.cause(error)
    if kind == checkpoint_faults.MISMATCHED:
      raise CheckpointError(
          f"checkpoint {path} holds another train state than this config builds ({reason}). "
          f"Resume with the config and code version that wrote it, or use a new {flag('workdir')}; "
          "the checkpoint is left as it is.") from error
    if kind != checkpoint_faults.DAMAGED:
      raise CheckpointError(
          f"cannot restore checkpoint {path} ({reason}); it is left as it is. If it is "
          f"damaged, rename it (e.g. to {path}.corrupt) and rerun to resume from the "
          "checkpoint before it.") from error
    logging.warning("checkpoint %s is damaged (%s); trying an older one", path, reason)
    return step, f"{path}: {reason}"

  def _move_aside(self, steps: list[int]) -> None:
    """Process 0 renames the damaged `steps` out of Orbax's sight; the
    others wait for it (and fail with it)."""
    if not steps:
      return
    error = None
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        try:
          moved = checkpoint_faults.move_aside(path)
        except OSError as e:
          error = CheckpointError(f"cannot move the damaged checkpoint {path} aside "
                                  f"({type(e).__name__}: {e}): move or delete it by hand, "
                                  "then rerun")
          break
        logging.warning("moved the damaged checkpoint %s to %s (kept for inspection; "
                        "delete it when done); training goes on from an older one",
                        path, moved)
    if _failure_on_any_process(error) is not None:
      raise error or CheckpointError(f"process 0 could not move a damaged checkpoint in "
                                     f"{self.directory} aside: see its message")
    self._manager.reload()

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
    """Wait for the save in flight; CheckpointError if it failed."""
    step, self._saving = self._saving, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if step is None:
        raise
      raise self._save_failed(step, e) from e

  def _save_failed(self, step: int, error: Exception) -> CheckpointError:
    """The one-line error of a failed save, after removing what it left
    (Orbax's `<step>.orbax-checkpoint-tmp*`, which Orbax would also replace
    on the next save of that step) and quieting its orphaned writes."""
    checkpoint_faults.collect_orphaned_writes()
    if jax.process_index() == 0:
      try:
        checkpoint_faults.remove_partial_save(self.directory, step)
      except Exception as e:  # pylint: disable=broad-except  # OSError, gcsfs HttpError, ...
        logging.warning("could not remove the partial checkpoint of step %s: %s", step,
                        errors.one_line(e))
    try:
      self._manager.reload()
      good = [s for s in self.steps() if s < step]
      last = (f"the last good checkpoint is step {good[-1]} in {self.directory}" if good else
              f"there is no good checkpoint in {self.directory} yet (a rerun starts from step 0)")
    except Exception as e:  # pylint: disable=broad-except  # the storage itself is failing
      error = e if remote_failures.classify(e) else error
      last = f"its checkpoints in {self.directory} cannot be listed now"
    remote = storage.is_remote(self.directory)
    fix = ("Check that GCS is reachable and that your credentials may write there, then" if
           remote else "Free space (or raise the quota or file-size limit) and")
    cause = (remote_failures.classify(error) or ("", ""))[1]  # a gs:// request's, in words
    return CheckpointError(
        f"saving the checkpoint of step {step} failed: "
        f"{cause or checkpoint_faults.save_failure_cause(error)}; {last}. {fix} rerun the same "
        "command to resume.")

  def close(self) -> None:
    self._manager.close()


def _attempt(fn: Callable[[], Any]) -> tuple[Any, Exception | None]:
  try:
    return fn(), None
  except Exception as e:  # pylint: disable=broad-except  # classified by the caller
    return None, e


def _failure_on_any_process(error: Exception | None) -> Exception | None:
  """`error`, with all processes of a multi-process run agreeing: a
  checkpoint that fails on one process fails on all, as the most severe kind
  any process saw."""
  if jax.process_count() == 1:
    return error
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  kinds = checkpoint_faults.KINDS
  code = -1 if error is None else kinds.index(checkpoint_faults.classify_restore_error(error))
  worst = int(np.max(multihost_utils.process_allgather(np.int32(code))))
  if worst < 0 or code == worst:
    return error
  return checkpoint_faults.FailedElsewhere(kinds[worst])


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
  if _has_projector(saved) != _has_projector(current):  # λ = 0 drops it from the train state
    diffs.append(f"nitp.weight: {saved.nitp.weight!r} -> {current.nitp.weight!r} (the NITP "
                 "projector exists only when nitp.weight > 0)")
  return diffs


def _has_projector(cfg: ml_collections.ConfigDict) -> bool:
  n = cfg.nitp
  return model_config.NITPConfig(weight=n.weight, variant=n.get("variant", "nitp"),
                                 projector=n.get("projector", "swiglu")).uses_projector


# Saved configs from before a field existed hold its then-implied value.
FIELD_DEFAULTS = {"model.moe.balance_loss": "batch", "model.moe.bias_update_rate": 0.0,
                  "data.shuffle_window": 0, "data.shuffle_seed": -1,
                  "data.weights": "", "data.streaming": False}


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
        f"({'; '.join(diffs)}). Resume with the same values, or use a new {flag('workdir')}."
        f"{hint}")


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
