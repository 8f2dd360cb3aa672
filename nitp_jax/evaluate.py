"""Evaluate a run's checkpoint on held-out data; print one JSON object.

  python -m nitp_jax.evaluate --workdir=DIR [--step=N] [--batches=N] [--dispatch=NAME]

Keys: step, loss (NTP cross-entropy, nats per token) and ppl; nitp and
nitp_cos (NITP loss and mean cosine of P(h_t) with z_{t+1}) when the run
trains with NITP; erank_last, cos_last, erank_target, cos_target; tokens
(valid next-token pairs) and batches; <task>/acc and <task>/acc_norm for
each task of the run's train.eval_tasks.

Data: the first N validation batches of the run's prepared data
(cfg.data.prepared_dir, or <workdir>/data), N = cfg.train.eval_batches by
default: with defaults, loss / nitp equal the trainer's eval record of the
same step. Loss and NITP are token-weighted over all batches. Data of several
sources gives N batches per source, each source's numbers (ntp_s0, nitp_s0,
nitp_cos_s0, tokens_s0, ...) and loss / nitp as their mean weighted by the
sources' training shares (nitp_jax.data.heldout_sets). Geometry is computed
per batch and then averaged over the batches (equal weight), so it is on the
same scale as the trainer's probe record (one batch: the first eval batch,
of source 0 for a mixture; for one source --batches=1 reproduces it).

MoE runs are evaluated with the dispatch they trained with (the checkpoint's
config) unless --dispatch names another; the dropless ones (dropless, ragged,
dense) compute the same model, gather / capacity drop copies by capacity and
give other numbers.
"""

from __future__ import annotations

import json
import math
import re

import jax
import ml_collections
import numpy as np
from absl import flags

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import cli
from nitp_jax import config as config_lib
from nitp_jax import jitted
from nitp_jax import layout
from nitp_jax import sharding
from nitp_jax import storage
from nitp_jax import tasks as tasks_lib
from nitp_jax.data import heldout_sets as heldout_sets_lib
from nitp_jax.data import prepare
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.errors import DataError
from nitp_jax.flag_names import flag

GEOMETRY_KEYS = ("erank_last", "cos_last", "erank_target", "cos_target")


