"""Streaming input: documents read and tokenized on the fly, per process.

With `data.streaming=true` no process prepares the corpus. Every process
lists the files of each `data.input` source, keeps its own share of them and
runs this Grain pipeline, yielding the same batches as the prepared path
(`pipeline`: tokens, segment_ids, positions, int32 [B_local, T]):

  units of a source (its files; each file cut into `parts` when the source has
  fewer files than processes) -> this process's units, shuffled per epoch and
  repeated forever -> InterleaveIterDataset over per-unit document readers
  (`corpus`'s format readers) -> map(tokenize + EOS)
  -> IterDataset.mix across sources (one stream without data.weights), drawing
  documents in proportion to weight / mean tokens per document, so a weight is
  a share of tokens as on the prepared path (means from each source's first
  SAMPLE_DOCUMENTS documents, kept in the held-out manifest)
  -> pieces of seq_len -> WindowShuffleIterDataset -> FirstFitPackIterDataset
  -> batch -> mp_prefetch(data.worker_count).

Part j of a file split into k parts holds its row groups j, j+k, ... when it
is a Parquet file with at least k row groups (a process reads only those),
else its documents j, j+k, ... (the process reads the whole file). The iterator
state is a JSON-able dict (each reader's state is the index in its file of
the next document) and `set_state` resumes to identical batches for the same
arguments (process count and index, worker count).

Held-out set (documents, not batches): the first documents of the first file
of each source, up to `train.eval_batches` full batches of tokens per source
(never that file's last document), when `data.val_fraction` > 0. Training
skips them. `ensure_heldout_dir` writes them as a small prepared-format
directory (manifest, tokenizer copy, validation shard) so `evaluate`,
`export.hf` and the eval tasks read a streaming run like a prepared one. With
several sources each source's documents are a validation shard of their own
(`validation-s{i}-...`, listed per source in the manifest, as prepared
mixtures have), so the run evaluates each source and weighs them by
`data.weights` (nitp_jax.data.heldout_sets); a mixture's directory written
before that (source 0's documents only) is still read as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

import grain
import ml_collections
import numpy as np
from absl import logging
from grain import experimental as grain_exp

from nitp_jax import config as config_lib
from nitp_jax import storage
from nitp_jax.data import corpus as corpus_lib
from nitp_jax.data import pipeline
from nitp_jax.data import prepare
from nitp_jax.data import token_files
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.data.bad_records import BadRecords
from nitp_jax.data.corpus import Document
from nitp_jax.errors import ConfigError, DataError, StorageError
from nitp_jax.flag_names import flag
from nitp_jax.layout import MANIFEST, write_json

CYCLE_LENGTH = 4                 # files read at once per source and worker
SAMPLE_DOCUMENTS = 256           # per source, for its mean document length
FORMAT = "streaming-heldout-2"


@dataclasses.dataclass(frozen=True)
class Unit:
  """Part `part` of `parts` of one file's documents, skipping the first `skip`
  (the held-out documents)."""
  path: str
  part: int = 0
  parts: int = 1
  skip: int = 0


def require_tokenizer(data_cfg: ml_collections.ConfigDict) -> str:
  """The tokenizer file of a streaming run (a gs:// one as its local copy);
  ConfigError when none is given."""
  if not data_cfg.tokenizer:
    raise ConfigError(f"{flag('data.streaming')}=true needs {flag('data.tokenizer')}="
                      "FILE (a SentencePiece .model or tokenizer.json): training one needs a "
                      "pass over the corpus, so run `python -m nitp_jax.data.prepare` once or "
                      "give a tokenizer.")
  return tok_lib.local_tokenizer(data_cfg.tokenizer)


def run_sources(cfg: ml_collections.ConfigDict) -> list[list[str]]:
  """The files of each data.input source, sorted, each once (corpus.open_corpus)."""
  specs = config_lib.data_sources(cfg)
  if not specs:
    raise ConfigError(f"{flag('data.streaming')}=true needs {flag('data.input')}: the "
                      "embedded corpus is prepared, not streamed.")
  return [[str(p) for p in corpus_lib.open_corpus(spec, cfg.data.text_field).files]
          for spec in specs]


def local_units(files: list[str], process_index: int, process_count: int,
                heldout: int | dict[str, int] = 0) -> list[Unit]:
  """This process's units of one source's files: files process_index,
  process_index + P, ... or, with fewer files than processes, parts of every
  file. The first file skips its `heldout` leading documents (a dict: each
  file named skips its count)."""
  parts = math.ceil(process_count / len(files))
  skips = heldout if isinstance(heldout, dict) else {files[0]: heldout}
  units = [Unit(f, j, parts, skips.get(f, 0)) for f in files for j in range(parts)]
  return units[process_index::process_count]


def read_documents(unit: Unit, text_field: str, start: int = 0,
                   max_bad_fraction: float = 1.0) -> Iterator[tuple[int, Document]]:
  """(index in the file, document) of the unit's non-blank documents with
  index >= `start`. Malformed records are skipped, logged and counted
  (bad_records), and a unit read to its end with more than
  `max_bad_fraction` of them is a DataError; an unreadable file is skipped
  with a warning."""
  bad = BadRecords(max_bad_fraction)
  path = _path(unit.path)
  try:
    if unit.parts > 1 and _row_groups(path) >= unit.parts:
      docs, mine = _parquet_part(path, unit, text_field, bad), lambda i: True
    else:
      docs = enumerate(_file_documents(path, text_field, bad))
      mine = lambda i: i % unit.parts == unit.part
    for i, doc in docs:
      if i >= max(start, unit.skip) and mine(i) and corpus_lib.non_blank(doc):
        yield i, doc
  except corpus_lib._BadFile as e:  # pylint: disable=protected-access
    logging.warning("streaming: skipping %s: %s", unit.path, e.args[0])
    return
  if bad.count:
    logging.warning("streaming: %s: %s", unit.path, bad.summary())
    bad.check()


def _file_documents(path: pathlib.Path, text_field: str, bad: BadRecords
                    ) -> Iterator[Document]:
  """`corpus`'s format reader for one file, malformed records into `bad`."""
  for doc in corpus_lib._read_file(path, text_field, bad):  # pylint: disable=protected-access
    bad.record_ok()
    yield doc


def token_ids(tokenizer: tok_lib.Tokenizer, doc: Document) -> np.ndarray:
  """int32 ids of a document with EOS last (a pre-tokenized one keeps its ids)."""
  if isinstance(doc, str):
    ids = tokenizer.encode(doc)
    ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int32)
  ids = np.asarray(doc, dtype=np.int32)
  return ids if ids.size and ids[-1] == tokenizer.eos_id else np.append(
      ids, np.int32(tokenizer.eos_id))


