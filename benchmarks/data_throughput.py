"""Data throughput.

  python benchmarks/data_throughput.py [--mode=streaming] [--seconds=10]
  python benchmarks/data_throughput.py --mode=prepared [--input=GLOB] [--batches=300]

streaming (default): tokens/s of one host's streaming pipeline
(data.streaming=true: read, tokenize, split, shuffle, pack, batch) with
--stream_workers Grain worker processes, for each tokenizer kind
(SentencePiece .model, byte-level BPE tokenizer.json) x format (.parquet,
.jsonl.zst), on a synthetic corpus it writes itself (the stdlib's top-level
modules, ~5 MB, as 4 files of each format; both tokenizers trained on it).
Prints one JSON line per variant, then one with the target: the per-host
token consumption of configs/moe_9b.py on a TPU v5p host (4 chips) at 50%
MFU, from nitp_jax/flops.py.

prepared: prepare (tokenize + write) and pipeline tokens/s, against what
training the tiny config consumes (tokens/s of its jitted train step on the
same batches), measured in one process. Prints one JSON line.
"""

from __future__ import annotations

import glob
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
from nitp_jax import flops  # noqa: E402
from nitp_jax.data import pipeline  # noqa: E402
from nitp_jax.data import prepare as prepare_lib  # noqa: E402
from nitp_jax.data import streaming  # noqa: E402
from nitp_jax.data import tokenizer as tok_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("input", "", "Corpus; '' = <stdlib>/*.py.")
flags.DEFINE_integer("vocab_size", 4096, "Tokenizer vocab (configs/tiny.py).")
flags.DEFINE_integer("seq_len", 256, "T.")
flags.DEFINE_integer("batch", 8, "Rows per batch.")
flags.DEFINE_integer("batches", 300, "Batches timed.")
flags.DEFINE_integer("workers", 2, "Tokenizer threads in prepare.")
flags.DEFINE_integer("worker_count", 0, "Grain worker processes.")
flags.DEFINE_integer("train_steps", 10, "Tiny-config train steps timed.")
flags.DEFINE_enum("mode", "streaming", ["streaming", "prepared"], "What to measure.")
flags.DEFINE_integer("stream_workers", 2, "Grain worker processes (streaming).")
flags.DEFINE_integer("stream_seq_len", 2048, "T of the streamed batches.")
flags.DEFINE_integer("stream_batch", 8, "Rows per streamed batch.")
flags.DEFINE_float("seconds", 30.0, "Time per streaming variant.")
flags.DEFINE_integer("stream_vocab", 8192, "Vocab of both trained tokenizers.")

STREAM_FILES = 4
V5P_CHIPS_PER_HOST = 4
TARGET_MFU = 0.5


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


def write_corpus(directory: str) -> dict[str, list[str]]:
  """The stdlib's top-level modules as STREAM_FILES .jsonl.zst and .parquet
  files each (one document per module); the files of each format."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  import zstandard  # pylint: disable=import-outside-toplevel
  paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  texts = [open(p, encoding="utf-8").read() for p in paths]
  out = {"parquet": [], "jsonl.zst": []}
  for i in range(STREAM_FILES):
    part = texts[i::STREAM_FILES]
    name = os.path.join(directory, f"part-{i}")
    pq.write_table(pa.table({"text": part}), name + ".parquet")
    lines = "".join(json.dumps({"text": t}) + "\n" for t in part).encode()
    with open(name + ".jsonl.zst", "wb") as f:
      f.write(zstandard.ZstdCompressor().compress(lines))
    out["parquet"].append(name + ".parquet")
    out["jsonl.zst"].append(name + ".jsonl.zst")
  return out


def train_tokenizers(directory: str, texts: list[str], vocab: int) -> dict[str, str]:
  """A SentencePiece .model and a byte-level BPE tokenizer.json (Qwen2's
  kind) trained on `texts`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  sp = tok_lib.train_tokenizer(texts, vocab, os.path.join(directory, "sp"))
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(os.path.join(directory, "bpe"))
  bpe_path = os.path.join(directory, "bpe", "tokenizer.json")
  bpe.save(bpe_path)
  return {"sentencepiece": sp, "tokenizer.json": bpe_path}


