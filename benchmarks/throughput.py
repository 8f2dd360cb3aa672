"""Training throughput and MFU of whole train steps (forward, backward,
AdamW), per preset, against the device's peak: on CPU a float32 matmul
measured in the same alternating rounds, on a known accelerator its bf16
peak from nitp_jax/flops.py.

  python benchmarks/throughput.py                   # CPU: tiny, dense_small, moe_small
  python benchmarks/throughput.py --preset=dense_3b --dtype=bfloat16 \
      --seq_len=4096 --batch=4 --steps=5            # one GPU (see gpu.sh)

Prints one JSON line. MFU counts model FLOPs (flops.training_flops_per_token:
matmuls, causal attention scores and NITP), not remat recomputation.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags

import common
from nitp_jax import flops

FLAGS = flags.FLAGS
flags.DEFINE_list("preset", ["tiny", "dense_small", "moe_small"],
                  "benchmarks/common.py presets or configs/ names.")
flags.DEFINE_string("dtype", "", "Compute dtype ('' = the preset's).")
flags.DEFINE_integer("seq_len", 0, "Sequence length (0 = the preset's).")
flags.DEFINE_integer("batch", 0, "Sequences per step (0 = the preset's).")
flags.DEFINE_integer("layers", 0, "Number of layers (0 = the preset's).")
flags.DEFINE_string("remat", "", "Remat policy ('' = the preset's).")
flags.DEFINE_integer("ce_chunk", -1, "Chunked cross-entropy (-1 = the preset's).")
flags.DEFINE_string("attention", "", "Attention kernel ('' = the preset's).")
flags.DEFINE_list("dispatch", [""], "MoE dispatches ('' = the preset's); several "
                  "(e.g. dropless,gather) time each preset with each, as <preset>@<dispatch>.")
flags.DEFINE_integer("steps", 2, "Steps per preset per round.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
flags.DEFINE_integer("matmul_n", 1024, "Size of the CPU peak matmul.")


def make_config(preset: str, dispatch: str = ""):
  return common.apply_overrides(
      common.load_preset(preset), dtype=FLAGS.dtype, seq_len=FLAGS.seq_len,
      batch=FLAGS.batch, layers=FLAGS.layers, remat=FLAGS.remat, ce_chunk=FLAGS.ce_chunk,
      attention=FLAGS.attention, dispatch=dispatch)


class MatmulPeak:
  """`reps` jitted float32 n×n matmuls per call: the CPU's peak, timed in
  the same rounds (and with the same clocks) as the train steps."""

  def __init__(self, n: int, reps: int = 4):
    self.a, self.b = jax.random.normal(jax.random.key(0), (2, n, n))
    self.matmul, self.reps = jax.jit(jax.numpy.matmul), reps
    self.flops = 2.0 * n ** 3 * reps
    self()

  def __call__(self) -> None:
    for _ in range(self.reps):
      out = self.matmul(self.a, self.b)
    out.block_until_ready()


def summary(cfg, step_s: list[float], peak: float, compile_s: float) -> dict:
  """Tokens/s, TFLOP/s and MFU (median step time against the peak) of one
  preset; step_s per round."""
  m, t = cfg.model, cfg.train
  tokens = t.global_batch * t.seq_len
  fpt = flops.training_flops_per_token(cfg)
  median_s = common.median(step_s)
  return {"d_model": m.d_model, "layers": m.num_layers, "experts": m.moe.num_experts,
          "vocab": m.vocab_size, "seq_len": t.seq_len, "batch": t.global_batch,
          "dtype": m.compute_dtype, "remat": m.remat_policy, "ce_chunk": m.ce_chunk,
          "attention": m.attention_impl, "params_active": flops.count_params(cfg)["active"],
          "flops_per_token": common.rnd(fpt), "first_step_s": round(compile_s, 2),
          "step_s": common.rnd(median_s), "tokens_per_s": round(tokens / median_s),
          "model_tflops_per_device": common.rnd(fpt * tokens / median_s / jax.device_count()
                                                / 1e12),
          "mfu": common.rnd(flops.mfu(fpt, tokens / median_s, peak, jax.device_count()), 3)}


def brief(results: dict) -> dict:
  """Only the timing fields, for the secondary clock."""
  return {p: ({k: r[k] for k in ("step_s", "tokens_per_s", "mfu")} if isinstance(r, dict) else r)
          for p, r in results.items()}


def main(argv) -> None:
  del argv
  dispatches = FLAGS.dispatch or [""]
  configs = {p + (f"@{d}" if len(dispatches) > 1 else ""): make_config(p, d)
             for p in FLAGS.preset for d in dispatches}
  runs = {p: common.Stepper(c) for p, c in configs.items()}
  fns = {p: (lambda s=s: s.run(FLAGS.steps)) for p, s in runs.items()}
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:
    fns["peak"] = matmul = MatmulPeak(FLAGS.matmul_n)
  times = common.alternate(fns, FLAGS.rounds)
  out = {}
  # On CPU both clocks are reported: process CPU time is robust to other
  # tenants of a shared machine, wall time is what a user waits.
  for clock in (("cpu", "wall") if on_cpu else ("wall",)):
    # The peak is the best round (contention only lowers it): conservative MFU.
    peak = (max(matmul.flops / x for x in times[clock]["peak"]) / jax.local_device_count()
            if on_cpu else flops.peak_flops_per_device())
    out[clock] = {p: summary(configs[p], [x / FLAGS.steps for x in times[clock][p]], peak,
                             runs[p].compile_s) for p in runs}
    out[clock]["peak_flops_per_device"] = common.rnd(peak)
  clock = common.primary_clock()
  dense_small = out[clock].get("dense_small", {}).get("mfu")
  step_ratios = {}  # gather's step time / dropless's, paired per round
  for p in FLAGS.preset:
    if {f"{p}@dropless", f"{p}@gather"} <= set(runs):
      step_ratios[p] = common.rnd(common.paired_ratio(times[clock][f"{p}@gather"],
                                                      times[clock][f"{p}@dropless"]), 3)
  print(json.dumps({
      "benchmark": "throughput", **common.device_info(), "clock": clock,
      "peak_source": "measured float32 matmul" if on_cpu else "bf16 table (flops.py)",
      "results": out[clock], **({"results_wall": brief(out["wall"])} if on_cpu else {}),
      "target": "dense_small mfu >= 0.4 (CPU)" if on_cpu else "see gpu.sh",
      "target_met": dense_small >= 0.4 if dense_small is not None else None,
      **({"gather_over_dropless_step_time": step_ratios} if step_ratios else {}),
      **({"device_peak_bytes": peak_bytes} if (peak_bytes := device_peak_bytes()) else {}),
  }))


def device_peak_bytes() -> int | None:
  """The first device's peak memory in use over this process (GPU/TPU; None
  where the backend does not report it, as on CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


if __name__ == "__main__":
  app.run(main)
