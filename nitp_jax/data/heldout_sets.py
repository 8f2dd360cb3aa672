"""The held-out evaluation sets of a run's data: one per source of a mixture,
and how their losses combine into the headline held-out loss.

A directory prepared from several sources (or a streaming run's held-out set
of several) lists each source's validation shards in its manifest
("sources"). Each source then gets its own first `num_batches` batches,
evaluated on their own (eval records: `ntp_s0`, `ntp_s1`, ..., also `nitp_s<i>`,
`nitp_cos_s<i>`, `tokens_s<i>`), and the headline loss (`ntp`, `nitp`,
`nitp_cos`; `ppl` from `ntp`) is their mean weighted by `data.weights`, the
shares of training tokens, so it is the loss on the training distribution.
Without weights a prepared directory weighs each source by its share of the
training tokens; a streaming run does not count those (nothing reads its
whole corpus) and pools the held-out tokens of all sources instead. A source
with nothing held out is left out of the combination (the others' weights are
renormalised). Data with a single validation list (one source, or a directory
prepared before per-source shards) is one set, evaluated as before: its
records keep their keys and numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

from nitp_jax.data import pipeline
from nitp_jax.data.prepare import load_manifest, readable_dir
from nitp_jax.errors import DataError
from nitp_jax.flag_names import flag

Batch = pipeline.Batch


@dataclasses.dataclass(frozen=True)
class HeldOutSets:
  """Eval batches per set, the key suffix of each set ("" for the single set
  of unmixed data, "_s<i>" for source i) and the combination weights (sum 1;
  None = pool the tokens)."""
  batches: list[list[Batch]]
  suffixes: list[str]
  weights: list[float] | None = None

  @property
  def all_batches(self) -> list[Batch]:
    """Every set's batches, set after set (the probe batch is the first)."""
    return [b for batches in self.batches for b in batches]


def make_eval_sets(prepared_dir: str, seq_len: int, batch: int, num_batches: int,
                   weights: Sequence[float] | None = None) -> HeldOutSets:
  """The held-out sets of a prepared (or streaming held-out) directory: the
  first `num_batches` batches of each source's validation documents, in stored
  order; `weights` = config.data_weights (None: each source's share of the
  training tokens where the manifest has it)."""
  local = readable_dir(prepared_dir)
  sources = load_manifest(local).get("sources")
  if not sources:
    batches = pipeline.make_eval_batches(local, seq_len, batch, num_batches)
    return HeldOutSets([batches] if batches else [], [""] if batches else [])
  if weights is not None and len(weights) != len(sources):
    raise DataError(f"{flag('data.weights')} has {len(weights)} weights but {prepared_dir!r} "
                    f"was prepared from {len(sources)} sources")
  if weights is None:
    train_tokens = [src["tokens"].get("train") for src in sources]
    weights = train_tokens if all(train_tokens) else None
  sets, suffixes, kept = [], [], []
  for i, src in enumerate(sources):
    if not src["documents"]["validation"]:
      continue
    paths = [os.path.join(local, name) for name in src["shards"]["validation"]]
    sets.append(pipeline.eval_batches_of(paths, seq_len, batch, num_batches))
    suffixes.append(f"_s{i}")
    kept.append(i)
  if weights is not None and kept:
    total = sum(weights[i] for i in kept)
    weights = [weights[i] / total for i in kept]
  return HeldOutSets(sets, suffixes, weights if kept else None)


def combine(results: Sequence[dict[str, float]], suffixes: Sequence[str],
            weights: Sequence[float] | None) -> dict[str, float]:
  """One eval record from per-set results (each `evaluate.heldout`'s dict):
  the single set's as it is; else the weighted headline ("ntp", "nitp",
  "nitp_cos", "ppl", "tokens" = all sets' tokens) followed by each set's
  values under its suffix. weights None = weights proportional to the sets'
  tokens (the pooled token-weighted mean)."""
  if list(suffixes) == [""]:
    return dict(results[0])
  tokens = [r["tokens"] for r in results]
  if weights is None:
    weights = [t / max(sum(tokens), 1.0) for t in tokens]
  out = {k: sum(w * r[k] for w, r in zip(weights, results))
         for k in results[0] if k not in ("ppl", "tokens")}
  out["ppl"] = math.exp(min(out["ntp"], 50.0))
  out["tokens"] = sum(tokens)
  for suffix, r in zip(suffixes, results):
    out |= {f"{k}{suffix}": v for k, v in r.items() if k != "ppl"}
  return out


def describe(sets: HeldOutSets, specs: Sequence[str]) -> str | None:
  """One line for a mixture's evaluation (None for a single set): each
  source's held-out batches and its weight in the headline loss; a source
  with nothing held out is named as such."""
  if list(sets.suffixes) in ([], [""]):
    return None
  evaluated = {int(suffix[2:]): k for k, suffix in enumerate(sets.suffixes)}
  parts = []
  for i in range(max(len(specs), max(evaluated) + 1)):
    name = specs[i] if i < len(specs) else f"source {i}"
    k = evaluated.get(i)
    if k is None:
      parts.append(f"{name} -> nothing held out, not evaluated")
      continue
    weight = f"weight {sets.weights[k]:.3f}" if sets.weights else "pooled by tokens"
    parts.append(f"{name} -> ntp_s{i} ({len(sets.batches[k])} batch(es), {weight})")
  return "held-out loss per source, combined into the headline: " + "; ".join(parts)
