"""Grain input pipeline: prepared shards -> packed, batched training rows.

Batch format (numpy, every array int32 [B, T]):
  tokens       token ids; pad 0 where segment_ids == 0
  segment_ids  1, 2, ... per document (piece) in the row; 0 = padding
  positions    0, 1, ... restarting at every document

Documents stay contiguous inside a row, so tokens[:, t+1] is the target of
position t wherever segment_ids[:, t] == segment_ids[:, t+1] != 0. A document
longer than T is cut into T-token pieces, each its own segment.

Order (deterministic for a seed and a worker count): every epoch all training
documents are shuffled globally with a seed derived from (seed, epoch); process
p of P takes every P-th document of that order, so per epoch the processes
partition the corpus. Documents are cut into pieces, and the pieces are
shuffled within windows of `shuffle_window` consecutive pieces (0 = off), so
the consecutive pieces of one long document spread over many batches instead
of filling one. Pieces are first-fit packed into B_local rows at a time and
batched; epochs repeat forever.

Mixture (`weights`, one per comma-separated source of a directory prepared
from several): each source's documents are shuffled per epoch and split over
processes as above, repeated forever, and grain's `MapDataset.mix` interleaves
them deterministically (no randomness of its own) so that a weight is the
share of training TOKENS from that source: documents are drawn in proportion
to weight / mean document length (from the manifest). grain rounds the
proportions to integers with the smallest at 100, so shares are exact to
about 1% relative. Without weights the order is the unweighted one above.

Checkpointing: the iterator is a `grain.DatasetIterator`; `get_state()` is a
JSON-able dict and `set_state(state)` resumes exactly. With Orbax, put it in
the same checkpoint as the model (file name per jax process):
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state),
      data=grain.checkpoint.CheckpointSave(iterator)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(iterator)))  # sets its state
Restore into an iterator built with the same arguments (prepared_dir,
seq_len, global_batch, seed, process count and index, worker_count, weights).
grain.checkpoint.CheckpointSave/Restore exist only when orbax-checkpoint is
installed (pinned in requirements.txt).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

from nitp_jax.errors import DataError
from nitp_jax.flag_names import flag
from nitp_jax.data.prepare import load_manifest, readable_dir, shard_paths

Batch = dict[str, np.ndarray]
READ_THREADS = 2


class _EpochShardMapDataset(grain.MapDataset):
  """Process `index` of `count`: element index+k*count of each parent epoch.

  The parent is an infinitely repeated (and per-epoch shuffled) dataset whose
  epochs have `epoch_len` elements.
  """

  def __init__(self, parent: grain.MapDataset, epoch_len: int, index: int,
               count: int, num_epochs: int | None):
    super().__init__(parent)
    self._epoch_len, self._index, self._count = epoch_len, index, count
    self._local = len(range(index, epoch_len, count))
    self._len = sys.maxsize if num_epochs is None else num_epochs * self._local

  def __len__(self) -> int:
    return self._len

  def __str__(self) -> str:
    return f"EpochShardMapDataset({self._index}/{self._count})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, k = divmod(index, self._local)
    first = epoch * self._epoch_len + self._index
    return self._parent[first + k * self._count]


class _SplitDocument(grain_exp.FlatMapTransform):
  """A document -> pieces of at most seq_len tokens (iterator use only)."""

  max_fan_out = sys.maxsize     # only FlatMapMapDataset reads it

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, element: np.ndarray):
    return [{"tokens": element[i:i + self.seq_len]}
            for i in range(0, element.size, self.seq_len)]


def _decode(record: bytes) -> np.ndarray:
  return np.frombuffer(record, dtype="<i4").astype(np.int32)


def _documents(prepared_dir: str, split: str) -> grain.MapDataset:
  """The split's documents (int32 token arrays) in stored order."""
  paths = shard_paths(prepared_dir, split)
  if not paths or not load_manifest(prepared_dir)["documents"][split]:
    raise DataError(f"{prepared_dir!r} has no {split} documents. Prepare it "
                    "again with more documents" +
                    (f" or {flag('data.val_fraction')} > 0."
                     if split == "validation" else "."))
  source = grain.sources.ArrayRecordDataSource(paths)
  return grain.MapDataset.source(source).map(_decode)


def _has_validation(prepared_dir: str) -> bool:
  """Whether the directory holds out anything (nitp_jax.data.heldout)."""
  return bool(load_manifest(prepared_dir)["documents"]["validation"])


def heldout_documents(prepared_dir: str) -> list[np.ndarray]:
  """The validation split's documents (int32 token ids, EOS last), in order;
  none when nothing is held out."""
  if not _has_validation(prepared_dir):
    return []
  return list(_documents(prepared_dir, "validation"))


