"""The held-out (validation) split of a prepared corpus, and what it holds.

Whole documents are held out: `val_fraction` of them, chosen by the seed (at
least one). A corpus with too few documents for that (a single document, say)
holds out the last `val_fraction` of each document's tokens instead (at least
MIN_TOKENS, from documents of at least 2 * MIN_TOKENS tokens), so that it still
trains and evaluates. `val_fraction` = 0 holds out nothing: training then runs
without evaluation. The manifest's "heldout" records which, and `describe`
says it in one line (prepare and train print it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nitp_jax.flag_names import flag

DOCUMENTS, TAILS, NONE = "documents", "document_tails", "none"
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
  if val_fraction == 0:
    return HeldOut(NONE, 0.0)
  num_val = max(1, round(num_docs * val_fraction))
  if num_val >= num_docs:
    return HeldOut(TAILS, float(val_fraction))
  order = np.random.default_rng(seed + 1).permutation(num_docs)
  return HeldOut(DOCUMENTS, float(val_fraction), frozenset(order[:num_val].tolist()))


def describe(manifest: dict[str, Any]) -> str:
  """One line: what a prepared directory holds out, from its manifest."""
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
  if held["mode"] == TAILS:
    corpus_docs = docs["train"]
    return (f"held out: the last {100 * fraction:g}% of the tokens of each document "
            f"({tokens['validation']} tokens from {docs['validation']} of {corpus_docs} "
            f"document(s)), since the corpus has too few documents to hold out whole ones")
  total = docs["train"] + docs["validation"]
  setting = f", {flag('data.val_fraction')}={fraction:g}" if fraction is not None else ""
  return (f"held out: {docs['validation']} of {total} documents ({tokens['validation']} "
          f"tokens{setting})")
