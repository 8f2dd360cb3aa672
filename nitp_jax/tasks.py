"""Multiple-choice downstream tasks, scored in JAX during training.

A task file is JSON lines in lm-evaluation-harness's shape:

  {"context": "...", "choices": ["...", "...", ...], "label": 0}

Each choice is scored by the summed log-likelihood of its tokens after the
context, the way lm-evaluation-harness scores `loglikelihood` requests:
context and choice are encoded together and the choice is what follows the
context's own encoding; the last `seq_len` + 1 tokens are kept. (A choice
follows its context directly: lm-eval task files for these tasks set
`target_delimiter: ""`.) `acc` takes
the best sum, `acc_norm` the best sum divided by the choice's length in
characters (lm-eval's acc_norm).

`next_line_task` builds the task the demo ships: from held-out documents
only, the true next line of a file against lines drawn from other held-out
files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import numpy as np
from absl import logging

from nitp_jax.errors import DataError
from nitp_jax.flag_names import flag

BUILTIN = {"next_line"}


@dataclasses.dataclass(frozen=True)
class Item:
  context: str
  choices: tuple[str, ...]
  label: int


def load_task(path: str) -> list[Item]:
  """The items of a task file; DataError naming the first bad line."""
  if not os.path.isfile(path):
    raise DataError(f"task file {path!r} does not exist: pass JSON lines with context, "
                    f"choices and label, or a built-in task ({', '.join(sorted(BUILTIN))}), "
                    f"in {flag('train.eval_tasks')}")
  items = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        raw = json.loads(line)
        item = Item(raw["context"], tuple(raw["choices"]), int(raw["label"]))
        if not (isinstance(item.context, str) and len(item.choices) >= 2
                and all(isinstance(c, str) and c for c in item.choices)
                and 0 <= item.label < len(item.choices)):
          raise ValueError
      except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}:{lineno} is not a task item: each line needs \"context\" "
                        "(text), \"choices\" (2 or more non-empty texts) and \"label\" (the "
                        "index of the right choice)") from None
      items.append(item)
  if not items:
    raise DataError(f"task file {path!r} has no items")
  return items


def task_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def encode_pair(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
  """(context ids, choice ids): the choice is what follows the context's own
  encoding in the encoding of both (lm-eval's _encode_pair)."""
  moved = len(context) - len(context.rstrip())  # trailing spaces go with the choice
  if moved:
    context, choice = context[:-moved], context[-moved:] + choice
  whole = tokenizer.encode(context + choice)
  context_ids = tokenizer.encode(context)
  return whole[:len(context_ids)], whole[len(context_ids):]


def encode_rows(items: Sequence[Item], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """One row per (item, choice), as lm-eval builds its inputs: of context +
  choice, the last `seq_len` tokens before the final one as `tokens`, each
  next token as `targets`, `scored` = 1 where the target is a choice token;
  with segment_ids and positions, int32 [R, seq_len]."""
  pairs = [encode_pair(tokenizer, it.context, c) for it in items for c in it.choices]
  out = {k: np.zeros((len(pairs), seq_len), np.int32)
         for k in ("tokens", "targets", "segment_ids", "positions", "scored")}
  for r, (context_ids, choice_ids) in enumerate(pairs):
    if not choice_ids:
      raise DataError("a choice encodes to no tokens after its context; make every choice "
                      "non-empty text")
    whole = (context_ids + choice_ids)[-(seq_len + 1):]
    n = len(whole) - 1
    out["tokens"][r, :n] = whole[:-1]
    out["targets"][r, :n] = whole[1:]
    out["segment_ids"][r, :n] = 1
    out["positions"][r, :n] = np.arange(n)
    out["scored"][r, max(n - len(choice_ids), 0):n] = 1
  return out


def accuracy(loglik_R: np.ndarray, items: Sequence[Item]) -> dict[str, float]:
  """acc and acc_norm of per-(item, choice) log-likelihoods."""
  correct = correct_norm = 0
  r = 0
  for it in items:
    ll = np.asarray(loglik_R[r:r + len(it.choices)], np.float64)
    lengths = np.array([len(c) for c in it.choices], np.float64)
    correct += int(np.argmax(ll) == it.label)
    correct_norm += int(np.argmax(ll / lengths) == it.label)
    r += len(it.choices)
  return {"acc": correct / len(items), "acc_norm": correct_norm / len(items)}


def next_line_task(documents: Sequence[str], num_items: int = 200, num_choices: int = 4,
                   context_lines: int = 12, min_chars: int = 12, seed: int = 0) -> list[Item]:
  """Items from `documents` (held-out text): `context_lines` lines of a
  document, then its true next line against lines of other documents."""
  rng = np.random.default_rng(seed)
  lines = [[l for l in doc.split("\n")] for doc in documents]
  candidates = [(d, i) for d, doc in enumerate(lines) for i in range(context_lines, len(doc))
                if len(doc[i].strip()) >= min_chars]
  pool = [(d, l) for d, doc in enumerate(lines) for l in doc if len(l.strip()) >= min_chars]
  if len(documents) < 2 or not candidates:
    raise DataError(f"the held-out documents are too few or too short to build a next-line "
                    f"task ({len(documents)} documents, {len(candidates)} usable lines)")
  items = []
  for k in rng.permutation(len(candidates))[:num_items]:
    d, i = candidates[k]
    truth = lines[d][i]
    others = [l for od, l in pool if od != d and l.strip() != truth.strip()]
    if len(others) < num_choices - 1:
      continue
    picks = [others[j] for j in rng.choice(len(others), num_choices - 1, replace=False)]
    label = int(rng.integers(num_choices))
    choices = picks[:label] + [truth] + picks[label:]
    items.append(Item("\n".join(lines[d][i - context_lines:i]) + "\n", tuple(choices), label))
  if not items:  # an empty task would fail at the first eval, after training up to it
    raise DataError(f"the held-out documents are too few or too short to build a next-line "
                    f"task (no usable line has {num_choices - 1} lines of other documents to "
                    "choose against)")
  return items


def heldout_next_line(prepared_dir: str, tokenizer, seed: int = 0) -> list[Item]:
  """The next-line task of a prepared directory's held-out documents."""
  from nitp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  texts = [tokenizer.decode(ids[ids != tokenizer.eos_id])
           for ids in pipeline.heldout_documents(prepared_dir)]
  return next_line_task(texts, seed=seed)


def load_tasks(spec: str, prepared_dir: str, tokenizer, seq_len: int, batch: int
               ) -> list["Task"]:
  """The tasks of config.train.eval_tasks ("" = none), encoded for scoring.
  A built-in task the held-out documents are too few for (a tiny corpus) is
  left out with a warning, so that such a corpus still trains."""
  out = []
  for name in [n.strip() for n in spec.split(",") if n.strip()]:
    if name in BUILTIN:
      try:
        items = heldout_next_line(prepared_dir, tokenizer)
      except DataError as e:
        logging.warning("eval task %s left out: %s", name, e)
        continue
    else:
      items, name = load_task(name), task_name(name)
    out.append(Task.build(name, items, tokenizer, seq_len, batch))
  return out


def write_task(items: Sequence[Item], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for it in items:
      f.write(json.dumps({"context": it.context, "choices": list(it.choices),
                          "label": it.label}) + "\n")
  os.replace(tmp, path)


@dataclasses.dataclass
class Task:
  """A task's items and its encoded rows, in batches of the eval batch size."""
  name: str
  items: list[Item]
  batches: list[dict[str, np.ndarray]]
  rows: int

  @classmethod
  def build(cls, name: str, items: list[Item], tokenizer, seq_len: int, batch: int) -> "Task":
    rows = encode_rows(items, tokenizer, seq_len)
    n = len(rows["tokens"])
    padded = -(-n // batch) * batch
    rows = {k: np.pad(v, ((0, padded - n), (0, 0))) for k, v in rows.items()}
    batches = [{k: v[i:i + batch] for k, v in rows.items()} for i in range(0, padded, batch)]
    return cls(name, items, batches, n)

  def evaluate(self, score, params, on_mesh) -> dict[str, float]:
    """{"<name>/acc", "<name>/acc_norm"} with `score(params, batch)` (the
    jitted score step) on batches put on the mesh by `on_mesh`."""
    loglik = np.concatenate([np.asarray(jax.device_get(score(params, on_mesh(b))))
                             for b in self.batches])[:self.rows]
    return {f"{self.name}/{k}": v for k, v in accuracy(loglik, self.items).items()}
