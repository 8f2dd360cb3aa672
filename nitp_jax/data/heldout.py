"""The held-out (validation) split of a prepared corpus, and what it holds.

Whole documents are held out: `val_fraction` of them, chosen by the seed (at
least one). A corpus with too few documents for that (a single document, say)
holds out the last `val_fraction` of each document's tokens instead (at least
MIN_TOKENS, from documents of at least 2 * MIN_TOKENS tokens), so that it still
trains and evaluates. `val_fraction` = 0 holds out nothing: training then runs
without evaluation. The manifest's "heldout" records which, and `describe`
says it in one line (prepare and train print it).

A corpus of several sources is split per source (`plan_sources`): each holds
out max(1, round(n_i * val_fraction)) of its own n_i documents, or its tails
when that is all of them, so every source of a mixture is evaluated
(nitp_jax.data.heldout_sets). Each source's entry of the manifest's "sources"
then has its own "heldout"; the top-level mode is MIXED when theirs differ.
A directory prepared before per-source splits (its sources have no
"heldout") split the whole corpus at once; it is reused as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from nitp_jax.flag_names import flag

DOCUMENTS, TAILS, NONE = "documents", "document_tails", "none"
MIXED = "per_source"   # top-level mode when the sources' modes differ
MIN_TOKENS = 2   # a held-out piece needs one next-token prediction


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """How documents are split between "train" and "validation"."""
  mode: str
  val_fraction: float
  ids: frozenset[int] = frozenset()   # held-out document indices (DOCUMENTS)

  def split(self, index: int, ids: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(split, token ids) records for document `index` with tokens `ids`."""
    if self.mode == DOCUMENTS:
      return [("validation" if index in self.ids else "train", ids)]
    if self.mode == TAILS:
      tail = max(MIN_TOKENS, round(ids.size * self.val_fraction))
      if ids.size - tail >= MIN_TOKENS:
        return [("train", ids[:-tail]), ("validation", ids[-tail:])]
    return [("train", ids)]

  def to_json(self) -> dict[str, Any]:
    return {"mode": self.mode, "val_fraction": self.val_fraction}


def plan(num_docs: int, val_fraction: float, seed: int) -> HeldOut:
  """Whole documents when the corpus has enough, else document tails."""
  return _plan(num_docs, val_fraction, seed + 1)


def plan_sources(num_docs: Sequence[int], val_fraction: float, seed: int
                 ) -> list[HeldOut]:
  """One plan per source, over that source's document indices: a single
  source is split as `plan` splits a corpus; several each hold out their own
  share, chosen by a random stream of their own (the seed and the index). A
  source without documents (its files all named by an earlier one) has none
  to hold out, not tails."""
  if len(num_docs) == 1:
    return [plan(num_docs[0], val_fraction, seed)]
  return [_plan(n, val_fraction, [seed, i]) if n or not val_fraction else
          HeldOut(DOCUMENTS, float(val_fraction)) for i, n in enumerate(num_docs)]


def _plan(num_docs: int, val_fraction: float, rng_seed: int | list[int]) -> HeldOut:
  """`plan` with the held-out documents drawn by default_rng(rng_seed)."""
  if val_fraction == 0:
    return HeldOut(NONE, 0.0)
  num_val = max(1, round(num_docs * val_fraction))
  if num_val >= num_docs:
    return HeldOut(TAILS, float(val_fraction))
  order = np.random.default_rng(rng_seed).permutation(num_docs)
  return HeldOut(DOCUMENTS, float(val_fraction), frozenset(order[:num_val].tolist()))


def to_json(plans: Sequence[HeldOut]) -> dict[str, Any]:
  """The manifest's top-level "heldout" of `plan_sources`' plans."""
  modes = {p.mode for p in plans}
  return {"mode": modes.pop() if len(modes) == 1 else MIXED,
          "val_fraction": plans[0].val_fraction}


def describe(manifest: dict[str, Any]) -> str:
  """One line: what a prepared directory holds out, from its manifest (with
  several sources, also each one's share)."""
  docs, tokens = manifest["documents"], manifest["tokens"]
  held = manifest.get("heldout", {"mode": DOCUMENTS if docs["validation"] else NONE,
                                  "val_fraction": None})
  fraction = held["val_fraction"]
  if held["mode"] == NONE:
    return (f"held out: nothing ({flag('data.val_fraction')}=0), so there is no "
            "evaluation")
  if not docs["validation"]:
    return (f"held out: nothing (the documents are too short to split for "
            f"{flag('data.val_fraction')}={fraction:g}), so there is no evaluation")
  sources = manifest.get("sources") or []
  per_source = bool(sources) and all("heldout" in s for s in sources)
  if held["mode"] == TAILS:
    corpus_docs = docs["train"]
    few = "each source has" if per_source else "the corpus has"
    line = (f"held out: the last {100 * fraction:g}% of the tokens of each document "
            f"({tokens['validation']} tokens from {docs['validation']} of {corpus_docs} "
            f"document(s)), since {few} too few documents to hold out whole ones")
  else:
    total = (sum(_source_total(s, held["mode"]) for s in sources) if sources
             else docs["train"] + docs["validation"])
    setting = f", {flag('data.val_fraction')}={fraction:g}" if fraction is not None else ""
    line = (f"held out: {docs['validation']} of {total} documents ({tokens['validation']} "
            f"tokens{setting})")
  if not sources:
    return line
  how = "per source" if per_source else (
      f"per source (split over the whole corpus; a new {flag('data.prepared_dir')} "
      "splits each source)")
  parts = [_source_part(s, held["mode"], fraction) for s in sources]
  return f"{line}; {how}: {', '.join(parts)}"


def _source_mode(source: dict[str, Any], mode: str) -> str:
  """A source's mode: its own, or the corpus's (prepared before per-source splits)."""
  return source.get("heldout", {}).get("mode", mode)


def _source_total(source: dict[str, Any], mode: str) -> int:
  """A source's documents (with tails held out, each is also in train)."""
  docs = source["documents"]
  return docs["train"] + (docs["validation"] if _source_mode(source, mode) != TAILS else 0)


def _source_part(source: dict[str, Any], mode: str, fraction: float | None) -> str:
  """'NAME V of N' (tails said where the sources' modes differ)."""
  tails = (f" (the last {100 * fraction:g}% of their tokens: too few documents to hold out "
           "whole ones)" if mode == MIXED and _source_mode(source, mode) == TAILS else "")
  return (f"{source['input']} {source['documents']['validation']} of "
          f"{_source_total(source, mode)}{tails}")
