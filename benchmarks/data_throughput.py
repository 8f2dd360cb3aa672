"""Data throughput: prepare (tokenize + write) and pipeline tokens/s, against
what training the tiny config consumes (tokens/s of its jitted train step on
the same batches), measured in one process.

  python benchmarks/data_throughput.py [--input=GLOB] [--batches=300]

Prints one JSON line. The default corpus is the stdlib's top-level modules
(~170 files, ~5 MB): small enough to run in seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import jax  # noqa: E402

from nitp_jax import config as config_lib  # noqa: E402
from nitp_jax.data import pipeline  # noqa: E402
from nitp_jax.data import prepare as prepare_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("input", "", "Corpus; '' = <stdlib>/*.py.")
flags.DEFINE_integer("vocab_size", 4096, "Tokenizer vocab (configs/tiny.py).")
flags.DEFINE_integer("seq_len", 256, "T.")
flags.DEFINE_integer("batch", 8, "Rows per batch.")
flags.DEFINE_integer("batches", 300, "Batches timed.")
flags.DEFINE_integer("workers", 2, "Tokenizer threads in prepare.")
flags.DEFINE_integer("worker_count", 0, "Grain worker processes.")
flags.DEFINE_integer("train_steps", 10, "Tiny-config train steps timed.")


def train_tokens_per_s(batches: list[dict], steps: int) -> float:
  """Tokens/s the tiny config's train step consumes (median of `steps`)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load_config_file(os.path.join(root, "configs", "tiny.py"))
  cfg.train.seq_len = FLAGS.seq_len
  cfg.train.global_batch = FLAGS.batch
  train_step, state = common.train_step_and_state(cfg)
  state, m = train_step(state, batches[0])  # compile
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, m = train_step(state, batches[(i + 1) % len(batches)])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  return FLAGS.batch * FLAGS.seq_len / sorted(times)[len(times) // 2]


def main(argv) -> None:
  del argv
  spec = FLAGS.input or os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
  with tempfile.TemporaryDirectory() as tmp:
    trained, reused = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    start = time.perf_counter()
    manifest = prepare_lib.prepare(spec, trained, FLAGS.vocab_size,
                                   workers=FLAGS.workers)
    with_training = time.perf_counter() - start
    start = time.perf_counter()
    prepare_lib.prepare(spec, reused, FLAGS.vocab_size,
                        tokenizer_path=os.path.join(trained, "tokenizer.model"),
                        workers=FLAGS.workers)
    tokenize = time.perf_counter() - start
    tokens = sum(manifest["tokens"].values())

    it = pipeline.make_train_iterator(trained, FLAGS.seq_len, FLAGS.batch, 0,
                                      0, 1, worker_count=FLAGS.worker_count)
    next(it)  # start-up (and worker spawn) is not throughput
    real = 0
    kept = []
    start = time.perf_counter()
    for i in range(FLAGS.batches):
      batch = next(it)
      real += int((batch["segment_ids"] > 0).sum())
      if i < 4:
        kept.append(batch)
    elapsed = time.perf_counter() - start
  slots = FLAGS.batches * FLAGS.batch * FLAGS.seq_len
  train_tps = train_tokens_per_s(kept, FLAGS.train_steps)
  print(json.dumps({
      "benchmark": "data_throughput",
      "corpus": spec,
      "documents": sum(manifest["documents"].values()),
      "tokens": tokens,
      "vocab_size": manifest["tokenizer"]["vocab_size"],
      "prepare_seconds_with_tokenizer_training": round(with_training, 3),
      "prepare_tokens_per_s": round(tokens / tokenize),
      "seq_len": FLAGS.seq_len,
      "batch": FLAGS.batch,
      "batches": FLAGS.batches,
      "worker_count": FLAGS.worker_count,
      "pipeline_tokens_per_s": round(slots / elapsed),
      "pipeline_real_tokens_per_s": round(real / elapsed),
      "padding_fraction": round(1 - real / slots, 4),
      "tiny_train_tokens_per_s": round(train_tps),
      "pipeline_over_training": round(slots / elapsed / train_tps, 1),
  }))


if __name__ == "__main__":
  app.run(main)