def _path(name: str):
  """A source file: local, or gs://... through the storage layer (where
  corpus reads such sources)."""
  return storage.epath(name) if storage.is_remote(name) else pathlib.Path(name)


def _row_groups(path: pathlib.Path) -> int:
  """Row groups of a readable Parquet file (local or gs://: only its footer
  is read); 0 for any other file."""
  if not path.name.lower().endswith(corpus_lib.PARQUET_SUFFIXES):
    return 0
  import pyarrow  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    with storage.open_binary(str(path)) as f:
      return pq.ParquetFile(f).metadata.num_row_groups
  except StorageError:  # GCS failed or refused: not a bad file
    raise
  except (pyarrow.ArrowException, OSError):
    return 0  # the format reader names the problem


def _parquet_part(path: pathlib.Path, unit: Unit, text_field: str, bad: BadRecords
                  ) -> Iterator[tuple[int, Document]]:
  """(row index, text) of row groups unit.part, unit.part + unit.parts, ...:
  a process reads (and, from gs://, fetches) only its row groups."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with storage.open_binary(str(path)) as f:
    yield from _row_group_documents(pq.ParquetFile(f), path, unit, text_field, bad)


def _row_group_documents(table, path: pathlib.Path, unit: Unit, text_field: str,
                         bad: BadRecords) -> Iterator[tuple[int, Document]]:
  """_parquet_part of an open pyarrow ParquetFile."""
  if text_field not in table.schema_arrow.names:
    raise corpus_lib._BadFile(  # pylint: disable=protected-access
        f"has no column {text_field!r}; set {flag('data.text_field')} to the column "
        "holding the text")
  first = 0
  for group in range(table.metadata.num_row_groups):
    rows = table.metadata.row_group(group).num_rows
    if group % unit.parts == unit.part:
      values = table.read_row_group(group, columns=[text_field]).column(0).to_pylist()
      tokens = token_files.is_token_column(table.schema_arrow.field(text_field).type)
      for row, value in enumerate(values, first):
        if isinstance(value, str) and not tokens:
          bad.record_ok()
          yield row, value
        elif tokens and value is not None:
          bad.record_ok()
          yield row, np.asarray(value, dtype=np.int64)
        else:
          bad.skip(f"{path}:row {row + 1}", f"no {'token ids' if tokens else 'text'} in "
                   f"column {text_field!r}")
    first += rows


class _UnitIterator(grain.DatasetIterator):
  """Documents of one unit; state = the file index of the next document."""

  def __init__(self, unit: Unit, text_field: str, max_bad_fraction: float):
    super().__init__()
    self._unit, self._text_field, self._max_bad = unit, text_field, max_bad_fraction
    self._next = 0
    self._docs = None

  def __next__(self) -> Document:
    if self._docs is None:
      self._docs = read_documents(self._unit, self._text_field, self._next, self._max_bad)
    index, doc = next(self._docs)
    self._next = index + 1
    return doc

  def get_state(self) -> dict[str, Any]:
    return {"next": self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next, self._docs = int(state["next"]), None


class _UnitDocuments(grain.IterDataset):
  """An IterDataset of one unit's documents (str)."""

  def __init__(self, unit: Unit, text_field: str, max_bad_fraction: float):
    super().__init__()
    self._unit, self._text_field, self._max_bad = unit, text_field, max_bad_fraction

  def __iter__(self) -> _UnitIterator:
    return _UnitIterator(self._unit, self._text_field, self._max_bad)


