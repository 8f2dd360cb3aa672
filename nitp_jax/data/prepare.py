"""Tokenize a corpus once into ArrayRecord shards plus a manifest.

  python -m nitp_jax.data.prepare --input=PATH_OR_GLOB --output=DIR \\
      [--vocab_size=8192] [--tokenizer=FILE.model] [--text_field=text] \\
      [--max_bad_fraction=0.01]

Output directory:
  tokenizer.model                 the SentencePiece model (trained or copied)
  train-NNNNN.array_record        one record per document: int32 ids + EOS
  validation-NNNNN.array_record   held-out documents (split by document)
  manifest.json                   written last; its presence = complete

With several comma-separated sources, each source's documents get shards of
their own (`train-s{i}-NNNNN...`) and the manifest lists them per source
("sources"), so the training pipeline can mix sources by `data.weights`; the
top-level "shards" lists all of them in source order, which is the document
order of one shard sequence (a directory prepared before per-source shards
still loads; only weights need them).

Pre-tokenized files (.array_record, Parquet columns of integer lists: see
token_files) need the tokenizer their ids came from (`--tokenizer`); their
documents get EOS appended unless they already end with it.

Malformed records are skipped and counted (nitp_jax.data.bad_records): the
count and the first locations are logged and kept in the manifest, and more
than `max_bad_fraction` of all records is a DataError. What is held out is
decided by nitp_jax.data.heldout (whole documents, or for a corpus with too
few of them the tail of each; with several sources, for each source on its
own) and said by the command (and by train).

Re-running with the same inputs is a no-op; different inputs on a complete
directory are a DataError (use another directory or delete this one).

The output may be gs://...: it is prepared in (or fetched to) a local cache
(`storage.cache_dir`) and uploaded from there, the manifest last; readers use
`readable_dir`, that cache, since ArrayRecord cannot read remote files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

import numpy as np
from absl import flags
from absl import logging
from array_record.python import array_record_module

from nitp_jax import cli
from nitp_jax import storage

from nitp_jax.data import token_files
from nitp_jax.data import heldout
from nitp_jax.data.bad_records import BadRecords
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.data.corpus import Corpus, open_corpus
from nitp_jax.errors import DataError
from nitp_jax.flag_names import flag
from nitp_jax.layout import MANIFEST, TOKENIZER, make_local_dir, write_json

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
SHARD_TOKENS = 1 << 26          # 256 MB of int32 per shard
CHUNK_CHARS = 4_000_000         # characters tokenized per batch call
WRITER_OPTIONS = "group_size:1"  # fast random access for grain
# How this command's flags spell the settings that messages name (flag_names).
FLAG_NAMES = {"data.input": "--input", "data.prepared_dir": "--output",
              "model.vocab_size": "--vocab_size", "data.tokenizer": "--tokenizer",
              "data.text_field": "--text_field", "data.val_fraction": "--val_fraction",
              "data.seed": "--seed", "data.prepare_workers": "--workers",
              "data.max_bad_fraction": "--max_bad_fraction"}


def prepare(input: str, output_dir: str, vocab_size: int,  # pylint: disable=redefined-builtin  # noqa: E501
            tokenizer_path: str = "", text_field: str = "text",
            val_fraction: float = 0.02, seed: int = 0, workers: int = 2,
            max_tokenizer_chars: int = 20_000_000,
            max_bad_fraction: float = 0.01) -> dict[str, Any]:
  """Prepare `output_dir` from the corpus `input`; return the manifest.

  Args:
    input: file, directory or glob ("" = the default corpus).
    output_dir: where shards, tokenizer and manifest go.
    vocab_size: the model's vocab size; a trained tokenizer gets exactly this
      many pieces, a given one must have at most this many.
    tokenizer_path: an existing SentencePiece model or tokenizer.json, local
      or gs:// ("" = train one).
    text_field: the jsonl field holding document text.
    val_fraction: fraction of documents held out (at least one if > 0, of
      each source when several; with too few documents, that fraction of each
      document's last tokens).
    seed: selects the held-out documents and the tokenizer's training sample.
    workers: threads that tokenize in parallel.
    max_tokenizer_chars: size of the tokenizer's training sample.
    max_bad_fraction: malformed records (skipped and counted) above this
      fraction of all records are a DataError. It only accepts or refuses, so
      it is not one of the inputs that identify the output.
  """
  _check_arguments(vocab_size, val_fraction, seed, workers, max_bad_fraction)
  if storage.is_remote(output_dir):
    return _prepare_remote(output_dir, lambda local: prepare(
        input, local, vocab_size, tokenizer_path, text_field, val_fraction, seed, workers,
        max_tokenizer_chars, max_bad_fraction))
  tokenizer_path = tokenizer_path and tok_lib.local_tokenizer(tokenizer_path)
  corpus = open_corpus(input, text_field, max_bad_fraction)
  if not tokenizer_path:
    _check_no_token_files(corpus, text_field)
  inputs = _inputs(corpus, input, text_field, val_fraction, seed, vocab_size,
                   tokenizer_path)
  existing = _check_existing(output_dir, inputs)
  if existing is not None:
    tok_lib.check_fits(existing["tokenizer"]["vocab_size"], vocab_size)
    _recorded_bad(existing, max_bad_fraction).check()  # a stricter limit refuses it
    return existing
  start = time.time()
  _clean(output_dir)
  num_sources = len(_sources(input))
  lengths, doc_sources = [], []
  for doc in corpus:  # refuses too many malformed records
    lengths.append(len(doc))
    doc_sources.append(_source_index(corpus))
  if corpus.bad.count:
    logging.warning("%s: %s", corpus.name, corpus.bad.summary())
  model_path = os.path.join(output_dir, TOKENIZER)
  if tokenizer_path:
    tokenizer = tok_lib.load_tokenizer(tokenizer_path)
    tok_lib.check_fits(tokenizer.vocab_size, vocab_size)
    model_path = os.path.join(output_dir, tokenizer.file_name)
    tok_lib.copy_tokenizer(tokenizer_path, model_path)
  else:
    sample = _tokenizer_sample(lengths, max_tokenizer_chars, seed)
    docs = (d for i, d in enumerate(corpus) if i in sample and isinstance(d, str))
    try:
      tok_lib.train_tokenizer(docs, vocab_size, model_path[:-len(".model")],
                              max_chars=max_tokenizer_chars,
                              num_threads=max(1, workers))
    except tok_lib.CorpusTooSmallError as e:
      if input:
        raise
      raise DataError(_default_corpus_too_small(e)) from None
  tokenizer = tok_lib.load_tokenizer(model_path)
  tok_lib.check_fits(tokenizer.vocab_size, vocab_size)
  plans = heldout.plan_sources(np.bincount(doc_sources, minlength=num_sources).tolist(),
                               val_fraction, seed)
  counts = _write_shards(corpus, tokenizer, plans, output_dir, max(1, workers))
  manifest = {
      "format_version": FORMAT_VERSION,
      "inputs": inputs,
      "source": corpus.name,
      **counts,
      "heldout": heldout.to_json(plans),
      **corpus.bad.to_json(),
      "empty_documents": corpus.empty_documents,
      "tokenizer": {
          "file": os.path.basename(model_path),
          "kind": tokenizer.kind,
          "sha256": tok_lib.sha256_file(model_path),
          "vocab_size": tokenizer.vocab_size,
          "pad_id": tokenizer.pad_id,
          "eos_id": tokenizer.eos_id,
          "bos_id": tokenizer.bos_id,
          "trained": not tokenizer_path,
      },
      "seconds": round(time.time() - start, 3),
  }
  write_json(os.path.join(output_dir, MANIFEST), manifest)
  return manifest


def report_lines(prepared_dir: str) -> list[str]:
  """What a run should say about its prepared data: what is held out and,
  if any, the malformed records skipped."""
  manifest = load_manifest(readable_dir(prepared_dir))
  lines = [heldout.describe(manifest)]
  if manifest.get("skipped_count"):
    shown = " | ".join(f"{s['path']}: {s['reason']}" for s in manifest["skipped"][:3])
    lines.append(f"{manifest['skipped_count']} malformed record(s) skipped while preparing "
                 f"{prepared_dir} (listed in its {MANIFEST}); first: {shown}")
  return lines


def _recorded_bad(manifest: dict[str, Any], max_fraction: float) -> BadRecords:
  """The malformed records a manifest recorded, under the limit `max_fraction`."""
  if "records" not in manifest:  # prepared before records were counted
    return BadRecords(max_fraction)
  count = manifest["skipped_count"]
  good = manifest["records"] - count
  return BadRecords(max_fraction, good, count,
                    [(s["path"], s["reason"]) for s in manifest.get("skipped", [])])


def _check_arguments(vocab_size: int, val_fraction: float, seed: int, workers: int,
                     max_bad_fraction: float) -> None:
  """DataError naming the first argument out of range."""
  checks = (("model.vocab_size", vocab_size, vocab_size > 0, "must be a positive integer"),
            ("data.val_fraction", val_fraction, 0 <= val_fraction < 1, "must be in [0, 1)"),
            ("data.seed", seed, 0 <= seed < 2**31, "must be an integer in [0, 2**31)"),
            ("data.prepare_workers", workers, workers > 0, "must be a positive integer"),
            ("data.max_bad_fraction", max_bad_fraction, 0 <= max_bad_fraction <= 1,
             "must be in [0, 1]"))
  for field, value, ok, allowed in checks:
    if not ok:
      raise DataError(f"{flag(field)}={value} is invalid: {allowed}")


def _default_corpus_too_small(e: tok_lib.CorpusTooSmallError) -> str:
  """A vocabulary the embedded demo corpus cannot serve: the config expects
  real data (the paper's configs: Qwen2's 152,064-entry vocabulary)."""
  return (f"{flag('model.vocab_size')}={e.vocab_size} needs a real corpus or a ready "
          f"tokenizer: the embedded demo corpus (used when {flag('data.input')} is empty) "
          f"yields at most {e.max_pieces} tokenizer pieces. Pass your documents with "
          f"{flag('data.input')}=PATH_OR_GLOB (.txt/.md/.jsonl), or a tokenizer of at most "
          f"{e.vocab_size} tokens (SentencePiece .model or HuggingFace tokenizer.json, "
          f"e.g. Qwen2's) with {flag('data.tokenizer')}=FILE")


def _sources(spec: str) -> list[str]:
  """The comma-separated sources of `spec` ([""] = the default corpus)."""
  return [x.strip() for x in spec.split(",") if x.strip()] or [""]


def _check_no_token_files(corpus: Corpus, text_field: str) -> None:
  """DataError when a file holds token ids but no tokenizer was given."""
  for path in corpus.files:
    if token_files.is_token_file(path, text_field):
      raise DataError(f"{path} holds token ids: pass the tokenizer they came from with "
                      f"{flag('data.tokenizer')}=FILE (.model or tokenizer.json)")


def ensure_prepared(data_cfg, vocab_size: int, out_dir: str) -> dict[str, Any]:
  """Prepare `out_dir` from `cfg.data` unless it is already; the manifest.

  Raises DataError if `out_dir` holds data prepared from different inputs or
  its tokenizer does not fit `vocab_size`. With several processes on a shared
  file system, call it on process 0 first, then on the others after a barrier.
  """
  return prepare(data_cfg.input, out_dir, vocab_size,
                 tokenizer_path=data_cfg.tokenizer,
                 text_field=data_cfg.text_field,
                 val_fraction=data_cfg.val_fraction, seed=data_cfg.seed,
                 workers=data_cfg.prepare_workers,
                 max_bad_fraction=data_cfg.max_bad_fraction)


def _prepare_remote(remote_dir: str, prepare_local) -> dict[str, Any]:
  """Prepare gs://... through its local cache: fetch it when it is complete
  remotely, else build it there and upload it (manifest last)."""
  storage.check(remote_dir)
  local = storage.cache_dir(remote_dir)
  local_manifest = os.path.join(local, MANIFEST)
  remote_manifest = _fetch(remote_dir, local)
  try:
    try:
      manifest = prepare_local(local)
    except DataError:
      if remote_manifest is not None or not os.path.isfile(local_manifest):
        raise
      # The cache holds other inputs' data, which the bucket does not (one of
      # these inputs whose upload was cut short is reused by the first call):
      # it is only a cache, rebuild it.
      os.remove(local_manifest)
      manifest = prepare_local(local)
  except DataError as e:  # name the directory the user gave, not the cache
    raise DataError(str(e).replace(local, remote_dir)) from e
  with open(local_manifest, encoding="utf-8") as f:
    if f.read() != remote_manifest:
      storage.upload_tree(local, remote_dir, last=(MANIFEST,))
  return manifest


def _fetch(remote_dir: str, local: str) -> str | None:
  """Make `local` a complete copy of the prepared `remote_dir` (the manifest
  written last, so an interrupted copy is never taken for complete); the
  remote manifest's text, None when it has none (not prepared yet)."""
  remote_manifest = storage.join(remote_dir, MANIFEST)
  if not storage.exists(remote_manifest):
    return None
  text = storage.read_text(remote_manifest)
  local_manifest = os.path.join(local, MANIFEST)
  if os.path.isfile(local_manifest):
    with open(local_manifest, encoding="utf-8") as f:
      if f.read() == text:
        return text  # the cache is complete and current
  manifest = json.loads(text)
  names = [manifest["tokenizer"]["file"]] + [n for split in SPLITS
                                             for n in manifest["shards"][split]]
  for name in names:
    storage.download(storage.join(remote_dir, name), os.path.join(local, name))
  storage.write_text(local_manifest, text)
  return text


def readable_dir(prepared_dir: str) -> str:
  """Where to read a prepared directory's files: itself, or for gs://... its
  local cache, fetched when missing or stale; DataError when not prepared."""
  if not storage.is_remote(prepared_dir):
    return prepared_dir
  storage.check(prepared_dir)
  local = storage.cache_dir(prepared_dir)
  if _fetch(prepared_dir, local) is None:
    raise DataError(f"{prepared_dir!r} is not a prepared data directory (no {MANIFEST}). "
                    f"Run `python -m nitp_jax.data.prepare --output={prepared_dir}` first.")
  return local


def load_manifest(prepared_dir: str) -> dict[str, Any]:
  """The manifest of a complete prepared directory; DataError otherwise."""
  path = os.path.join(prepared_dir, MANIFEST)
  if not os.path.isfile(path):
    raise DataError(f"{prepared_dir!r} is not a prepared data directory (no "
                    f"{MANIFEST}). Run `python -m nitp_jax.data.prepare "
                    f"--output={prepared_dir}` first.")
  with open(path) as f:
    return json.load(f)


def shard_paths(prepared_dir: str, split: str) -> list[str]:
  """Absolute paths of a split's shards, from the manifest."""
  manifest = load_manifest(prepared_dir)
  return [os.path.join(prepared_dir, s) for s in manifest["shards"][split]]


def _inputs(corpus: Corpus, spec: str, text_field: str, val_fraction: float,
            seed: int, vocab_size: int, tokenizer_path: str) -> dict[str, Any]:
  """What determines the output; a complete dir with equal inputs is reused."""
  inputs = {"format_version": FORMAT_VERSION, "input": spec,
            "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint(),
            "text_field": text_field, "val_fraction": float(val_fraction),
            "seed": int(seed)}
  if tokenizer_path:
    tok_lib.load_tokenizer(tokenizer_path)  # DataError if missing or bad
    inputs["tokenizer_sha256"] = tok_lib.sha256_file(tokenizer_path)
  else:
    inputs["tokenizer_vocab_size"] = int(vocab_size)
  return inputs


def _check_existing(output_dir: str, inputs: dict[str, Any]
                    ) -> dict[str, Any] | None:
  """The existing manifest if it matches `inputs`; DataError if it differs."""
  path = os.path.join(output_dir, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    manifest = json.load(f)
  old = manifest.get("inputs", {})
  if old == inputs:
    return manifest
  diff = ", ".join(f"{k}: {old.get(k)!r} -> {inputs.get(k)!r}"
                   for k in sorted(set(old) | set(inputs))
                   if old.get(k) != inputs.get(k))
  raise DataError(f"{output_dir!r} already holds data prepared from other "
                  f"inputs ({diff}). Use another output directory "
                  f"({flag('data.prepared_dir')}=...) or delete this one.")


def _clean(output_dir: str) -> None:
  """Remove what an earlier, incomplete run may have left."""
  make_local_dir(output_dir, flag("data.prepared_dir"), DataError)
  for name in os.listdir(output_dir):
    if name.endswith(".array_record") or name.startswith(("tokenizer.", "tokenizer_")):
      os.remove(os.path.join(output_dir, name))


def _tokenizer_sample(lengths: list[int], max_chars: int, seed: int
                      ) -> set[int]:
  """Indices of random documents with about `max_chars` characters."""
  order = np.random.default_rng(seed).permutation(len(lengths))
  total = np.cumsum(np.asarray(lengths, dtype=np.int64)[order])
  take = int(np.searchsorted(total, max_chars)) + 1
  return set(order[:take].tolist())


def _chunks(corpus: Corpus) -> Iterator[list[tuple[int, Any, Any]]]:
  """(source index, file, document) in corpus order, CHUNK_CHARS at a time."""
  chunk, size = [], 0
  for doc in corpus:
    chunk.append((_source_index(corpus), corpus.reading, doc))
    size += len(doc)
    if size >= CHUNK_CHARS:
      yield chunk
      chunk, size = [], 0
  if chunk:
    yield chunk


def _source_index(corpus: Corpus) -> int:
  """The source of the document `corpus` just yielded."""
  return corpus.source_of.get(str(corpus.reading), 0)


def _encode(tokenizer: tok_lib.Tokenizer, chunk: list[tuple[int, Any, Any]],
            threads: int) -> list[np.ndarray]:
  """Token ids + EOS of each document: texts encoded, token ids checked."""
  texts = [doc for _, _, doc in chunk if isinstance(doc, str)]
  encoded = iter(tok_lib.encode_documents(tokenizer, texts, threads) if texts else [])
  out = []
  for _, path, doc in chunk:
    if isinstance(doc, str):
      out.append(next(encoded))
    else:
      token_files.check_ids(doc, tokenizer.vocab_size, path)
      out.append(token_files.with_eos(doc, tokenizer.eos_id))
  return out


class _ShardWriter:
  """Writes one split's records, starting a new shard every SHARD_TOKENS."""

  def __init__(self, output_dir: str, split: str, prefix: str = ""):
    self.output_dir, self.split, self.prefix = output_dir, split, prefix
    self.shards: list[str] = []
    self.documents = self.tokens = 0
    self._writer, self._shard_tokens = None, 0

  def write(self, ids: np.ndarray) -> None:
    if self._writer is None or self._shard_tokens >= SHARD_TOKENS:
      self.close()
      name = f"{self.split}-{self.prefix}{len(self.shards):05d}.array_record"
      self.shards.append(name)
      self._writer = array_record_module.ArrayRecordWriter(
          os.path.join(self.output_dir, name), WRITER_OPTIONS)
      self._shard_tokens = 0
    self._writer.write(ids.astype("<i4").tobytes())
    self._shard_tokens += ids.size
    self.documents += 1
    self.tokens += ids.size

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _write_shards(corpus: Corpus, tokenizer: tok_lib.Tokenizer,
                  plans: list[heldout.HeldOut], output_dir: str, threads: int
                  ) -> dict[str, Any]:
  """Tokenize every document into its split's (and, with several sources,
  its source's) shards, split by its source's plan (over the source's own
  document indices); counts per split, and per source when several."""
  num_sources = len(plans)
  prefix = (lambda i: f"s{i}-") if num_sources > 1 else (lambda i: "")
  writers = [{s: _ShardWriter(output_dir, s, prefix(i)) for s in SPLITS}
             for i in range(num_sources)]
  index = [0] * num_sources   # the next document's index within its source
  for chunk in _chunks(corpus):
    for (source, _, _), ids in zip(chunk, _encode(tokenizer, chunk, threads)):
      for split, part in plans[source].split(index[source], ids):
        writers[source][split].write(part)
      index[source] += 1
  for w in (w for ws in writers for w in ws.values()):
    w.close()
  counts = lambda ws: {
      "documents": {s: w.documents for s, w in ws.items()},
      "tokens": {s: w.tokens for s, w in ws.items()},
      "shards": {s: w.shards for s, w in ws.items()}}
  per_source = [counts(ws) for ws in writers]
  out = {key: {s: (sum if key != "shards" else _concat)(c[key][s] for c in per_source)
               for s in SPLITS} for key in ("documents", "tokens", "shards")}
  if num_sources > 1:
    out["sources"] = [{"input": spec, "heldout": plan.to_json(), **c}
                      for spec, plan, c in zip(_sources(corpus.name), plans, per_source)]
  return out


def _concat(lists) -> list:
  return [x for xs in lists for x in xs]


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  start = time.time()
  manifest = prepare(f.input, f.output, f.vocab_size, f.tokenizer,
                     f.text_field, f.val_fraction, f.seed, f.workers,
                     max_bad_fraction=f.max_bad_fraction)
  summary = {k: manifest.get(k) for k in ("source", "documents", "tokens",
                                           "skipped_count", "empty_documents")}
  summary["skipped_first"] = [f"{s['path']}: {s['reason']}" for s in manifest["skipped"][:3]]
  summary["heldout"] = heldout.describe(manifest)
  summary["tokenizer_vocab_size"] = manifest["tokenizer"]["vocab_size"]
  summary["seconds"] = round(time.time() - start, 3)
  print(json.dumps(summary))


def define_flags() -> None:
  flags.DEFINE_string("input", "", "Files, directories or globs, local or gs://, "
                      "comma-separated (.txt .md .jsonl .jsonl.gz .jsonl.zst .parquet; "
                      "pre-tokenized: .array_record, Parquet integer lists); '' = default "
                      "corpus (Python stdlib sources + pydoc topics).")
  flags.DEFINE_string("output", None, "Output directory.", required=True)
  flags.DEFINE_integer("vocab_size", 8192, "Tokenizer size = model vocab.")
  flags.DEFINE_string("tokenizer", "", "Existing SentencePiece .model or tokenizer.json "
                      "(required for pre-tokenized inputs).")
  flags.DEFINE_string("text_field", "text", "jsonl field with the text.")
  flags.DEFINE_float("val_fraction", 0.02, "Held-out document fraction.")
  flags.DEFINE_integer("seed", 0, "Split and tokenizer-sample seed.")
  flags.DEFINE_integer("workers", 2, "Tokenizer threads.")
  flags.DEFINE_float("max_bad_fraction", 0.01, "Malformed records (skipped and counted) "
                     "above this fraction of all records stop preparation.")


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--input=PATH_OR_GLOB --output=DIR "
               "[--vocab_size=N] [--tokenizer=FILE.model|tokenizer.json] [--max_bad_fraction=F]",
               flag_names=FLAG_NAMES)