def _pack_and_batch(docs: grain.IterDataset, seq_len: int, batch: int,
                    shuffle_window: int = 0, seed: int = 0) -> grain.IterDataset:
  """Split long documents, shuffle the pieces within windows of
  `shuffle_window` (0 = keep their order), first-fit pack into rows, batch
  `batch` rows."""
  pieces = grain_exp.FlatMapIterDataset(docs, _SplitDocument(seq_len))
  if shuffle_window > 1:
    pieces = grain_exp.WindowShuffleIterDataset(pieces, window_size=shuffle_window,
                                                seed=seed)
  rows = grain_exp.FirstFitPackIterDataset(
      pieces, length_struct={"tokens": seq_len}, num_packing_bins=batch,
      shuffle_bins=False)
  return rows.batch(batch, drop_remainder=False).map(
      lambda b: _to_batch(b, batch, seq_len))


def _to_batch(packed: dict[str, np.ndarray], batch: int, seq_len: int
              ) -> Batch:
  """Rename grain's packed features; pad a short final batch with rows of 0."""
  out = {"tokens": packed["tokens"],
         "segment_ids": packed["tokens_segment_ids"],
         "positions": packed["tokens_positions"]}
  pad = batch - out["tokens"].shape[0]
  return {k: np.pad(v.astype(np.int32), ((0, pad), (0, 0)))
          for k, v in out.items()}


def _check_positive(**values: int) -> None:
  for name, v in values.items():
    if not isinstance(v, (int, np.integer)) or v <= 0:
      raise DataError(f"{name}={v!r} is invalid: must be a positive integer")


def make_train_dataset(prepared_dir: str, seq_len: int, global_batch: int,
                       seed: int, process_index: int | None = None,
                       process_count: int | None = None, worker_count: int = 0,
                       num_epochs: int | None = None, shuffle_window: int = 0,
                       weights: Sequence[float] | None = None) -> grain.IterDataset:
  """The training IterDataset of this process: batches [global/P, seq_len].

  Args:
    prepared_dir: output of `prepare`.
    seq_len, global_batch: T and the batch summed over all processes.
    seed: shuffle seed (0 <= seed < 2**32).
    process_index, process_count: this process's shard; None = jax's values.
    worker_count: grain worker processes (0 = in this process). The order
      of batches depends on it.
    num_epochs: None repeats forever; a number ends the data (the last batch
      is padded to full size), for tests and evaluation.
    shuffle_window: pieces shuffled together (0 = in document order).
    weights: share of tokens per source (config.data_weights); None = every
      document once per epoch.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  _check_positive(seq_len=seq_len, global_batch=global_batch,
                  process_count=process_count)
  if global_batch % process_count:
    raise DataError(f"global_batch={global_batch} is not divisible by the "
                    f"{process_count} processes: set {flag('train.global_batch')} "
                    "to a multiple of the process count.")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in "
                    f"[0, process_count={process_count})")
  if not 0 <= seed < 2**32:
    raise DataError(f"seed={seed} is invalid: must be in [0, 2**32)")
  if worker_count < 0:
    raise DataError(f"worker_count={worker_count} is invalid: must be >= 0")
  if shuffle_window < 0:
    raise DataError(f"shuffle_window={shuffle_window} is invalid: must be >= 0")
  if weights is not None and len(weights) > 1:
    if num_epochs is not None:
      raise DataError("a weighted mixture has no epochs: pass num_epochs=None")
    local = mixed_documents(prepared_dir, weights, seed, process_index, process_count)
  else:
    local = local_documents(prepared_dir, seed, process_index, process_count,
                            num_epochs)
  batched = _pack_and_batch(
      local.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS)),
      seq_len, global_batch // process_count, shuffle_window,
      _window_seed(seed, process_index))
  return in_workers(batched, worker_count)


def in_workers(batches: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  """`batches` produced by `worker_count` grain processes (0: unchanged).

  Each batch is copied out of the workers' shared memory as it arrives: a
  batch that stayed alive to the end of the run (the CPU backend may alias
  numpy memory) left its shared-memory blocks behind, and Python warned of
  "leaked shared_memory objects" at exit."""
  if not worker_count:
    return batches
  _ensure_flags_parsed()
  return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count)).map(
      lambda batch: {k: np.array(v) for k, v in batch.items()})


def _window_seed(seed: int, process_index: int) -> int:
  """The piece-shuffle seed of a process: independent of the document order's."""
  return int(np.random.SeedSequence([seed, process_index, 1]).generate_state(1)[0])


def _ensure_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside app.run use defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def local_documents(prepared_dir: str, seed: int, process_index: int,
                    process_count: int, num_epochs: int | None = None
                    ) -> grain.MapDataset:
  """Training documents this process reads, in order, epoch after epoch.

  Epoch e is a permutation of all documents seeded by (seed, e); this process
  takes elements process_index, process_index + process_count, ... of it.
  """
  docs = _documents(readable_dir(prepared_dir), "train")
  if len(docs) < process_count:
    raise DataError(f"{prepared_dir!r} has {len(docs)} training documents, "
                    f"fewer than the {process_count} processes; prepare a "
                    "larger corpus.")
  epochs = docs.shuffle(seed=seed).repeat()
  return _EpochShardMapDataset(epochs, len(docs), process_index,
                               process_count, num_epochs)


