"""grouped.dropless against the dense reference: values, gradients, causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import grouped, moe


def _problem(n: int, d: int, f: int, e: int, k: int, seed: int = 0, bias_E=None):
  ks = jax.random.split(jax.random.key(seed), 5)
  x_NxD = jax.random.normal(ks[0], (n, d))
  logits_NxE = jax.random.normal(ks[1], (n, e))
  if bias_E is not None:
    logits_NxE += bias_E
  r = moe.route(logits_NxE, k, False, 1.0)
  w = tuple(0.3 * jax.random.normal(kk, s)
            for kk, s in zip(ks[2:], ((e, d, f), (e, d, f), (e, f, d))))
  return x_NxD, r, w


def _loss(y_NxD):
  return jnp.sum(jnp.sin(y_NxD) * jnp.arange(y_NxD.shape[-1]))


def _ref(r, x_NxD, weights_NxK, *w):
  y_NxD = moe.dispatch_dense(x_NxD, r._replace(weights_NxK=weights_NxK), w, w[0].shape[0])[0]
  return _loss(y_NxD), y_NxD


def _mine(block_group, experts_NxK, x_NxD, weights_NxK, *w):
  block, group = block_group
  y_NxD = grouped.dropless(x_NxD, experts_NxK, weights_NxK, *w, block=block, group=group)
  return _loss(y_NxD), y_NxD


# Jitted once per shape (cases share them): compiles dominate the test time.
_REF = jax.jit(jax.value_and_grad(_ref, range(1, 6), has_aux=True))
_MINE = jax.jit(jax.value_and_grad(_mine, range(2, 7), has_aux=True), static_argnums=0)
_E = 6
# (tokens, top_k, (block, blocks per loop step), expert-logit bias); d=8, f=4,
# 6 experts. Steps of 3 blocks hold blocks of several experts (and of one
# expert twice); None = the defaults.
CASES = {
    "uneven": (37, 2, (4, 3), None),
    "empty_experts": (37, 2, (4, 3), jnp.array([0, 9, 9, 0, 9, 0.0])),
    "top1": (37, 1, (4, 3), None),
    "all_to_one_expert": (37, 1, (4, 3), jnp.array([0, 0, 50.0, 0, 0, 0])),
    "one_block_per_step": (37, 2, (4, 1), None),
    "default_block_over_groups": (13, 3, (None, None), None),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_dense_values_and_grads(case):
  n, k, block, bias_E = CASES[case]
  x_NxD, r, w = _problem(n, 8, 4, _E, k, bias_E=bias_E)
  args = (x_NxD, r.weights_NxK, *w)
  (_, y_ref), grads_ref = _REF(r, *args)
  (_, y), grads = _MINE(block, r.experts_NxK, *args)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for name, a, b in zip(("x", "routing weights", "gate", "up", "down"), grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
  if case == "all_to_one_expert":
    assert np.all(np.asarray(r.experts_NxK) == 2)


def test_layout_blocks_hold_one_expert():
  experts_NxK = jnp.array([[2, 0], [2, 1], [0, 2], [2, 0], [2, 1]])
  lay = grouped.layout(experts_NxK, 4, 2)
  m = experts_NxK.size
  assert int(lay.used_blocks) == 2 + 1 + 3  # expert 0: 3 copies, 1: 2, 2: 5
  flat = np.asarray(experts_NxK).reshape(-1)
  copy_R = np.asarray(lay.copy_R)
  for row, copy in enumerate(copy_R):
    if copy < m:
      assert flat[copy] == lay.expert_B[row // 2]
      assert lay.row_M[copy] == row
  assert sorted(copy_R[copy_R < m]) == list(range(m))


def test_causal_and_bitwise_stable():
  """Tokens after c change (values and routing): outputs before c are
  bitwise unchanged, which no capacity-based dispatch guarantees."""
  n, d, f, e, k, c = 64, 16, 8, 4, 2, 23
  x_NxD, r, w = _problem(n, d, f, e, k)
  x2_NxD, r2, _ = _problem(n, d, f, e, k, seed=1)
  x2_NxD = x_NxD.at[c:].set(x2_NxD[c:])
  experts2_NxK = r.experts_NxK.at[c:].set(r2.experts_NxK[c:])
  weights2_NxK = r.weights_NxK.at[c:].set(r2.weights_NxK[c:])
  fn = jax.jit(lambda *a: grouped.dropless(*a, block=8))
  y = fn(x_NxD, r.experts_NxK, r.weights_NxK, *w)
  y2 = fn(x2_NxD, experts2_NxK, weights2_NxK, *w)
  assert np.array_equal(np.asarray(y[:c]), np.asarray(y2[:c]))
  assert not np.array_equal(np.asarray(y[c:]), np.asarray(y2[c:]))


def test_copies_of_experts_elsewhere_add_nothing():
  """Expert ids >= E (experts on another shard) are skipped: the output is
  the dense reference with those copies' weights zeroed."""
  n, d, f, e, k = 29, 8, 4, _E, 2
  x_NxD, r, w = _problem(n, d, f, e, k)
  elsewhere_NxK = (jnp.arange(n * k).reshape(n, k) % 3) == 0
  experts_NxK = jnp.where(elsewhere_NxK, e, r.experts_NxK)
  y = jax.jit(lambda *a: grouped.dropless(*a, block=4))(x_NxD, experts_NxK, r.weights_NxK, *w)
  ref = moe.dispatch_dense(x_NxD, r._replace(weights_NxK=jnp.where(elsewhere_NxK, 0.0,
                                                                   r.weights_NxK)), w, e)[0]
  np.testing.assert_allclose(y, ref, atol=1e-5)