def _on_mesh(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """A host batch (the same on every process) as a global array on `mesh`."""
  return sharding.global_batch(sharding.local_rows(batch, mesh), mesh)


def heldout(steps: jitted.Steps, params: dict, batches: list[dict]) -> dict[str, float]:
  """Token-weighted held-out NTP loss ("ntp"), "ppl", NITP loss and cosine
  (when trained with NITP), and the number of valid next-token pairs."""
  sums: dict[str, float] = {}
  for batch in batches:
    for k, v in jax.device_get(steps.eval(params, _on_mesh(batch, steps.mesh))).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  tokens = sums.pop("tokens", 0.0)
  result = {k: v / max(tokens, 1.0) for k, v in sums.items()}
  result["ppl"] = math.exp(min(result["ntp"], 50.0))
  result["tokens"] = tokens
  return result


def heldout_sets(steps: jitted.Steps, params: dict, sets: heldout_sets_lib.HeldOutSets
                 ) -> dict[str, float]:
  """`heldout` of each held-out set, combined (data.heldout_sets.combine):
  for a mixture, the headline weighted by the sources' training shares and
  each source's values ("ntp_s0", ...); for a single set, `heldout`'s dict."""
  return heldout_sets_lib.combine([heldout(steps, params, b) for b in sets.batches],
                                  sets.suffixes, sets.weights)


def geometry(steps: jitted.Steps, params: dict, batches: list[dict]) -> dict[str, float]:
  """Effective rank and mean cosine of the last and target hidden states,
  per batch, averaged over the batches (NaN where no batch has a value)."""
  values: dict[str, list[float]] = {k: [] for k in GEOMETRY_KEYS}
  for batch in batches:
    for k, v in jax.device_get(steps.geometry(params, _on_mesh(batch, steps.mesh))).items():
      values[k].append(float(v))
  return {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
          for k, v in values.items()}


def run_tasks(cfg: ml_collections.ConfigDict, prepared_dir: str) -> list[tasks_lib.Task]:
  """The downstream tasks of cfg.train.eval_tasks, encoded with the run's
  tokenizer (none when the field is empty)."""
  if not cfg.train.eval_tasks:
    return []
  local = prepare.readable_dir(prepared_dir)
  tokenizer = tok_lib.load_tokenizer(layout.tokenizer_path(local))
  return tasks_lib.load_tasks(cfg.train.eval_tasks, local, tokenizer,
                              cfg.train.seq_len, cfg.train.global_batch)


def task_accuracy(steps: jitted.Steps, params: dict, task: tasks_lib.Task) -> dict[str, float]:
  """{"<task>/acc", "<task>/acc_norm"} of `params` on a task."""
  return task.evaluate(steps.score, params, lambda b: _on_mesh(b, steps.mesh))


def _finite_or_none(x: float) -> float | None:
  return x if math.isfinite(x) else None


def eval_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Every local device on the data axis: evaluation needs no model sharding
  and runs wherever the checkpoint is read."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for axis in sharding.MESH_AXES:
    cfg.mesh[axis], cfg.mesh[f"dcn_{axis}"] = (-1 if axis == "data" else 1), 1
  return jitted.mesh_for_config(cfg)


def with_dispatch(cfg: ml_collections.ConfigDict, dispatch: str | None
                  ) -> ml_collections.ConfigDict:
  """cfg with model.moe.dispatch = `dispatch` (None: cfg's own, the one the
  run trained with), validated."""
  if not dispatch:
    return cfg
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.model.moe.dispatch = dispatch
  return config_lib.validate(cfg)


def evaluate_run(workdir: str, step: int | None = None, batches: int | None = None,
                 dispatch: str | None = None) -> dict:
  """The JSON-able evaluation of a run's checkpoint (latest when step is
  None) with the MoE dispatch it trained with, or `dispatch`."""
  step, cfg, params = ckpt_lib.restore_params(workdir, step)
  cfg = with_dispatch(cfg, dispatch)
  n = cfg.train.eval_batches if batches is None else batches
  if n <= 0:
    raise DataError(f"--batches={n} is invalid: must be a positive integer")
  t = cfg.train
  sets = heldout_sets_lib.make_eval_sets(layout.data_dir(cfg, workdir), t.seq_len,
                                         t.global_batch, n, config_lib.data_weights(cfg))
  eval_batches = sets.all_batches
  if not eval_batches:
    data_dir = layout.data_dir(cfg, workdir)
    raise DataError(f"{data_dir} has nothing to evaluate on, {prepare.report_lines(data_dir)[0]}"
                    f". Train a run whose data holds documents out "
                    f"({flag('data.val_fraction')} > 0).")
  steps = jitted.build(cfg, eval_mesh(cfg))
  params = jax.device_put(params, steps.state_shardings["params"])
  result = heldout_sets(steps, params, sets) | geometry(steps, params, eval_batches)
  for task in run_tasks(cfg, layout.data_dir(cfg, workdir)):
    result |= task_accuracy(steps, params, task)
  result["loss"] = result.pop("ntp")
  for k in [k for k in result if k == "tokens" or k.startswith("tokens_s")]:
    result[k] = int(result[k])
  result["batches"] = len(eval_batches)
  order = ["loss", "ppl", "nitp", "nitp_cos", *GEOMETRY_KEYS, "tokens", "batches"]
  order += sorted(k for k in result if "/acc" in k)
  order += [k for k in result if re.search(r"_s\d+$", k)]  # per source, in source order
  ordered = {k: result[k] for k in order if k in result}
  moe = {"dispatch": cfg.model.moe.dispatch} if config_lib.is_moe(cfg) else {}
  return {"workdir": storage.absolute(workdir), "step": step, **moe,
          **{k: _finite_or_none(v) if isinstance(v, float) else v for k, v in ordered.items()},
          "geometry": "mean over batches"}


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  print(json.dumps(evaluate_run(f.workdir, f.step, f.batches, f.dispatch)))


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training run directory (its checkpoints/).",
                      required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("batches", None, "Validation batches of train.global_batch rows "
                       "(default: the run's train.eval_batches).")
  flags.DEFINE_enum("dispatch", None, config_lib.DISPATCHES, "MoE dispatch (default: the "
                    "one the run trained with).")


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--workdir=DIR [--step=N] [--batches=N] [--dispatch=NAME]")
