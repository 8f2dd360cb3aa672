"""Data throughput: prepare (tokenize + write) and pipeline tokens/s.

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
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
      real += int((next(it)["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - start
  slots = FLAGS.batches * FLAGS.batch * FLAGS.seq_len
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
  }))


if __name__ == "__main__":
  app.run(main)
