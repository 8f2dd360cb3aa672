"""How noisy the training loss is, with and without the piece shuffle.

  python benchmarks/loss_noise.py                  # configs/tiny.py, seeds 0,1,2
  python benchmarks/loss_noise.py --windows=0,256,1024 --seeds=0,1

Trains `--config` once per (data.shuffle_window, seed), logging every step,
and measures the standard deviation of the residuals of a linear fit to the
training loss over steps 50..150 (before the decay: a smooth curve there has
small residuals, a batch that holds one or two documents a jump). Prints one
JSON line: per window the mean residual std over seeds, the final held-out
loss per seed, and the ratio of each window's noise to the first window's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile

import numpy as np
from absl import app, flags

import common  # noqa: F401  (puts the repository on sys.path)
from nitp_jax import config as config_lib  # noqa: E402
from nitp_jax import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/tiny.py", "Config file to train.")
flags.DEFINE_list("windows", ["0", "1024"], "data.shuffle_window values; the first "
                  "is the reference of the ratios.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (data.seed and train.seed).")
flags.DEFINE_integer("fit_from", 50, "First step of the linear fit.")
flags.DEFINE_integer("fit_to", 150, "Last step of the linear fit.")


def residual_std(records: list[dict], first: int, last: int) -> float:
  """Std of the residuals of a least-squares line through loss(step)."""
  steps = np.array([r["step"] for r in records if first <= r["step"] <= last], float)
  loss = np.array([r["loss"] for r in records if first <= r["step"] <= last])
  slope, intercept = np.polyfit(steps, loss, 1)
  return float(np.std(loss - (slope * steps + intercept)))


def one_run(window: int, seed: int, workdir: str, prepared: str) -> tuple[float, float]:
  """(residual std, final held-out loss) of one training run."""
  cfg = config_lib.load_config_file(FLAGS.config)
  cfg.data.shuffle_window, cfg.data.seed, cfg.train.seed = window, seed, seed
  cfg.data.prepared_dir = prepared  # per seed (it picks the held-out documents)
  cfg.train.log_every = 1
  cfg.train.geometry_every = 0
  with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line only
    result = train.run(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [r for r in map(json.loads, f) if r["kind"] == "train"]
  return residual_std(records, FLAGS.fit_from, FLAGS.fit_to), result["eval"]["ntp"]


def main(argv):
  del argv
  windows, seeds = [int(w) for w in FLAGS.windows], [int(s) for s in FLAGS.seeds]
  noise, heldout = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for window in windows:
      runs = [one_run(window, seed, os.path.join(tmp, f"w{window}_s{seed}"),
                      os.path.join(tmp, f"data_s{seed}")) for seed in seeds]
      noise[window] = [r[0] for r in runs]
      heldout[window] = [r[1] for r in runs]
  ref = float(np.mean(noise[windows[0]]))
  print(json.dumps({
      "benchmark": "loss_noise", "config": FLAGS.config, "seeds": seeds,
      "fit_steps": [FLAGS.fit_from, FLAGS.fit_to],
      "residual_std": {str(w): round(float(np.mean(v)), 5) for w, v in noise.items()},
      "residual_std_per_seed": {str(w): [round(x, 5) for x in v] for w, v in noise.items()},
      "heldout_loss": {str(w): [round(x, 4) for x in v] for w, v in heldout.items()},
      "heldout_loss_mean": {str(w): round(float(np.mean(v)), 4) for w, v in heldout.items()},
      "noise_ratio_vs_first": {str(w): round(ref / float(np.mean(v)), 3)
                               for w, v in noise.items()}}))


if __name__ == "__main__":
  app.run(main)
