"""One MoE layer, forward + backward, with each dispatch (`dropless`, the
default, `ragged`, `dense`, and the capacity-dropping `gather` / `capacity`)
against a dense SwiGLU FFN with the same active FLOPs, at fine-grained
settings scaled down from the paper's (64 experts, top-8, 1 shared expert,
expert FFN d/2), alternating in one process.

  python benchmarks/moe_dispatch.py            # CPU, ~1-2 min

Prints one JSON line; `throughput_vs_dense` is dense-FFN time / MoE time (the
target on CPU: dropless at >= 0.5), `dropless_vs_gather` gather's time /
dropless's (paired per round). `capacity_group<G>` re-runs the capacity
dispatch with token groups of G instead of whole sequences, since its one-hot
dispatch/combine einsums cost O(group × experts × capacity × d); `gather`
fills the same slots by index (`gather_max_abs_diff` checks its output
against capacity's); `dropless_max_abs_diff` checks dropless against dense.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

import common
from nitp_jax import grouped
from nitp_jax.layers import SwiGLU, dtype
from nitp_jax.model_config import MoEConfig
from nitp_jax.moe import MoE

DISPATCHES = ("dropless", "gather", "capacity", "ragged", "dense")
FLAGS = flags.FLAGS
flags.DEFINE_integer("d_model", 256, "Model width.")
flags.DEFINE_integer("experts", 64, "Routed experts.")
flags.DEFINE_integer("top_k", 8, "Experts per token.")
flags.DEFINE_integer("shared", 1, "Shared experts.")
flags.DEFINE_integer("expert_ffn", 128, "Hidden size of each (routed and shared) expert.")
flags.DEFINE_integer("batch", 8, "Sequences.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (the capacity group).")
flags.DEFINE_integer("group", 64, "Group size of the capacity_group variant (0 = skip).")
flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
flags.DEFINE_integer("reps", 1, "Calls per variant per round.")


def moe_module(dispatch: str) -> MoE:
  cdt = dtype(FLAGS.dtype)
  cfg = MoEConfig(num_experts=FLAGS.experts, top_k=FLAGS.top_k, expert_ffn=FLAGS.expert_ffn,
                  num_shared_experts=FLAGS.shared, shared_expert_ffn=FLAGS.expert_ffn,
                  dispatch=dispatch, capacity_factor=FLAGS.capacity_factor)
  return MoE(cfg, 0.02, cdt, jnp.float32)


def fwd_bwd(module, params, x_BxTxD, group: int = 0):
  """(run, output): run() computes grads of a scalar of the layer's output
  w.r.t. params and input (jitted, traced now)."""
  def loss(p, x):
    if group:
      x = x.reshape(-1, group, x.shape[-1])
    y = module.apply({"params": p}, x)
    y = y[0] if isinstance(y, tuple) else y
    return jnp.mean(y.astype(jnp.float32) ** 2), y.reshape(x_BxTxD.shape)
  g = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  _, y = jax.block_until_ready(g(params, x_BxTxD))
  return (lambda: jax.block_until_ready(g(params, x_BxTxD))), y


def main(argv) -> None:
  del argv
  d, k, f = FLAGS.d_model, FLAGS.top_k, FLAGS.expert_ffn
  x = jax.random.normal(jax.random.key(0), (FLAGS.batch, FLAGS.seq_len, d))
  moe_params = moe_module("capacity").init(jax.random.key(1), x[:, :8])["params"]
  dense_ffn = (k + FLAGS.shared) * f
  dense = SwiGLU(dense_ffn, 0.02, dtype(FLAGS.dtype), jnp.float32)
  dense_params = dense.init(jax.random.key(2), x[:, :8])["params"]
  fns, outs = {}, {}
  fns["dense_ffn"], _ = fwd_bwd(dense, dense_params, x)
  for dispatch in DISPATCHES:
    fns[dispatch], outs[dispatch] = fwd_bwd(moe_module(dispatch), moe_params, x)
  if FLAGS.group and FLAGS.group < FLAGS.seq_len:
    fns[f"capacity_group{FLAGS.group}"], _ = fwd_bwd(moe_module("capacity"), moe_params, x,
                                                     FLAGS.group)
  times = common.alternate({n: (lambda fn=fn: [fn() for _ in range(FLAGS.reps)])
                            for n, fn in fns.items()}, FLAGS.rounds)[common.primary_clock()]
  ratio = {n: common.rnd(common.paired_ratio(times["dense_ffn"], times[n]), 3)
           for n in fns if n != "dense_ffn"}
  library = {n: r for n, r in ratio.items() if n in DISPATCHES}
  best = max(library, key=library.get)
  print(json.dumps({
      "benchmark": "moe_dispatch", **common.device_info(), "clock": common.primary_clock(),
      "d_model": d, "experts": FLAGS.experts, "top_k": k, "shared": FLAGS.shared,
      "expert_ffn": f, "dense_ffn": dense_ffn, "tokens": FLAGS.batch * FLAGS.seq_len,
      "group": FLAGS.seq_len, "capacity_factor": FLAGS.capacity_factor, "dtype": FLAGS.dtype,
      "seconds": {n: common.rnd(common.median(t) / FLAGS.reps) for n, t in times.items()},
      "throughput_vs_dense": ratio, "best": best,
      "dropless_vs_gather": common.rnd(common.paired_ratio(times["gather"], times["dropless"]), 3),
      "target": "dropless throughput_vs_dense >= 0.5", "target_met": ratio["dropless"] >= 0.5,
      "gather_max_abs_diff": float(jnp.max(jnp.abs(outs["gather"] - outs["capacity"]))),
      "dropless_block": grouped.default_block(FLAGS.batch * FLAGS.seq_len * k, FLAGS.experts,
                                              d * f),
      "dropless_max_abs_diff": float(jnp.max(jnp.abs(outs["dropless"] - outs["dense"]))),
  }))


if __name__ == "__main__":
  app.run(main)
