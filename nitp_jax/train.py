"""Train a model with NTP + NITP.

  python -m nitp_jax.train --config=configs/tiny.py --workdir=runs/tiny
  python -m nitp_jax.train --config=configs/moe_9b.py --config.train.steps=100

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import cli
from nitp_jax import config as config_lib
from nitp_jax import distributed
from nitp_jax import evaluate
from nitp_jax import fit
from nitp_jax import jitted
from nitp_jax import layout
from nitp_jax import optim
from nitp_jax import preemption
from nitp_jax import sharding
from nitp_jax import step as step_lib
from nitp_jax import workdir_lock
from nitp_jax.data import heldout_sets, pipeline, prepare, streaming
from nitp_jax.export import hf
from nitp_jax.errors import NonFiniteLossError
from nitp_jax.flag_names import flag
from nitp_jax.metrics_log import MetricsLog, Throughput, console_line


def prepare_data(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """Tokenized shards for cfg.data (built once, reused on resume)."""
  data_dir = layout.data_dir(cfg, workdir)
  if cfg.data.streaming:  # no preparation: each process writes the small held-out set
    streaming.ensure_heldout_dir(cfg, data_dir)
    return data_dir
  # Process 0 first; then the others reuse its output (shared disk) or build
  # their own copy (hosts with local disks).
  if jax.process_index() == 0:
    prepare.ensure_prepared(cfg.data, cfg.model.vocab_size, data_dir)
  distributed.barrier("prepare_data")
  if jax.process_index() != 0:
    prepare.ensure_prepared(cfg.data, cfg.model.vocab_size, data_dir)
  return data_dir


def data_report(cfg: ml_collections.ConfigDict, data_dir: str) -> list[str]:
  """What a run trains on, in lines: sources, what is held out, skipped
  records, the mixture."""
  if cfg.data.streaming:
    return streaming.report_lines(cfg, data_dir)
  lines = prepare.report_lines(data_dir)
  weights = config_lib.data_weights(cfg)
  if weights and len(weights) > 1:
    lines.append(pipeline.describe_mixture(data_dir, weights))
  return lines


class Trainer:
  """Builds everything a run needs from its config and drives the loop."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    self.cfg = cfg = hf.with_hf_tokenizer(config_lib.validate(cfg))
    config_lib.check_trainable(cfg)
    self.mesh = jitted.mesh_for_config(cfg)
    self.steps = jitted.build(cfg, self.mesh)
    fit.check(self.steps)  # before the workdir, the data and the state exist
    self.workdir = layout.make_workdir(workdir)
    self.lock = workdir_lock.hold_for_run(self.workdir)  # before writing anything else
    try:
      self._build(cfg)
    except BaseException:
      self._release_lock()
      raise

  def _build(self, cfg: ml_collections.ConfigDict) -> None:
    t = cfg.train
    self.is_main = jax.process_index() == 0
    self.data_dir = prepare_data(cfg, self.workdir)
    self.log = MetricsLog(self.workdir, enabled=self.is_main)
    for line in data_report(cfg, self.data_dir):
      self.log.info(line)
    self.train_iter = self._train_iterator(config_lib.order_seed(cfg))
    self.heldout = heldout_sets.make_eval_sets(  # one set per source of a mixture
        self.data_dir, t.seq_len, t.global_batch, t.eval_batches, config_lib.data_weights(cfg))
    self.eval_batches = self.heldout.all_batches
    mixture_line = heldout_sets.describe(self.heldout, config_lib.data_sources(cfg))
    if mixture_line:
      self.log.info(mixture_line)
    self.tasks = evaluate.run_tasks(cfg, self.data_dir) if self.eval_batches else []
    self.checkpointer = ckpt_lib.Checkpointer(self.workdir, t.keep_checkpoints)
    self._params_finite = jax.jit(step_lib.all_finite)

  def _train_iterator(self, seed: int):
    t = self.cfg.train
    if self.cfg.data.streaming:
      return streaming.make_train_iterator(self.cfg, self.data_dir, seed)
    return pipeline.make_train_iterator(self.data_dir, t.seq_len, t.global_batch, seed=seed,
                                        worker_count=self.cfg.data.worker_count,
                                        shuffle_window=self.cfg.data.shuffle_window,
                                        weights=config_lib.data_weights(self.cfg))

  def initial_state(self) -> step_lib.State:
    restored = self.checkpointer.restore_latest(self.steps.abstract_state, self.train_iter,
                                                self.cfg)
    if restored is None:
      self.log.truncate_after(0)
      return self._fresh_state()
    step, state, data_restored = restored
    if not data_restored:  # another process count wrote it: see restore_latest
      self.train_iter.close()
      self.train_iter = self._train_iterator(config_lib.order_seed(self.cfg) + step)
    self.log.info(f"resuming from step {step} in {self.checkpointer.directory}")
    schedule_note = optim.schedule_change(self.checkpointer.saved_config(step).train,
                                          self.cfg.train, step)
    if schedule_note:  # e.g. more steps after a finished run: the rate re-warms to the peak
      self.log.info(schedule_note)
    self.log.truncate_after(step)
    return state

  def _fresh_state(self) -> step_lib.State:
    """Step 0: random init, with the backbone of config.init.from_hf if set."""
    state = self.steps.init(jax.random.key(self.cfg.train.seed))
    if self.cfg.init.from_hf:
      backbone = hf.backbone_from_hf(self.cfg.init.from_hf, self.cfg)
      state["params"]["backbone"] = jax.tree.map(  # the run's dtypes and shardings
          lambda a, s: jax.device_put(np.asarray(a, s.dtype), s.sharding), backbone,
          self.steps.abstract_state["params"]["backbone"])
      self.log.info(f"backbone from {self.cfg.init.from_hf}; the NITP projector starts fresh")
    return state

  def save(self, state: step_lib.State, step: int) -> None:
    if not bool(self._params_finite(state["params"])):
      raise NonFiniteLossError(f"step {step}: parameters are not finite; not saving them. "
                               f"The last good checkpoint is in {self.checkpointer.directory}.")
    self.checkpointer.save(step, state, self.train_iter, self.cfg)
    self.log.sync()  # a remote workdir's metrics hold every step up to a checkpoint

  def _report(self, step: int, metrics: dict, throughput: Throughput) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    t = self.cfg.train
    if metrics["skipped_in_a_row"] > 0:
      self.log.info(f"step {step}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} "
                    f"is not finite; update skipped ({metrics['skipped_in_a_row']:.0f} in a row)")
    if metrics["skipped_in_a_row"] > t.max_skipped_in_a_row:
      raise NonFiniteLossError(
          f"step {step}: {metrics['skipped_in_a_row']:.0f} non-finite steps in a row "
          f"(limit --config.train.max_skipped_in_a_row={t.max_skipped_in_a_row}). "
          f"The last good checkpoint is in {self.checkpointer.directory}; lower "
          "--config.train.lr or raise --config.train.warmup_steps, then rerun to resume.")
    if step % t.log_every == 0 or step == t.steps:
      metrics |= throughput.update(step)
      self.log.info(console_line(step, t.steps, metrics))
      self.log.write(step, metrics)

  def _eval(self, state: step_lib.State, step: int) -> dict[str, float]:
    if not self.eval_batches:
      return {}
    result = evaluate.heldout_sets(self.steps, state["params"], self.heldout)
    for task in self.tasks:
      result |= evaluate.task_accuracy(self.steps, state["params"], task)
    accuracies = "".join(f" | {k} {v:.3f}" for k, v in result.items() if k.endswith("/acc"))
    per_source = "".join(f" | {k} {v:.4f}" for k, v in result.items() if k.startswith("ntp_s"))
    self.log.info(f"eval step {step} | loss {result['ntp']:.4f} | ppl {result['ppl']:.2f}"
                  + (f" | nitp {result['nitp']:.4f}" if "nitp" in result else "") + per_source
                  + accuracies)
    self.log.write(step, result, kind="eval")
    return result

  def _geometry(self, state: step_lib.State, step: int) -> None:
    """Geometry of a fixed held-out probe batch (the first eval batch)."""
    if not self.eval_batches:
      return
    self.log.write(step, evaluate.geometry(self.steps, state["params"], self.eval_batches[:1]),
                   kind="probe")

  def run(self, stop_after: int | None = None) -> dict:
    """Train to cfg.train.steps (or `stop_after`, checkpointing there).
    Returns the final step and the last train and eval metrics."""
    t = self.cfg.train
    with preemption.StartUp() as startup:  # a signal now stops the run after its first step
      state = self.initial_state()
      start = int(jax.device_get(state["step"]))
      end = min(t.steps, stop_after) if stop_after else t.steps
      throughput = Throughput.for_config(self.cfg)  # tokens/s, TFLOP/s, MFU
    if start >= t.steps:  # "training steps 40..10" said nothing of why nothing ran
      self.log.info(f"nothing to train: the checkpoint is at step {start} and "
                    f"{flag('train.steps')}={t.steps}; raise it to train further")
    else:
      self.log.info(f"training steps {start}..{end} of {t.steps} on {jax.device_count()} "
                    f"device(s), mesh {dict(self.mesh.shape)}; results in {self.workdir}")
    pending, last_eval, step = None, {}, start
    with preemption.PreemptionGuard(start, startup.signal_name) as guard:
      for step in range(start + 1, end + 1):
        batch = sharding.global_batch(next(self.train_iter), self.mesh)
        state, metrics = self.steps.train(state, batch)
        if pending is not None:
          self._report(*pending, throughput)
        pending = (step, metrics)
        preempted = guard.requested(step)
        evals = step % t.eval_every == 0 or step == t.steps
        probes = t.geometry_every and (step % t.geometry_every == 0 or step == t.steps)
        saves = step % t.checkpoint_every == 0 or step == end or preempted
        if evals or probes or saves:  # this step's train record, timed without the eval
          self._report(*pending, throughput)
          pending = None
        # Records first, then the checkpoint: a run killed after the save
        # resumes past this step and must find all of its records written.
        if evals:
          last_eval = self._eval(state, step)
        if probes:
          self._geometry(state, step)
        if saves:
          self.save(state, step)
        if evals or probes or saves:  # they waited for this step: time from here
          throughput.restart(step)
        if preempted:
          self.checkpointer.wait()
          self.log.info(f"{guard.reason} received: checkpoint of step "
                        f"{step} saved in {self.checkpointer.directory}; rerun the same "
                        "command to resume")
          return {"step": step, "eval": last_eval, "preempted": True}
    if pending is not None:
      self._report(*pending, throughput)
    self.checkpointer.wait()
    return {"step": step, "eval": last_eval, "preempted": False}

  def close(self) -> None:
    try:
      self.train_iter.close()  # stops grain's worker processes and frees their shared memory
      self.checkpointer.wait()
    finally:
      self.checkpointer.close()
      self.log.close()
      self._release_lock()

  def _release_lock(self) -> None:
    if self.lock is not None:
      self.lock.release()