class _Tokenize(grain.transforms.Map):
  """text -> int32 token ids with EOS last; loads the tokenizer lazily (in
  each worker process)."""

  def __init__(self, tokenizer_path: str):
    self._path, self._tokenizer = tokenizer_path, None

  def __getstate__(self):
    return {"_path": self._path, "_tokenizer": None}

  def map(self, element: Document) -> np.ndarray:
    if self._tokenizer is None:
      self._tokenizer = tok_lib.load_tokenizer(self._path)
    return token_ids(self._tokenizer, element)


def _source_documents(units: list[Unit], text_field: str, max_bad_fraction: float,
                      seed: int) -> grain.IterDataset:
  """Documents of `units`, reshuffled per epoch and repeated forever,
  CYCLE_LENGTH files interleaved."""
  datasets = (grain.MapDataset.source(units).shuffle(seed=seed).repeat()
              .map(functools.partial(_UnitDocuments, text_field=text_field,
                                     max_bad_fraction=max_bad_fraction)))
  return grain_exp.InterleaveIterDataset(datasets,
                                         cycle_length=min(CYCLE_LENGTH, len(units)))


def _seed(seed: int, *path: int) -> int:
  return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def mixed_documents(sources: list[list[str]], tokenizer_path: str, seed: int,
                    process_index: int, process_count: int, *,
                    proportions: list[float] | None = None, text_field: str = "text",
                    max_bad_fraction: float = 1.0,
                    heldout: int | list[int] = 0) -> grain.IterDataset:
  """This process's token-id documents (int32, EOS last), infinite: each
  source's documents drawn in `proportions` (grain's deterministic mix); None
  = the sources' files form one stream. The leading heldout[i] documents of
  each sources[i][0] are skipped (an int: those of sources[0][0])."""
  counts = heldout if isinstance(heldout, list) else [heldout]
  skips = {files[0]: n for files, n in zip(sources, counts)}
  groups = sources if proportions else [[f for files in sources for f in files]]
  streams = []
  for s, files in enumerate(groups):
    units = local_units(files, process_index, process_count, skips)
    docs = _source_documents(units, text_field, max_bad_fraction,
                             _seed(seed, process_index, 2, s))
    streams.append(docs.map(_Tokenize(tokenizer_path)))
  return streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, proportions)