def stream_variant(files: list[str], tokenizer_path: str) -> dict:
  """Tokens/s of the streaming pipeline over `files`, for FLAGS.seconds from
  the iterator's creation (worker start-up included: conservative) and from
  its first batch (the workers fill their queues during start-up: optimistic)."""
  start = time.perf_counter()
  it = iter(streaming.make_train_dataset(
      [files], tokenizer_path, FLAGS.stream_seq_len, FLAGS.stream_batch, seed=0,
      process_index=0, process_count=1, worker_count=FLAGS.stream_workers,
      shuffle_window=1024))
  batches = real = 0
  while True:
    batch = next(it)
    if not batches:
      first = time.perf_counter()
    batches += 1
    real += int((batch["segment_ids"] > 0).sum())
    if time.perf_counter() - start >= FLAGS.seconds:
      break
  end = time.perf_counter()
  it.close()
  slots = batches * FLAGS.stream_batch * FLAGS.stream_seq_len
  per_batch = FLAGS.stream_batch * FLAGS.stream_seq_len
  return {"tokens_per_s": round(slots / (end - start)),
          "real_tokens_per_s": round(real / (end - start)),
          "tokens_per_s_after_first_batch": round((slots - per_batch) / (end - first)),
          "padding_fraction": round(1 - real / slots, 4), "batches": batches,
          "first_batch_seconds": round(first - start, 2), "seconds": round(end - start, 2)}


def moe_9b_v5p_target() -> dict:
  """Tokens/s a v5p host consumes training configs/moe_9b.py at 50% MFU."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load_config_file(os.path.join(root, "configs", "moe_9b.py"))
  per_token = flops.training_flops_per_token(cfg)
  peak = flops.TPU_PEAK_FLOPS["tpu v5p"]
  per_chip = TARGET_MFU * peak / per_token
  return {"benchmark": "data_throughput_target", "config": "configs/moe_9b.py",
          "device": "TPU v5p", "peak_flops_per_chip": peak, "mfu": TARGET_MFU,
          "training_flops_per_token": per_token, "chips_per_host": V5P_CHIPS_PER_HOST,
          "tokens_per_s_per_chip": round(per_chip),
          "tokens_per_s_per_host": round(per_chip * V5P_CHIPS_PER_HOST)}


def main_streaming() -> None:
  with tempfile.TemporaryDirectory() as tmp:
    files = write_corpus(tmp)
    texts = [d for f in files["parquet"]
             for d in __import__("pyarrow.parquet").parquet.read_table(f)["text"].to_pylist()]
    tokenizers = train_tokenizers(tmp, texts, FLAGS.stream_vocab)
    load = os.getloadavg()[0]
    for kind, tokenizer_path in tokenizers.items():
      for fmt, paths in files.items():
        result = stream_variant(paths, tokenizer_path)
        print(json.dumps({"benchmark": "data_throughput_streaming", "tokenizer": kind,
                          "format": fmt, "files": len(paths),
                          "megabytes": round(sum(map(os.path.getsize, paths)) / 2**20, 2),
                          "vocab_size": FLAGS.stream_vocab, "workers": FLAGS.stream_workers,
                          "seq_len": FLAGS.stream_seq_len, "batch": FLAGS.stream_batch,
                          **result, "cpus": os.cpu_count(),
                          "load_average_1min_before": round(load, 2)}), flush=True)
        load = os.getloadavg()[0]
  print(json.dumps(moe_9b_v5p_target()))


def main(argv) -> None:
  del argv
  if FLAGS.mode == "streaming":
    main_streaming()
    return
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