def run(cfg: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None) -> dict:
  with fit.out_of_memory_as_config_error():
    trainer = Trainer(cfg, workdir)
    try:
      return trainer.run(stop_after)
    finally:
      trainer.close()


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  workdir = f.workdir or layout.default_workdir(config_flags.get_config_filename(f["config"]))
  distributed.maybe_initialize(f.distributed, f.coordinator_address, f.num_processes,
                               f.process_id)  # before anything touches a device
  result = run(f.config, workdir)
  if result["preempted"] or jax.process_index() != 0:
    return
  ev = result["eval"]
  summary = f"; held-out loss {ev['ntp']:.4f} (ppl {ev['ppl']:.2f})" if ev else ""
  print(f"done: step {result['step']}{summary}. Metrics: {layout.metrics_path(workdir)}, "
        f"TensorBoard: {layout.tensorboard_dir(workdir)}, checkpoints: "
        f"{layout.checkpoint_dir(workdir)}")


def define_flags() -> None:
  cli.define_config_flag("Config file, e.g. configs/tiny.py (or configs/tiny.py:moe).")
  flags.mark_flags_as_required(["config"])
  flags.DEFINE_string("workdir", None, "Run directory for checkpoints, metrics and prepared "
                      "data. Default: runs/<config name>.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Multi-host start-up: auto (detect SLURM / TPU pod / the flags below), "
                    "on (always call jax.distributed.initialize()), off (single process).")
  flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0, for a manual "
                      "multi-process launch.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a manual launch.")
  flags.DEFINE_integer("process_id", None, "Rank of this process (0 .. num_processes-1).")


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--config=configs/tiny.py [--workdir=DIR] "
               "[--config.train.steps=N ...]")