def document_proportions(weights: list[float], document_tokens: list[float]) -> list[float]:
  """Per-source document proportions that give `weights` as shares of tokens
  (as the prepared path's mixture): weight / mean tokens per document."""
  return [w / m for w, m in zip(weights, document_tokens)]


def make_train_dataset(sources: list[list[str]], tokenizer_path: str, seq_len: int,
                       global_batch: int, seed: int, *,
                       proportions: list[float] | None = None, text_field: str = "text",
                       max_bad_fraction: float = 1.0, heldout: int | list[int] = 0,
                       process_index: int | None = None,
                       process_count: int | None = None, worker_count: int = 0,
                       shuffle_window: int = 0) -> grain.IterDataset:
  """The streaming training IterDataset of this process: batches [global/P, T].

  Args:
    sources: the files of each source (`run_sources`).
    tokenizer_path: SentencePiece .model or tokenizer.json.
    proportions: documents drawn per source (`document_proportions`); None =
      the sources' files form one stream.
    max_bad_fraction: a file read to its end with more malformed records
      than this is a DataError.
    heldout: leading documents of each source's first file held out (not
      trained on), per source (an int: of sources[0][0] only).
    Others as `pipeline.make_train_dataset`.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch % process_count:
    raise DataError(f"global_batch={global_batch} is not divisible by the "
                    f"{process_count} processes: set {flag('train.global_batch')} "
                    "to a multiple of the process count.")
  docs = mixed_documents(sources, tokenizer_path, seed, process_index, process_count,
                         proportions=proportions, text_field=text_field,
                         max_bad_fraction=max_bad_fraction, heldout=heldout)
  batched = pipeline._pack_and_batch(  # pylint: disable=protected-access
      docs, seq_len, global_batch // process_count, shuffle_window,
      _seed(seed, process_index, 3))
  return pipeline.in_workers(batched, worker_count)


def mean_document_tokens(first_file: str, tokenizer: tok_lib.Tokenizer, text_field: str
                         ) -> float:
  """Mean tokens per document (EOS included) of a source, estimated from the
  first SAMPLE_DOCUMENTS documents of its first file."""
  total = count = 0
  for _, doc in read_documents(Unit(first_file), text_field):
    total += token_ids(tokenizer, doc).size
    count += 1
    if count == SAMPLE_DOCUMENTS:
      break
  if not count:
    raise DataError(f"{first_file} has no documents: remove it from {flag('data.input')}")
  return total / count


def heldout_documents(first_file: str, tokenizer: tok_lib.Tokenizer, text_field: str,
                      max_tokens: int) -> list[np.ndarray]:
  """Token ids (EOS last) of the held-out documents: the leading documents of
  `first_file` up to `max_tokens` tokens, never its last document."""
  out, total = [], 0
  for index, doc in read_documents(Unit(first_file), text_field):
    if total >= max_tokens:
      break
    if index != len(out):  # a blank document: keep held-out indices contiguous
      break
    out.append(token_ids(tokenizer, doc))
    total += out[-1].size
  else:
    out = out[:-1]  # the file ended: leave its last document to training
  return out


def ensure_heldout_dir(cfg: ml_collections.ConfigDict, out_dir: str) -> int:
  """Write (or check) the held-out directory of a streaming run; the number
  of held-out documents. Every process may call it at once: each builds
  the directory privately and renames it into place, the first one wins.
  A gs:// directory is built in (or fetched to) the local cache and
  uploaded, manifest last, as prepared data is."""
  tokenizer_path = require_tokenizer(cfg.data)
  if storage.is_remote(out_dir):
    manifest = prepare._prepare_remote(  # pylint: disable=protected-access
        out_dir, lambda local: _ensure_local_heldout(cfg, tokenizer_path, local))
  else:
    manifest = _ensure_local_heldout(cfg, tokenizer_path, out_dir)
  return manifest["documents"]["validation"]


def _ensure_local_heldout(cfg: ml_collections.ConfigDict, tokenizer_path: str,
                          out_dir: str) -> dict[str, Any]:
  """ensure_heldout_dir of a local directory; its manifest."""
  data_cfg = cfg.data
  sources = run_sources(cfg)
  tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  tok_lib.check_fits(tokenizer.vocab_size, cfg.model.vocab_size)
  t = cfg.train
  inputs = {"format": FORMAT, "input": data_cfg.input, "text_field": data_cfg.text_field,
            "val_fraction": float(data_cfg.val_fraction), "first_file": sources[0][0],
            "tokenizer_sha256": tok_lib.sha256_file(tokenizer_path)}
  # Every source's first file holds documents out (and trains after them). A
  # mixture's directory written before per-source sets (its inputs lack
  # "first_files": source 0's only) is still read.
  earlier = dict(inputs)
  if len(sources) > 1:
    inputs["first_files"] = [files[0] for files in sources]
  existing = _existing_manifest(out_dir, inputs, earlier)
  if existing is not None:
    return existing
  # The first run sizes the set; runs sharing the directory (compare's arms) reuse it.
  specs = config_lib.data_sources(cfg)
  held = [_source_heldout(files, spec, len(sources), tokenizer, data_cfg.text_field,
                          t.eval_batches * t.global_batch * t.seq_len)
          if data_cfg.val_fraction > 0 else [] for files, spec in zip(sources, specs)]
  document_tokens = [mean_document_tokens(files[0], tokenizer, data_cfg.text_field)
                     for files in sources]
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".heldout-", dir=parent)
  try:
    per_source = [_write_validation(tmp, docs, f"s{i}-" if len(held) > 1 else "")
                  for i, docs in enumerate(held)]
    name = tokenizer.file_name
    tok_lib.copy_tokenizer(tokenizer_path, os.path.join(tmp, name))
    sources_entry = ({"sources": [{"input": spec, "first_file": files[0], **counts}
                                  for spec, files, counts in zip(specs, sources, per_source)]}
                     if len(held) > 1 else {})
    write_json(os.path.join(tmp, MANIFEST), {
        "format_version": prepare.FORMAT_VERSION, "inputs": inputs, "streaming": True,
        "source": data_cfg.input,
        "documents": {"train": None,
                      "validation": sum(c["documents"]["validation"] for c in per_source)},
        "tokens": {"train": None,
                   "validation": sum(c["tokens"]["validation"] for c in per_source)},
        "shards": {"train": [], "validation": [n for c in per_source
                                               for n in c["shards"]["validation"]]},
        **sources_entry,
        "document_tokens": document_tokens,
        "tokenizer": {"file": name, "kind": tokenizer.kind,
                      "sha256": inputs["tokenizer_sha256"],
                      "vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id,
                      "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
                      "trained": False}})
    try:
      os.rename(tmp, out_dir)
    except OSError:  # another process was first, or an empty directory is there
      try:
        os.rmdir(out_dir)  # only when empty
        os.rename(tmp, out_dir)
      except OSError:
        pass  # another process's directory: checked below
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  existing = _existing_manifest(out_dir, inputs)
  if existing is None:
    raise DataError(f"could not write the held-out set to {out_dir!r}; check it is a "
                    "writable directory.")
  return existing


def _source_heldout(files: list[str], spec: str, num_sources: int,
                    tokenizer: tok_lib.Tokenizer, text_field: str, max_tokens: int
                    ) -> list[np.ndarray]:
  """A source's held-out documents (`heldout_documents` of its first file);
  DataError when that file has fewer than two documents."""
  docs = heldout_documents(files[0], tokenizer, text_field, max_tokens)
  if not docs:
    which = (f"the first file of {flag('data.input')}" if num_sources == 1 else
             f"the first file of the {flag('data.input')} source {spec!r}")
    raise DataError(f"{files[0]} ({which}) has fewer than two documents, so nothing can be "
                    "held out for evaluation: put a file with several documents first (a "
                    ".txt or .md file is one document: a .jsonl or .parquet file holds "
                    f"many), or train without evaluation with {flag('data.val_fraction')}=0.")
  return docs


def _write_validation(directory: str, docs: list[np.ndarray], prefix: str
                      ) -> dict[str, Any]:
  """Write `docs` as validation shards named with `prefix`; their manifest
  counts (documents, tokens, shards) in prepare's per-source shape."""
  writer = prepare._ShardWriter(directory, "validation", prefix)  # pylint: disable=protected-access
  for ids in docs:
    writer.write(ids)
  writer.close()
  return {"documents": {"train": None, "validation": len(docs)},
          "tokens": {"train": None, "validation": int(sum(d.size for d in docs))},
          "shards": {"train": [], "validation": writer.shards}}


