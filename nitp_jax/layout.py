"""Where a run keeps its files: the one definition of a workdir's layout.

  <workdir>/
    checkpoints/<step>/   Orbax: train state, data-iterator state, config
    data/                 prepared data, unless config.data.prepared_dir is set
      manifest.json, tokenizer.model, {train,validation}-NNNNN.array_record
    metrics.jsonl         one JSON record per log/eval/probe step
    tensorboard/          event files
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ml_collections

from nitp_jax.errors import ConfigError

CHECKPOINTS = "checkpoints"
DATA = "data"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS)


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, TENSORBOARD)


def data_dir(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """The prepared data of a run: config.data.prepared_dir, else <workdir>/data."""
  return cfg.data.prepared_dir or os.path.join(os.path.abspath(workdir), DATA)


def tokenizer_path(prepared_dir: str) -> str:
  """The prepared data's tokenizer: tokenizer.json if it has one, else
  tokenizer.model."""
  json_path = os.path.join(prepared_dir, TOKENIZER_JSON)
  return json_path if os.path.isfile(json_path) else os.path.join(prepared_dir, TOKENIZER)


def run_tokenizer(cfg: ml_collections.ConfigDict, workdir: str | None) -> str | None:
  """The tokenizer a run used: config.data.tokenizer, else the prepared
  data's own; None when neither file exists."""
  candidates = [cfg.data.tokenizer]
  if workdir:
    candidates.append(tokenizer_path(data_dir(cfg, workdir)))
  return next((p for p in candidates if p and os.path.isfile(p)), None)


def default_workdir(config_path: str) -> str:
  """runs/<config name>[_<variant>] for `configs/x.py[:variant]`."""
  path, _, variant = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", name + (f"_{variant}" if variant else ""))


def make_workdir(workdir: str) -> str:
  """The absolute path of `workdir`, created; ConfigError if it is not writable."""
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):  # a unique name: processes may share path
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not a writable directory ({e.strerror or e}): "
                      "pass a directory you can write to") from e
  return path


def write_json(path: str, obj: Any) -> None:
  """Write `obj` as indented JSON, atomically (a reader never sees half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
