"""Plot runs side by side from their metrics.jsonl (paper Figs. 1 and 5).

  python -m nitp_jax.plot runs/ntp runs/nitp --out=compare.png

Four panels against step, one line per run (legend: the run directory's
name): training NTP loss with the held-out loss (dashed, at each eval),
training NITP loss, effective rank and mean pairwise cosine of the last
hidden states on the held-out probe batch. Losses are drawn raw (faint) and
smoothed by a centred moving average over 5% of the points. Runs without
NITP have no NITP line. A single run is titled by its name.

`plot_groups` draws groups of runs (one arm, several seeds): the mean over
the seeds as the line and mean ± one standard deviation as a band.
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
# (record kind, key, title, y label, smooth, overlay (kind, key, label suffix) or None)
PANELS = (
    ("train", "ntp", "NTP loss: training and held-out", "cross-entropy (nats / token)", True,
     ("eval", "ntp", " held-out")),
    ("train", "nitp", "Training NITP loss", "NITP loss (cosine: 1 − cos)", True, None),
    ("probe", "erank_last", "Effective rank of last hidden states",
     "effective rank (held-out probe)", False, None),
    ("probe", "cos_last", "Mean pairwise cosine of last hidden states",
     "mean cosine (held-out probe)", False, None),
)


def read_records(run_dir: str) -> list[dict]:
  """The records of <run_dir>/metrics.jsonl (a line cut short is skipped)."""
  path = storage.join(run_dir, "metrics.jsonl")
  storage.check(run_dir)
  if not storage.isfile(path):
    raise PlotError(f"{run_dir!r} has no metrics.jsonl: pass the directory of a training run "
                    "(nitp_jax.train's --workdir)")
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


def seed_series(runs: list[list[dict]], kind: str, key: str, smoothed: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(steps, mean, std) over the runs of a group at the steps all of them
  logged (each run smoothed first when `smoothed`); None without points."""
  per_run = [series(records, kind, key) for records in runs]
  per_run = [(s, smooth(v) if smoothed and len(v) > 1 else v) for s, v in per_run if len(s)]
  if not per_run:
    return None
  common = per_run[0][0]
  for steps, _ in per_run[1:]:
    common = np.intersect1d(common, steps)
  values = np.stack([v[np.searchsorted(s, common)] for s, v in per_run])
  return common, values.mean(axis=0), values.std(axis=0)


def _draw_group(ax, label: str, runs: list[list[dict]], kind: str, key: str, smoothed: bool,
                color, dashed: bool = False) -> bool:
  """One group's line (and band, with several runs); False if it has no points."""
  style = {"color": color, "linewidth": 2.0, "linestyle": "--" if dashed else "-"}
  if len(runs) == 1:
    steps, values = series(runs[0], kind, key)
    if not len(steps):
      return False
    if smoothed and len(values) > 1:
      ax.plot(steps, values, color=color, alpha=0.25, linewidth=1.0)
      values = smooth(values)
    ax.plot(steps, values, label=label, marker="o" if dashed or len(values) <= 30 else None,
            markersize=4, **style)
    return True
  found = seed_series(runs, kind, key, smoothed)
  if found is None or not len(found[0]):
    return False
  steps, mean, std = found
  ax.plot(steps, mean, label=f"{label} (mean of {len(runs)})",
          marker="o" if dashed else None, markersize=4, **style)
  ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
  return True


def _draw_panel(ax, groups: list[tuple[str, list[list[dict]]]], panel: tuple,
                colors: list) -> None:
  kind, key, title, ylabel, smoothed, overlay = panel
  drawn = 0
  for (label, runs), color in zip(groups, colors):
    drawn += _draw_group(ax, label, runs, kind, key, smoothed, color)
    if overlay is not None:
      drawn += _draw_group(ax, label + overlay[2], runs, overlay[0], overlay[1], False, color,
                           dashed=True)
  ax.set_title(title)
  ax.set_xlabel("training step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if drawn:
    ax.legend(loc="best", framealpha=0.85)
  else:
    ax.text(0.5, 0.5, f"no {key} records", ha="center", va="center",
            transform=ax.transAxes, color="gray")


def figure_path(out_path: str) -> str:
  """`out_path` as matplotlib writes it (".png" added when it has no
  extension); PlotError for an extension matplotlib cannot write."""
  extension = os.path.splitext(out_path)[1].lstrip(".").lower()
  if not extension:
    return out_path + ".png"
  formats = plt.figure().canvas.get_supported_filetypes()
  plt.close("all")
  if extension not in formats:
    raise PlotError(f"cannot write a figure to {out_path!r}: matplotlib writes "
                    f"{', '.join('.' + f for f in sorted(formats))}; use e.g. a .png path")
  return out_path


def plot_groups(groups: dict[str, Sequence[str]], out_path: str, title: str | None = None
                ) -> str:
  """Write the 2x2 figure with one line (and seed band) per group of run
  directories to `out_path` (PNG, or the format its extension names);
  return the path written."""
  if not groups or not all(groups.values()):
    raise PlotError("no run directories given: pass one or more training run directories "
                    "(nitp_jax.train's --workdir)")
  out_path = figure_path(out_path)
  loaded = [(label, [read_records(d) for d in dirs]) for label, dirs in groups.items()]
  colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(loaded))]
  if title is None:
    title = loaded[0][0] if len(loaded) == 1 else "NTP vs NITP: " + ", ".join(groups)
  with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12,
                       "legend.fontsize": 11}):
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, panel in zip(axes.flat, PANELS):
      _draw_panel(ax, loaded, panel, colors)
    fig.suptitle(title, fontsize=15)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
  return out_path


def plot_runs(run_dirs: Sequence[str], out_path: str, title: str | None = None) -> str:
  """`plot_groups` with one run per line, labelled by its directory name."""
  if not run_dirs:
    raise PlotError("no run directories given: pass one or more training run directories "
                    "(nitp_jax.train's --workdir)")
  return plot_groups({label: [d] for label, d in zip(run_labels(run_dirs), run_dirs)},
                     out_path, title)


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
