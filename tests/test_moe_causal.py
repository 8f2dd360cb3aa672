"""Every dispatch offered for training is causal and keeps packed documents
apart, bitwise, through the whole model: tokens after a cut (or in another
document) change, logits before the cut (or of the other document) do not
change by a single bit. `gather` (and `capacity`, the same slots) fill
capacity over the whole sequence and are not causal, so training refuses them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import config as config_lib
from nitp_jax import model as model_lib
from nitp_jax import train
from nitp_jax.errors import ConfigError
from tests.helpers import packed_batch, small_config

SEEDS = (0, 1, 2)
T, CUT = 32, 13


def _cfg(dispatch: str):
  cfg = small_config(moe=True)
  cfg.model.max_seq_len = cfg.train.seq_len = T
  cfg.model.moe.dispatch = dispatch
  return config_lib.validate(cfg)


@functools.lru_cache(maxsize=None)
def _setup(dispatch: str, seed: int):
  cfg = _cfg(dispatch)
  model, _ = model_lib.build(cfg)
  params = model_lib.init_params(cfg, jax.random.key(seed))["backbone"]
  # Larger router weights: confident, uneven routing (as after training).
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 30 if "router" in jax.tree_util.keystr(p) else a, params)
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b["tokens"], b["segment_ids"],
                                           b["positions"]))
  return cfg, params, apply


def _one_document(seed: int) -> dict:
  tokens = np.random.default_rng(seed).integers(1, 97, (2, T)).astype(np.int32)
  return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones((2, T), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))}


def _perturbed(batch: dict, where_BxT: np.ndarray, seed: int) -> dict:
  new = np.random.default_rng(100 + seed).integers(1, 97, where_BxT.shape).astype(np.int32)
  return dict(batch, tokens=jnp.where(where_BxT, new, batch["tokens"]))


def _logits(dispatch: str, seed: int, batch: dict) -> np.ndarray:
  _, params, apply = _setup(dispatch, seed)
  return np.asarray(apply(params, batch)[0])


def _future_changes_past(dispatch: str, seed: int) -> tuple[float, float]:
  """(max |change| of logits before CUT, after CUT) when tokens >= CUT change."""
  batch = _one_document(seed)
  after_BxT = np.broadcast_to(np.arange(T) >= CUT, (2, T))
  a = _logits(dispatch, seed, batch)
  b = _logits(dispatch, seed, _perturbed(batch, after_BxT, seed))
  return (float(np.max(np.abs(a[:, :CUT] - b[:, :CUT]))),
          float(np.max(np.abs(a[:, CUT:] - b[:, CUT:]))))


def _other_document_changes(dispatch: str, seed: int) -> tuple[float, float]:
  """(max |change| of document 2's logits, of document 1's) when document 1's
  tokens change (document 1 comes first: this is not implied by causality)."""
  batch = packed_batch(2, T, 97, seed)
  seg = np.asarray(batch["segment_ids"])
  a = _logits(dispatch, seed, batch)
  b = _logits(dispatch, seed, _perturbed(batch, seg == 1, seed))
  doc2, doc1 = seg == 2, seg == 1
  return float(np.max(np.abs(a[doc2] - b[doc2]))), float(np.max(np.abs(a[doc1] - b[doc1])))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dispatch", config_lib.CAUSAL_DISPATCHES)
def test_later_tokens_leave_earlier_logits_bitwise_unchanged(dispatch, seed):
  before, after = _future_changes_past(dispatch, seed)
  assert before == 0.0, f"{dispatch}: logits before the cut changed by {before}"
  assert after > 1e-3  # the perturbation is real


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dispatch", config_lib.CAUSAL_DISPATCHES)
def test_packed_document_logits_ignore_the_other_document(dispatch, seed):
  other, own = _other_document_changes(dispatch, seed)
  assert other == 0.0, f"{dispatch}: document 2's logits changed by {other}"
  assert own > 1e-3


def test_gather_is_not_causal_so_training_refuses_it():
  """Why gather / capacity are refused: with the default capacity factor,
  changing later tokens changes earlier logits (a drop moves)."""
  leaks = [_future_changes_past("gather", s)[0] for s in SEEDS]
  assert max(leaks) > 1e-4, leaks
  for dispatch in ("gather", "capacity"):
    with pytest.raises(ConfigError, match=(
        f"config.model.moe.dispatch='{dispatch}' is invalid: cannot train: it drops token "
        "copies by capacity over the whole sequence, so later tokens change earlier")):
      train.Trainer(_cfg(dispatch), "/nonexistent/never-created")


def test_default_dispatch_is_dropless_and_trainable():
  cfg = config_lib.base_config()
  assert cfg.model.moe.dispatch == "dropless"
  cfg.model.moe.num_experts = 8
  config_lib.check_trainable(cfg)
  for name in ("dense", "ragged"):
    cfg.model.moe.dispatch = name
    config_lib.check_trainable(cfg)
