"""XLA's compiled temporaries of one MoE layer's routed experts, forward +
backward (grads of x, routing weights and expert weights), per dispatch, at
a per-device shape like moe_9b's (d 1280, 144 experts of FFN 640, top-8).
Nothing is allocated: shapes only.

  python benchmarks/moe_memory.py --tokens=8192,16384

Prints one JSON line: temp bytes per dispatch and tokens, and each one's
ratio to `gather`'s.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

import common
from nitp_jax import grouped, moe

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["8192", "16384"], "Tokens per device.")
flags.DEFINE_integer("seq_len", 8192, "Tokens per sequence (gather's capacity group).")
flags.DEFINE_integer("d_model", 1280, "Model width.")
flags.DEFINE_integer("experts", 144, "Routed experts.")
flags.DEFINE_integer("top_k", 8, "Experts per token.")
flags.DEFINE_integer("expert_ffn", 640, "Hidden size of each expert.")
flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor of gather.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_list("dispatch", ["gather", "grouped", "ragged"], "Dispatches to compile.")


def layer(dispatch: str, seq_len: int, e: int):
  """y = routed experts(x) for (x_NxD, experts_NxK, weights_NxK, gate, up, down)."""
  def f(x_NxD, experts_NxK, weights_NxK, *w):
    if dispatch == "grouped":
      return grouped.dropless(x_NxD, experts_NxK, weights_NxK, *w)
    r = moe.Routing(experts_NxK, weights_NxK, None, None)
    if dispatch == "gather":
      n, d = x_NxD.shape
      return moe.dispatch_gather(x_NxD.reshape(n // seq_len, seq_len, d), r, w, e,
                                 FLAGS.capacity_factor)[0].reshape(n, d)
    return moe.dispatch_ragged(x_NxD, r, w, e)[0]
  return f


def temp_bytes(dispatch: str, n: int) -> int:
  d, e, k, f = FLAGS.d_model, FLAGS.experts, FLAGS.top_k, FLAGS.expert_ffn
  cdt = jnp.dtype(FLAGS.dtype)
  s = jax.ShapeDtypeStruct
  args = (s((n, d), cdt), s((n, k), jnp.int32), s((n, k), jnp.float32),
          s((e, d, f), cdt), s((e, d, f), cdt), s((e, f, d), cdt))
  fn = layer(dispatch, min(FLAGS.seq_len, n), e)
  loss = lambda x, ex, wk, *w: jnp.sum(fn(x, ex, wk, *w).astype(jnp.float32) ** 2)
  grad = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4, 5)))
  return int(grad.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def main(argv) -> None:
  del argv
  out = {}
  for n in map(int, FLAGS.tokens):
    out[str(n)] = {dsp: temp_bytes(dsp, n) for dsp in FLAGS.dispatch}
  ratio = {n: {dsp: common.rnd(b / v["gather"], 3) for dsp, b in v.items()}
           for n, v in out.items() if "gather" in v}
  print(json.dumps({
      "benchmark": "moe_memory", **common.device_info(), "d_model": FLAGS.d_model,
      "experts": FLAGS.experts, "top_k": FLAGS.top_k, "expert_ffn": FLAGS.expert_ffn,
      "dtype": FLAGS.dtype, "seq_len": FLAGS.seq_len, "capacity_factor": FLAGS.capacity_factor,
      "grouped_block": {n: grouped.default_block(int(n) * FLAGS.top_k, FLAGS.experts,
                                               FLAGS.d_model * FLAGS.expert_ffn)
                        for n in out},
      "temp_bytes": out, "temp_vs_gather": ratio,
  }))


if __name__ == "__main__":
  app.run(main)
