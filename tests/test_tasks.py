"""Downstream multiple-choice tasks: files in lm-eval's shape, lm-eval's
context/choice encoding, JAX log-likelihoods equal to a direct computation,
acc and acc_norm, and the next-line task built from held-out documents."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import jitted
from nitp_jax import model as model_lib
from nitp_jax import tasks
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.errors import DataError
from tests.helpers import small_config

DOCS = ["\n".join(f"def function_{d}_{i}(value): return value * {i} + {d}" for i in range(30))
        for d in range(6)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tok_lib.train_tokenizer(DOCS * 3, 320, str(tmp_path_factory.mktemp("tok") / "sp"))
  return tok_lib.load_tokenizer(path)


def test_task_files_are_checked_line_by_line(tmp_path):
  good = {"context": "a b", "choices": [" c", " d"], "label": 1}
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "label": 2}) + "\n")
  with pytest.raises(DataError, match=r"t.jsonl:3 is not a task item"):
    tasks.load_task(str(path))
  path.write_text(json.dumps(good) + "\n")
  assert tasks.load_task(str(path)) == [tasks.Item("a b", (" c", " d"), 1)]
  with pytest.raises(DataError, match=r"does not exist: .*or a built-in task \(next_line\), "
                     r"in --config.train.eval_tasks"):
    tasks.load_task(str(tmp_path / "nope.jsonl"))


def test_choices_are_encoded_after_the_context_as_lm_eval_does(tokenizer):
  context_ids, choice_ids = tasks.encode_pair(tokenizer, "def function_1_2(value): ", "return")
  assert context_ids + choice_ids == tokenizer.encode("def function_1_2(value): return")
  assert context_ids == tokenizer.encode("def function_1_2(value):")  # the space moves


def test_scores_equal_a_direct_log_likelihood(tokenizer):
  cfg = small_config()
  cfg.train.global_batch, cfg.model.vocab_size = 4, 320
  steps = jitted.build(cfg, jitted.mesh_for_config(cfg))
  params = model_lib.init_params(cfg, jax.random.key(1))
  items = [tasks.Item("def function_3_4(value): return value", (" * 4 + 3", " + 1", " - 7"), 0),
           tasks.Item("x" * 40, (" return value * 9", " y"), 1)]  # truncated to seq_len
  task = tasks.Task.build("t", items, tokenizer, cfg.train.seq_len, cfg.train.global_batch)
  assert task.rows == 5 and len(task.batches) == 2
  got = np.concatenate([np.asarray(steps.score(params, b)) for b in task.batches])[:5]
  net, _ = model_lib.build(cfg)
  for r, (it, choice) in enumerate([(it, c) for it in items for c in it.choices]):
    context_ids, choice_ids = tasks.encode_pair(tokenizer, it.context, choice)
    whole = (context_ids + choice_ids)[-(cfg.train.seq_len + 1):]  # as lm-eval truncates
    logits = net.apply({"params": params["backbone"]}, jnp.asarray([whole[:-1]]))[0][0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    n = len(whole) - 1
    expected = sum(float(logp[t, whole[t + 1]]) for t in range(n - len(choice_ids), n))
    np.testing.assert_allclose(got[r], expected, rtol=1e-5, atol=1e-5)


def test_accuracy_and_length_normalised_accuracy():
  items = [tasks.Item("c", ("a", "bbbb"), 1), tasks.Item("c", ("a", "b"), 0)]
  loglik = np.array([-1.0, -2.0, -0.5, -0.7])
  # item 0: raw picks "a" (wrong), per character -1 vs -0.5 picks "bbbb" (right)
  assert tasks.accuracy(loglik, items) == {"acc": 0.5, "acc_norm": 1.0}


def test_next_line_task_uses_other_documents_as_distractors():
  items = tasks.next_line_task(DOCS, num_items=20, num_choices=4, context_lines=5, seed=0)
  assert len(items) == 20 and items == tasks.next_line_task(DOCS, 20, 4, 5, seed=0)
  for it in items:
    truth = it.choices[it.label]
    d = next(d for d, doc in enumerate(DOCS) if it.context + truth in doc)
    assert all(c not in DOCS[d] for i, c in enumerate(it.choices) if i != it.label)
  assert len({it.label for it in items}) > 1
  with pytest.raises(DataError, match="too few or too short"):
    tasks.next_line_task(DOCS[:1], context_lines=5)
  # Lines to predict but no long enough lines elsewhere to choose against (a
  # mixture's held-out code file next to one-line documents): no empty task.
  short = ["def f(x):\n    return 1\n", "def g(x):\n    return 2\n"]
  with pytest.raises(DataError, match="no usable line has 3 lines of other documents"):
    tasks.next_line_task(DOCS[:1] + short, context_lines=5)


def test_written_tasks_load_back(tmp_path):
  items = tasks.next_line_task(DOCS, num_items=5, context_lines=5)
  path = os.path.join(tmp_path, "next_line.jsonl")
  tasks.write_task(items, path)
  assert tasks.load_task(path) == items and tasks.task_name(path) == "next_line"


def test_training_logs_task_accuracy_and_evaluate_agrees(prepared_dir, tmp_path):
  from nitp_jax import evaluate, train
  from tests.conftest import train_config
  cfg = train_config(prepared_dir, steps=2, eval_every=2, checkpoint_every=2, geometry_every=0)
  cfg.train.eval_tasks = "next_line"
  train.run(cfg, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    last_eval = [r for r in map(json.loads, f) if r["kind"] == "eval"][-1]
  assert 0 <= last_eval["next_line/acc"] <= 1 and 0 <= last_eval["next_line/acc_norm"] <= 1
  result = evaluate.evaluate_run(str(tmp_path))
  assert result["next_line/acc"] == last_eval["next_line/acc"]
  assert result["next_line/acc_norm"] == last_eval["next_line/acc_norm"]