def _source_table(prepared_dir: str, weights: Sequence[float]) -> list[dict[str, Any]]:
  """The manifest's per-source entries, one per weight; DataError otherwise."""
  sources = load_manifest(prepared_dir).get("sources")
  if not sources:
    raise DataError(f"{prepared_dir!r} was not prepared per source (one source, or prepared "
                    f"before per-source shards), so {flag('data.weights')} cannot mix it: "
                    f"prepare into a new {flag('data.prepared_dir')}")
  if len(sources) != len(weights):
    raise DataError(f"{flag('data.weights')} has {len(weights)} weights but {prepared_dir!r} "
                    f"was prepared from {len(sources)} sources")
  for src in sources:
    if not src["documents"]["train"]:
      raise DataError(f"source {src['input']!r} has no training documents in "
                      f"{prepared_dir!r}: give it more documents or drop it from "
                      f"{flag('data.input')} and {flag('data.weights')}")
  return sources


def mixed_documents(prepared_dir: str, weights: Sequence[float], seed: int,
                    process_index: int, process_count: int) -> grain.MapDataset:
  """Training documents of this process drawn from the sources so that
  source i supplies about weights[i] of the tokens; infinite."""
  sources = _source_table(prepared_dir, weights)
  local = readable_dir(prepared_dir)
  parts = []
  for i, src in enumerate(sources):
    paths = [os.path.join(local, name) for name in src["shards"]["train"]]
    docs = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(_decode)
    if len(docs) < process_count:
      raise DataError(f"source {src['input']!r} has {len(docs)} training documents, fewer "
                      f"than the {process_count} processes; give it more documents.")
    epochs = docs.shuffle(seed=_source_seed(seed, i)).repeat()
    parts.append(_EpochShardMapDataset(epochs, len(docs), process_index, process_count,
                                       None))
  return grain.MapDataset.mix(parts, document_weights(sources, weights))


def document_weights(sources: Sequence[dict[str, Any]], weights: Sequence[float]
                     ) -> list[float]:
  """Per-source document proportions giving `weights` as token shares:
  weight / mean training-document length."""
  mean = [src["tokens"]["train"] / src["documents"]["train"] for src in sources]
  return [w / m for w, m in zip(weights, mean)]


def describe_mixture(prepared_dir: str, weights: Sequence[float]) -> str:
  """One line: each source's weight, training documents and tokens."""
  sources = _source_table(readable_dir(prepared_dir), weights)
  return "data mixture (share of tokens): " + "; ".join(
      f"{src['input']} -> {w:.3f} ({src['documents']['train']:,} documents, "
      f"{src['tokens']['train']:,} tokens)" for src, w in zip(sources, weights))


def _source_seed(seed: int, source: int) -> int:
  """The document-order seed of one source of a mixture."""
  return int(np.random.SeedSequence([seed, source, 2]).generate_state(1)[0])


def make_train_iterator(prepared_dir: str, seq_len: int, global_batch: int,
                        seed: int, process_index: int | None = None,
                        process_count: int | None = None,
                        worker_count: int = 0,
                        num_epochs: int | None = None,
                        shuffle_window: int = 0,
                        weights: Sequence[float] | None = None) -> grain.DatasetIterator:
  """`iter(make_train_dataset(...))`: checkpointable with get/set_state."""
  return iter(make_train_dataset(prepared_dir, seq_len, global_batch, seed,
                                 process_index, process_count, worker_count,
                                 num_epochs, shuffle_window, weights))


def make_eval_batches(prepared_dir: str, seq_len: int, batch: int,
                      num_batches: int) -> list[Batch]:
  """The first `num_batches` batches of the validation split, in stored order.

  Identical on every call. Fewer batches come back when the split is smaller;
  the last one is padded with rows of 0; none when nothing is held out
  (nitp_jax.data.heldout). These are global batches: with several processes,
  each takes its block of rows.
  """
  _check_positive(seq_len=seq_len, batch=batch, num_batches=num_batches)
  local = readable_dir(prepared_dir)
  if not _has_validation(local):
    return []
  return eval_batches_of(shard_paths(local, "validation"), seq_len, batch, num_batches)


def eval_batches_of(paths: Sequence[str], seq_len: int, batch: int, num_batches: int
                    ) -> list[Batch]:
  """The first `num_batches` batches of the documents in shards `paths`, in
  stored order (as `make_eval_batches`; per source: data.heldout_sets)."""
  _check_positive(seq_len=seq_len, batch=batch, num_batches=num_batches)
  docs = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(paths))).map(_decode)
  batched = _pack_and_batch(
      docs.to_iter_dataset(grain.ReadOptions(num_threads=0)), seq_len, batch)
  out = []
  for b in batched:
    out.append(b)
    if len(out) == num_batches:
      break
  return out

