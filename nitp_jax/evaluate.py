"""Evaluate a run's checkpoint on held-out data; print one JSON object.

  python -m nitp_jax.evaluate --workdir=DIR [--step=N] [--batches=N]

Keys: step, loss (NTP cross-entropy, nats per token) and ppl; nitp and
nitp_cos (NITP loss and mean cosine of P(h_t) with z_{t+1}) when the run
trains with NITP; erank_last, cos_last, erank_target, cos_target; tokens
(valid next-token pairs) and batches.

Data: the first N validation batches of the run's prepared data
(cfg.data.prepared_dir, or <workdir>/data), N = cfg.train.eval_batches by
default: with defaults, loss / nitp equal the trainer's eval record of the
same step. Loss and NITP are token-weighted over all batches. Geometry is
computed per batch and then averaged over the batches (equal weight), so it
is on the same scale as the trainer's probe record (one batch; --batches=1
reproduces it: the probe batch is the first eval batch).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import cli
from nitp_jax import step as step_lib
from nitp_jax.data import pipeline
from nitp_jax.data.corpus import DataError

GEOMETRY_KEYS = ("erank_last", "cos_last", "erank_target", "cos_target")


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps with a finished checkpoint under <workdir>/checkpoints."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def resolve_step(workdir: str, step: int | None) -> int:
  """`step`, or the latest; CheckpointError when there is no such checkpoint."""
  steps = checkpoint_steps(workdir)
  where = ckpt_lib.checkpoint_dir(workdir)
  if not steps:
    raise ckpt_lib.CheckpointError(f"no checkpoint under {where}: pass the --workdir of a "
                                   "training run")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ckpt_lib.CheckpointError(f"no checkpoint of step {step} under {where} (have: "
                                   f"{', '.join(map(str, steps))})")
  return step


def data_dir(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  return cfg.data.prepared_dir or os.path.join(os.path.abspath(workdir), "data")


def _finite_or_none(x: float) -> float | None:
  return x if math.isfinite(x) else None


def evaluate_params(cfg: ml_collections.ConfigDict, params: dict, batches: list[dict]
                    ) -> dict[str, float]:
  """Held-out loss, ppl, NITP alignment and geometry of `params` on `batches`."""
  eval_step = jax.jit(step_lib.make_eval_step(cfg))
  geometry_step = jax.jit(step_lib.make_geometry_step(cfg))
  sums: dict[str, float] = {}
  geometry: dict[str, list[float]] = {k: [] for k in GEOMETRY_KEYS}
  for batch in batches:
    for k, v in jax.device_get(eval_step(params, batch)).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    for k, v in jax.device_get(geometry_step(params, batch)).items():
      geometry[k].append(float(v))
  tokens = sums.pop("tokens", 0.0)
  out = {k: v / max(tokens, 1.0) for k, v in sums.items()}
  out["loss"] = out.pop("ntp")
  out["ppl"] = math.exp(min(out["loss"], 50.0))
  out |= {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
          for k, v in geometry.items()}
  return out | {"tokens": int(tokens), "batches": len(batches)}


def evaluate_run(workdir: str, step: int | None = None, batches: int | None = None
                 ) -> dict:
  """The JSON-able evaluation of a run's checkpoint (latest when step is None)."""
  step = resolve_step(workdir, step)
  try:
    cfg, params = ckpt_lib.restore_params(workdir, step)
  except ckpt_lib.CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ckpt_lib.CheckpointError(
        f"cannot restore the checkpoint of step {step} in {ckpt_lib.checkpoint_dir(workdir)} "
        f"({type(e).__name__}: {cli.one_line(e)[:300]}); pass another --step") from e
  n = cfg.train.eval_batches if batches is None else batches
  if n <= 0:
    raise DataError(f"--batches={n} is invalid: must be a positive integer")
  t = cfg.train
  eval_batches = pipeline.make_eval_batches(data_dir(cfg, workdir), t.seq_len,
                                            t.global_batch, n)
  result = evaluate_params(cfg, params, eval_batches)
  order = ["loss", "ppl", "nitp", "nitp_cos", *GEOMETRY_KEYS, "tokens", "batches"]
  ordered = {k: result[k] for k in order if k in result}
  return {"workdir": os.path.abspath(workdir), "step": step,
          **{k: _finite_or_none(v) if isinstance(v, float) else v for k, v in ordered.items()},
          "geometry": "mean over batches"}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _exit(f"unexpected arguments {' '.join(argv[1:])!r}: use --workdir=DIR [--step=N] "
          "[--batches=N]")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  try:
    f = flags.FLAGS
    result = evaluate_run(f.workdir, f.step, f.batches)
  except (ckpt_lib.CheckpointError, DataError) as e:
    _exit(str(e))
  print(json.dumps(result))


def _exit(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _define_flags() -> None:
  """Only when run as a program: nitp_jax.train defines --workdir too."""
  flags.DEFINE_string("workdir", None, "Training run directory (its checkpoints/).",
                      required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("batches", None, "Validation batches of train.global_batch rows "
                       "(default: the run's train.eval_batches).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