def heldout_counts(manifest: dict[str, Any], num_sources: int) -> list[int]:
  """Leading documents held out of each source's first file, from the
  held-out manifest (one written before per-source sets: source 0's only)."""
  if manifest.get("sources"):
    return [src["documents"]["validation"] for src in manifest["sources"]]
  return [manifest["documents"]["validation"]] + [0] * (num_sources - 1)


def _existing_manifest(out_dir: str, inputs: dict[str, Any],
                       earlier: dict[str, Any] | None = None) -> dict[str, Any] | None:
  """The manifest in out_dir when written from `inputs` (or, by an earlier
  version, from `earlier`); DataError when the directory holds other data."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    return None
  manifest = prepare.load_manifest(out_dir)
  if manifest.get("inputs") not in (inputs, earlier or inputs):
    raise DataError(f"{out_dir!r} holds data of other inputs than this streaming run; use "
                    f"another {flag('data.prepared_dir')} or --workdir, or delete it.")
  return manifest


def report_lines(cfg: ml_collections.ConfigDict, data_dir: str) -> list[str]:
  """What a streaming run says about its data: sources, held-out set, mixture."""
  manifest = prepare.load_manifest(prepare.readable_dir(data_dir))
  specs, held = config_lib.data_sources(cfg), manifest["documents"]["validation"]
  per_source = manifest.get("sources") or [{**manifest, **manifest["inputs"]}]
  lines = [f"streaming {len(specs)} source(s), tokenized on the fly; held out: "
           + ("; ".join(f"the first {src['documents']['validation']} documents "
                        f"({src['tokens']['validation']} tokens) of {src['first_file']}"
                        for src in per_source) if held else
              f"nothing ({flag('data.val_fraction')}=0), so there is no evaluation")]
  weights = config_lib.data_weights(cfg)
  if weights and len(weights) > 1:
    lines.append("data mixture (share of tokens): " + "; ".join(
        f"{spec} -> {w:.3f} (~{m:.0f} tokens/document)"
        for spec, w, m in zip(specs, weights, manifest["document_tokens"])))
  return lines


def make_train_iterator(cfg: ml_collections.ConfigDict, data_dir: str, seed: int
                        ) -> grain.DatasetIterator:
  """The streaming training iterator of a run (train.py's hook); its held-out
  directory `data_dir` must exist (`ensure_heldout_dir`). data.weights are
  shares of tokens, as on the prepared path."""
  d, t = cfg.data, cfg.train
  manifest = prepare.load_manifest(prepare.readable_dir(data_dir))
  weights = config_lib.data_weights(cfg)
  proportions = (document_proportions(weights, manifest["document_tokens"])
                 if weights and len(weights) > 1 else None)
  return iter(make_train_dataset(
      run_sources(cfg), require_tokenizer(d), t.seq_len, t.global_batch, seed,
      proportions=proportions, text_field=d.text_field, max_bad_fraction=d.max_bad_fraction,
      heldout=heldout_counts(manifest, len(config_lib.data_sources(cfg))),
      worker_count=d.worker_count, shuffle_window=d.shuffle_window))
