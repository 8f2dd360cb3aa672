"""Cross-check our downstream-task scoring against lm-evaluation-harness.

  python benchmarks/lm_eval_crosscheck.py --workdir=runs/tiny \\
      --lm_eval_python=/path/to/venv-with-lm-eval/bin/python [--out=/tmp/crosscheck]

Takes a run's checkpoint, builds its `next_line` task (the held-out
documents of its prepared data; the same items the trainer scores), scores it
with nitp_jax (`evaluate`'s task accuracy) and, after an HF export, with
`lm_eval` (run by --lm_eval_python: lm-eval is not a dependency of this
project), and prints one JSON line with both accuracies and the difference
in items.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess

import jax
from absl import app, flags

import common  # noqa: F401  (puts the repository on sys.path)
from nitp_jax import checkpoint as ckpt_lib  # noqa: E402
from nitp_jax import evaluate  # noqa: E402
from nitp_jax import jitted  # noqa: E402
from nitp_jax import layout  # noqa: E402
from nitp_jax import tasks  # noqa: E402
from nitp_jax.data import tokenizer as tok_lib  # noqa: E402
from nitp_jax.export import hf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run.", required=True)
flags.DEFINE_string("lm_eval_python", "python3", "A Python with lm-eval, torch, transformers.")
flags.DEFINE_string("out", "/tmp/lm_eval_crosscheck", "Export, task and results folder.")
flags.DEFINE_integer("batch_size", 8, "lm-eval batch size.")

TASK_YAML = """\
task: next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main(argv):
  del argv
  step, cfg, params = ckpt_lib.restore_params(FLAGS.workdir)
  prepared = layout.data_dir(cfg, FLAGS.workdir)
  tokenizer = tok_lib.load_tokenizer(layout.tokenizer_path(prepared))
  items = tasks.heldout_next_line(prepared, tokenizer)
  task = tasks.Task.build("next_line", items, tokenizer, cfg.train.seq_len,
                          cfg.train.global_batch)
  steps = jitted.build(cfg, evaluate.eval_mesh(cfg))
  ours = evaluate.task_accuracy(steps, jax.device_put(params, steps.state_shardings["params"]),
                                task)

  task_dir = os.path.join(FLAGS.out, "tasks")
  data = os.path.abspath(os.path.join(task_dir, "next_line.jsonl"))
  tasks.write_task(items, data)
  with open(os.path.join(task_dir, "next_line.yaml"), "w", encoding="utf-8") as f:
    f.write(TASK_YAML.format(data=data))
  model_dir = hf.export_from_params(params, cfg, os.path.join(FLAGS.out, "hf"), FLAGS.workdir)
  results = os.path.join(FLAGS.out, "results")
  subprocess.run([FLAGS.lm_eval_python, "-m", "lm_eval", "--model", "hf", "--model_args",
                  f"pretrained={model_dir},dtype=float32", "--device", "cpu",
                  "--batch_size", str(FLAGS.batch_size), "--tasks", "next_line",
                  "--include_path", task_dir, "--output_path", results], check=True,
                 env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
  newest = max(glob.glob(os.path.join(results, "**", "results_*.json"), recursive=True),
               key=os.path.getmtime)
  with open(newest, encoding="utf-8") as f:
    theirs = json.load(f)["results"]["next_line"]
  n = len(items)
  out = {"benchmark": "lm_eval_crosscheck", "workdir": FLAGS.workdir, "step": step,
         "items": n, "ours_acc": ours["next_line/acc"], "lm_eval_acc": theirs["acc,none"],
         "ours_acc_norm": ours["next_line/acc_norm"],
         "lm_eval_acc_norm": theirs["acc_norm,none"]}
  out["acc_items_apart"] = round(abs(out["ours_acc"] - out["lm_eval_acc"]) * n)
  out["acc_norm_items_apart"] = round(abs(out["ours_acc_norm"] - out["lm_eval_acc_norm"]) * n)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
