"""Representation geometry of hidden states (paper Fig. 1, App. D).

effective rank (Roy & Vetterli 2007): mean-centre the valid vectors, take
the eigenvalues λ_i of their covariance, p_i = λ_i / Σλ,
erank = exp(-Σ p_i log p_i). It lies in [1, D] for any spread-out set and is
0 when the vectors do not spread at all (one vector, or all equal).

mean pairwise cosine: L2-normalise the valid vectors and average the cosine
over random pairs (i, j), i != j, drawn across the whole batch; NaN when
fewer than 2 vectors are valid.

All functions are pure, jit-able and compute in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
GEOMETRY_SEED = 0
NO_SPREAD = 1e-10   # relative variance below float32 centring noise


def _valid_mask(n: int, mask_N: jax.Array | None) -> jax.Array:
  if mask_N is None:
    return jnp.ones((n,), bool)
  return mask_N.astype(bool)


def covariance(h_NxD: jax.Array, mask_N: jax.Array | None = None) -> jax.Array:
  """[D, D] covariance of the valid, centred rows (divided by their count)."""
  x_NxD = h_NxD.astype(jnp.float32)
  m_N = _valid_mask(x_NxD.shape[0], mask_N).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(m_N), 1.0)
  mean_D = jnp.einsum("n,nd->d", m_N, x_NxD, precision=HIGHEST) / count
  xc_NxD = (x_NxD - mean_D) * m_N[:, None]
  return jnp.einsum("nd,ne->de", xc_NxD, xc_NxD, precision=HIGHEST) / count


def mean_sq_norm(h_NxD: jax.Array, mask_N: jax.Array | None = None) -> jax.Array:
  """Mean squared L2 norm of the valid rows (before centring)."""
  x_NxD = h_NxD.astype(jnp.float32)
  m_N = _valid_mask(x_NxD.shape[0], mask_N).astype(jnp.float32)
  total = jnp.einsum("n,nd,nd->", m_N, x_NxD, x_NxD, precision=HIGHEST)
  return total / jnp.maximum(jnp.sum(m_N), 1.0)


def entropy_rank(eigvals_D: jax.Array) -> jax.Array:
  """exp(Shannon entropy) of the normalised non-negative spectrum (0 if all 0)."""
  lam_D = jnp.maximum(eigvals_D.astype(jnp.float32), 0.0)
  total = jnp.sum(lam_D)
  p_D = lam_D / jnp.where(total > 0, total, 1.0)
  plogp_D = jnp.where(p_D > 0, p_D * jnp.log(jnp.where(p_D > 0, p_D, 1.0)), 0.0)
  return jnp.where(total > 0, jnp.exp(-jnp.sum(plogp_D)), 0.0)


def effective_rank(h_NxD: jax.Array, mask_N: jax.Array | None = None) -> jax.Array:
  """Effective rank of the valid rows of h_NxD (scalar float32); 0 when their
  total variance is float32 rounding noise (at most NO_SPREAD of their mean
  squared norm), i.e. the rows are all the same vector."""
  cov_DxD = covariance(h_NxD, mask_N)
  erank = entropy_rank(jnp.linalg.eigvalsh(cov_DxD))
  spread = jnp.trace(cov_DxD) > NO_SPREAD * mean_sq_norm(h_NxD, mask_N)
  return jnp.where(spread, erank, 0.0)


def _sample_pairs(valid_N: jax.Array, num_pairs: int, rng: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Row indices (i_P, j_P) of valid rows with i != j, and the valid count."""
  n_valid = jnp.sum(valid_N.astype(jnp.int32))
  order_N = jnp.argsort(~valid_N, stable=True)  # valid rows first
  rng_a, rng_b = jax.random.split(rng)
  a_P = jax.random.randint(rng_a, (num_pairs,), 0, jnp.maximum(n_valid, 1))
  b_P = jax.random.randint(rng_b, (num_pairs,), 0, jnp.maximum(n_valid - 1, 1))
  b_P = b_P + (b_P >= a_P)  # skip a: uniform over the other valid rows
  return order_N[a_P], order_N[jnp.minimum(b_P, valid_N.shape[0] - 1)], n_valid


def _unit(x_NxD: jax.Array) -> jax.Array:
  x_NxD = x_NxD.astype(jnp.float32)
  norm_Nx1 = jnp.sqrt(jnp.sum(x_NxD * x_NxD, axis=-1, keepdims=True))
  return x_NxD / jnp.maximum(norm_Nx1, 1e-12)


def mean_pairwise_cosine(h_NxD: jax.Array, mask_N: jax.Array | None = None,
                         num_pairs: int = 4096, rng: jax.Array | None = None
                         ) -> jax.Array:
  """Average cosine of `num_pairs` random pairs of distinct valid rows
  (sampled with replacement; num_pairs must be static under jit)."""
  if rng is None:
    rng = jax.random.key(GEOMETRY_SEED)
  i_P, j_P, n_valid = _sample_pairs(_valid_mask(h_NxD.shape[0], mask_N), num_pairs, rng)
  a_PxD, b_PxD = _unit(h_NxD[i_P]), _unit(h_NxD[j_P])
  cos_P = jnp.sum(a_PxD * b_PxD, axis=-1)
  return jnp.where(n_valid >= 2, jnp.mean(cos_P), jnp.nan)


def geometry_metrics(hidden: dict[str, jax.Array], segment_ids_BxT: jax.Array,
                     num_pairs: int = 4096) -> dict[str, jax.Array]:
  """erank / cosine of the "last" and "target" states [B, T, D] over the
  non-padding tokens (segment id != 0); deterministic (fixed pair seed)."""
  mask_N = (segment_ids_BxT != 0).reshape(-1)
  rng = jax.random.key(GEOMETRY_SEED)
  out = {}
  for name in ("last", "target"):
    h_BxTxD = hidden[name]
    h_NxD = h_BxTxD.reshape(-1, h_BxTxD.shape[-1])
    out[f"erank_{name}"] = effective_rank(h_NxD, mask_N)
    out[f"cos_{name}"] = mean_pairwise_cosine(h_NxD, mask_N, num_pairs, rng)
  return out
