"""Effective rank and mean pairwise cosine against NumPy and known cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import geometry


def _np_erank(x_NxD: np.ndarray) -> float:
  """Independent reference: singular values of the centred data."""
  x = x_NxD.astype(np.float64)
  s = np.linalg.svd(x - x.mean(0), compute_uv=False)
  lam = s ** 2 / len(x)
  p = lam / lam.sum()
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


def _np_mean_cosine(x_NxD: np.ndarray) -> float:
  """Exact average over all ordered pairs i != j."""
  u = x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True)
  g = u @ u.T
  n = len(u)
  return float((g.sum() - np.trace(g)) / (n * (n - 1)))


def test_effective_rank_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 16)) * np.linspace(0.1, 3.0, 16)
  got = float(jax.jit(geometry.effective_rank)(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, _np_erank(x), rtol=1e-4)


def test_effective_rank_uses_only_masked_rows():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(120, 8))
  mask = rng.random(120) < 0.6
  x_junk = np.where(mask[:, None], x, 1e3)  # invalid rows would dominate
  got = float(jax.jit(geometry.effective_rank)(jnp.asarray(x_junk, jnp.float32),
                                               jnp.asarray(mask)))
  np.testing.assert_allclose(got, _np_erank(x[mask]), rtol=1e-4)


def test_effective_rank_known_cases():
  rng = np.random.default_rng(2)
  d = 32
  iso = rng.normal(size=(8192, d)).astype(np.float32)
  assert float(geometry.effective_rank(jnp.asarray(iso))) > 0.9 * d
  rank1 = (rng.normal(size=(500, 1)) * rng.normal(size=(1, d)) + 5.0).astype(np.float32)
  np.testing.assert_allclose(float(geometry.effective_rank(jnp.asarray(rank1))), 1.0, atol=1e-2)
  same = np.tile(rng.normal(size=(1, d)), (10, 1)).astype(np.float32)
  assert float(geometry.effective_rank(jnp.asarray(same))) == pytest.approx(0.0, abs=1e-6)


def test_mean_cosine_matches_numpy_on_average():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(64, 8)) + 1.0
  got = float(geometry.mean_pairwise_cosine(jnp.asarray(x, jnp.float32), num_pairs=200_000))
  np.testing.assert_allclose(got, _np_mean_cosine(x), atol=5e-3)


def test_mean_cosine_known_cases():
  rng = np.random.default_rng(4)
  same = np.tile(rng.normal(size=(1, 16)), (50, 1)) * rng.uniform(0.5, 2.0, size=(50, 1))
  assert float(geometry.mean_pairwise_cosine(jnp.asarray(same, jnp.float32))) == pytest.approx(1.0, abs=1e-5)
  ortho = np.eye(16) * rng.uniform(0.5, 2.0, size=(16, 1))  # rows orthogonal
  assert float(geometry.mean_pairwise_cosine(jnp.asarray(ortho, jnp.float32))) == pytest.approx(0.0, abs=1e-6)


def test_mean_cosine_pairs_are_distinct_valid_rows():
  """Two valid identical rows among invalid opposite ones: every pair is
  (a, b) or (b, a), never (a, a) nor an invalid row."""
  x = -np.ones((30, 4), np.float32)
  x[[7, 21]] = [1.0, 2.0, 0.0, 0.0]
  mask = np.zeros(30, bool)
  mask[[7, 21]] = True
  got = geometry.mean_pairwise_cosine(jnp.asarray(x), jnp.asarray(mask), num_pairs=1000)
  assert float(got) == pytest.approx(1.0, abs=1e-6)
  assert np.isnan(float(geometry.mean_pairwise_cosine(jnp.asarray(x), jnp.asarray(mask == 7))))


def test_geometry_metrics_over_valid_tokens_and_deterministic():
  rng = np.random.default_rng(5)
  last = rng.normal(size=(2, 16, 8)).astype(np.float32)
  target = ((np.abs(rng.normal(size=(2, 16, 1))) + 0.1) * rng.normal(size=(1, 1, 8))).astype(np.float32)
  seg = np.ones((2, 16), np.int32)
  seg[:, 12:] = 0
  hidden = {"last": jnp.asarray(last), "target": jnp.asarray(target)}
  fn = jax.jit(geometry.geometry_metrics)
  m = fn(hidden, jnp.asarray(seg))
  assert set(m) == {"erank_last", "cos_last", "erank_target", "cos_target"}
  valid = seg.reshape(-1) != 0
  np.testing.assert_allclose(float(m["erank_last"]), _np_erank(last.reshape(-1, 8)[valid]), rtol=1e-4)
  np.testing.assert_allclose(float(m["erank_target"]), 1.0, atol=1e-3)
  assert abs(float(m["cos_last"])) < 0.2
  assert float(m["cos_target"]) == pytest.approx(1.0, abs=1e-5)
  again = fn(hidden, jnp.asarray(seg))
  assert all(float(again[k]) == float(m[k]) for k in m)
