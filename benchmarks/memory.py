"""Compiled train-step memory (`memory_analysis()`, nothing is executed):
(1) remat policies none / full / dots / dots_no_batch on one config;
(2) full logits against the chunked cross-entropy at vocabulary 152,064,
with a scan of the optimised HLO for float32 buffers holding [B, T, V].

  python benchmarks/memory.py                 # CPU, ~1-2 min

Prints one JSON line. Target: the chunked loss keeps no [B, T, V] float32
buffer (`largest_f32_vocab_buffer` < B·T·V elements).
"""

from __future__ import annotations

import json
import math
import re

from absl import app, flags

import common

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "dense_small", "Config for the remat comparison.")
flags.DEFINE_list("remat", ["none", "full", "dots", "dots_no_batch"], "Policies.")
flags.DEFINE_integer("seq_len", 512, "Sequence length of the remat comparison.")
flags.DEFINE_integer("layers", 8, "Layers of the remat comparison.")
flags.DEFINE_integer("vocab", 152_064, "Vocabulary of the cross-entropy comparison.")
flags.DEFINE_integer("ce_seq_len", 1024, "Sequence length of the cross-entropy comparison.")
flags.DEFINE_integer("ce_batch", 2, "Batch of the cross-entropy comparison.")
flags.DEFINE_integer("ce_chunk", 128, "Positions per cross-entropy chunk.")
flags.DEFINE_string("dtype", "", "Compute dtype ('' = the preset's).")

MIB = 2 ** 20


def compiled_step(cfg):
  return common.lowered_train_step(cfg).compile()


def stats(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  return {"temp_mib": round(m.temp_size_in_bytes / MIB, 1),
          "argument_mib": round(m.argument_size_in_bytes / MIB, 1),
          "output_mib": round(m.output_size_in_bytes / MIB, 1),
          "alias_mib": round(m.alias_size_in_bytes / MIB, 1)}


def largest_f32_with_dim(hlo: str, dim: int) -> int:
  """Elements of the largest f32 array in the HLO text with a `dim` axis."""
  sizes = [math.prod(int(x) for x in dims.split(",")) for dims in
           re.findall(r"f32\[([0-9,]+)\]", hlo) if str(dim) in dims.split(",")]
  return max(sizes, default=0)


def remat_comparison() -> dict:
  out = {}
  for policy in FLAGS.remat:
    cfg = common.apply_overrides(common.load_preset(FLAGS.preset), dtype=FLAGS.dtype,
                                 seq_len=FLAGS.seq_len, layers=FLAGS.layers, remat=policy)
    out[policy] = stats(compiled_step(cfg))
  return out


def ce_config(chunk: int):
  c = common.load_preset("tiny")
  c.model.vocab_size, c.model.num_layers, c.nitp.target_layer = FLAGS.vocab, 2, 1
  return common.apply_overrides(c, dtype=FLAGS.dtype, seq_len=FLAGS.ce_seq_len,
                                batch=FLAGS.ce_batch, ce_chunk=chunk)


def ce_comparison() -> dict:
  b, t, v = FLAGS.ce_batch, FLAGS.ce_seq_len, FLAGS.vocab
  out = {"batch": b, "seq_len": t, "vocab": v, "ce_chunk": FLAGS.ce_chunk,
         "bxtxv_f32_mib": round(b * t * v * 4 / MIB, 1)}
  for name, chunk in (("full_logits", 0), ("chunked", FLAGS.ce_chunk)):
    compiled = compiled_step(ce_config(chunk))
    largest = largest_f32_with_dim(compiled.as_text(), v)
    out[name] = {**stats(compiled), "largest_f32_vocab_buffer": largest,
                 "holds_bxtxv_f32": largest >= b * t * v}
  return out


def main(argv) -> None:
  del argv
  ce = ce_comparison()
  print(json.dumps({
      "benchmark": "memory", **common.device_info(), "remat_preset": FLAGS.preset,
      "remat_seq_len": FLAGS.seq_len, "remat_layers": FLAGS.layers,
      "remat": remat_comparison(), "cross_entropy": ce,
      "target_met": not ce["chunked"]["holds_bxtxv_f32"],
  }))


if __name__ == "__main__":
  app.run(main)
