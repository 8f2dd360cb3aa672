"""Compile time of the train step at 4 and at 24 layers (scan over layers
keeps it flat in depth), alternating in one process; nothing is executed.

  python benchmarks/compile_time.py           # CPU, ~1 min

Prints one JSON line; target: ratio (24 / 4 layers) <= 1.5.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

import common

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "benchmarks/common.py preset or configs/ name.")
flags.DEFINE_list("layers", ["4", "24"], "Depths to compare (first = baseline).")
flags.DEFINE_string("dtype", "", "Compute dtype ('' = the preset's).")
flags.DEFINE_string("remat", "", "Remat policy ('' = the preset's).")
flags.DEFINE_bool("scan", True, "Scan over layers (False: unrolled, for contrast).")
flags.DEFINE_integer("rounds", 3, "Alternating rounds.")


def compile_seconds(layers: int) -> dict[str, float]:
  """Seconds (wall and process CPU) to trace+lower and to compile a fresh
  train step."""
  cfg = common.apply_overrides(common.load_preset(FLAGS.preset), dtype=FLAGS.dtype,
                               layers=layers, remat=FLAGS.remat)
  cfg.model.scan_layers = FLAGS.scan
  clocks = [time.perf_counter(), time.process_time()]
  lowered = common.lowered_train_step(cfg)
  mid = [time.perf_counter(), time.process_time()]
  lowered.compile()
  end = [time.perf_counter(), time.process_time()]
  return {f"{phase}_{clock}": b[i] - a[i]
          for phase, (a, b) in (("lower", (clocks, mid)), ("compile", (mid, end)),
                                ("total", (clocks, end)))
          for i, clock in enumerate(("wall", "cpu"))}


def main(argv) -> None:
  del argv
  depths = [int(x) for x in FLAGS.layers]
  compile_seconds(2)  # one-time start-up costs of tracing and XLA
  results: dict[int, list[dict]] = {d: [] for d in depths}
  common.alternate({d: (lambda d=d: results[d].append(compile_seconds(d))) for d in depths},
                   FLAGS.rounds)
  keys = results[depths[0]][0].keys()
  med = {d: {k: round(common.median([r[k] for r in rs]), 3) for k in keys}
         for d, rs in results.items()}
  clock = common.primary_clock()
  ratio = {c: med[depths[-1]][f"total_{c}"] / med[depths[0]][f"total_{c}"] for c in ("wall", "cpu")}
  print(json.dumps({
      "benchmark": "compile_time", **common.device_info(), "preset": FLAGS.preset,
      "scan_layers": FLAGS.scan, "rounds": FLAGS.rounds, "clock": clock,
      "seconds": {str(d): m for d, m in med.items()},
      "ratio": round(ratio[clock], 3), "ratio_wall": round(ratio["wall"], 3),
      "target_met": ratio[clock] <= 1.5,
  }))


if __name__ == "__main__":
  app.run(main)
