"""Plot runs side by side from their metrics.jsonl (paper Figs. 1 and 5).

  python -m nitp_jax.plot runs/ntp runs/nitp --out=compare.png

Four panels against step, one line per run (legend: the run directory's
name): training NTP loss, training NITP loss, effective rank and mean
pairwise cosine of the last hidden states on the held-out probe batch.
Losses are drawn raw (faint) and smoothed by a centred moving average over
5% of the points. Runs without NITP have no NITP line.
"""

from __future__ import annotations

import io
import json
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from absl import flags  # pylint: disable=wrong-import-position

from nitp_jax import cli  # pylint: disable=wrong-import-position
from nitp_jax import storage  # pylint: disable=wrong-import-position
from nitp_jax.errors import PlotError  # pylint: disable=wrong-import-position

Series = tuple[np.ndarray, np.ndarray]
# (record kind, key, title, y label, smooth)
PANELS = (
    ("train", "ntp", "Training NTP loss", "cross-entropy (nats / token)", True),
    ("train", "nitp", "Training NITP loss", "NITP loss (cosine: 1 − cos)", True),
    ("probe", "erank_last", "Effective rank of last hidden states",
     "effective rank (held-out probe)", False),
    ("probe", "cos_last", "Mean pairwise cosine of last hidden states",
     "mean cosine (held-out probe)", False),
)


def read_records(run_dir: str) -> list[dict]:
  """The records of <run_dir>/metrics.jsonl (a line cut short is skipped)."""
  path = storage.join(run_dir, "metrics.jsonl")
  storage.check(run_dir)
  if not storage.isfile(path):
    raise PlotError(f"{run_dir!r} has no metrics.jsonl: pass the --workdir of a training run")
  records = []
  with io.StringIO(storage.read_text(path)) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


def series(records: list[dict], kind: str, key: str) -> Series:
  """(steps, values) of `key` in records of `kind`, by step, finite values only."""
  points = sorted((r["step"], r[key]) for r in records
                  if r.get("kind") == kind and key in r and r[key] is not None)
  points = [(s, v) for s, v in points if np.isfinite(v)]
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps, float), np.asarray(values, float)


def smooth(values: np.ndarray, fraction: float = 0.05) -> np.ndarray:
  """Centred moving average over ~`fraction` of the points, the window
  narrowed symmetrically at the ends (so the first and last points, and fast
  early drops, are kept); unchanged when the window is a single point."""
  n = len(values)
  half = np.minimum(int(round(n * fraction)) // 2, np.minimum(np.arange(n), n - 1 - np.arange(n)))
  cumsum = np.concatenate([[0.0], np.cumsum(values)])
  lo, hi = np.arange(n) - half, np.arange(n) + half + 1
  return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def run_labels(run_dirs: Sequence[str]) -> list[str]:
  """Directory names; parent/name where two runs share a name."""
  paths = [os.path.normpath(os.path.abspath(d)) for d in run_dirs]
  names = [os.path.basename(p) for p in paths]
  return [os.path.join(os.path.basename(os.path.dirname(p)), n) if names.count(n) > 1 else n
          for p, n in zip(paths, names)]


def _draw_panel(ax, runs: list[tuple[str, list[dict]]], panel: tuple, colors: list) -> None:
  kind, key, title, ylabel, smoothed = panel
  drawn = 0
  for (label, records), color in zip(runs, colors):
    steps, values = series(records, kind, key)
    if not len(steps):
      continue
    drawn += 1
    if smoothed and len(values) > 1:
      ax.plot(steps, values, color=color, alpha=0.25, linewidth=1.0)
      ax.plot(steps, smooth(values), color=color, linewidth=2.0, label=label)
    else:
      ax.plot(steps, values, color=color, linewidth=2.0, label=label,
              marker="o" if len(values) <= 30 else None, markersize=4)
  ax.set_title(title)
  ax.set_xlabel("training step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if drawn:
    ax.legend(loc="best", framealpha=0.85)
  else:
    ax.text(0.5, 0.5, f"no {key} records", ha="center", va="center",
            transform=ax.transAxes, color="gray")


def plot_runs(run_dirs: Sequence[str], out_path: str, title: str | None = None) -> str:
  """Write the 2x2 figure for `run_dirs` to `out_path` (PNG); return out_path."""
  if not run_dirs:
    raise PlotError("no run directories given: pass one or more training --workdir paths")
  runs = [(label, read_records(d)) for label, d in zip(run_labels(run_dirs), run_dirs)]
  colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
  with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12,
                       "legend.fontsize": 11}):
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, panel in zip(axes.flat, PANELS):
      _draw_panel(ax, runs, panel, colors)
    fig.suptitle(title or "NTP vs NITP: " + ", ".join(label for label, _ in runs), fontsize=15)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
  return out_path


def main(argv: list[str]) -> None:
  try:
    out = plot_runs(argv[1:], flags.FLAGS.out)
  except OSError as e:
    raise PlotError(str(e)) from e
  print(f"wrote {out}")


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Output PNG file.", required=True)


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="RUN_DIR [RUN_DIR ...] --out=FILE.png", positional=True)
