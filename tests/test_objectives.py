"""NITP and NTP losses against NumPy, and the gradient facts of the paper (Sec. 3.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import model as model_lib
from nitp_jax import objectives
from tests.helpers import max_abs_diff, packed_batch, small_config


def numpy_nitp(pred, target, seg, shift, kind):
  """The paper's NITP loss (Eq. 3), written independently with loops."""
  b, t, _ = pred.shape
  losses = []
  for r in range(b):
    for i in range(t):
      j = i + shift
      if j >= t or seg[r, i] == 0 or seg[r, j] != seg[r, i]:
        continue
      p, z = pred[r, i].astype(np.float64), target[r, j].astype(np.float64)
      if kind == "cosine":
        losses.append(1 - p @ z / (np.linalg.norm(p) * np.linalg.norm(z)))
      elif kind == "mse":
        losses.append(np.mean((p - z) ** 2))
      elif kind == "smooth_l1":
        d = np.abs(p - z)
        losses.append(np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5)))
      elif kind == "kl":
        q = np.exp(z - z.max()); q /= q.sum()
        s = np.exp(p - p.max()); s /= s.sum()
        losses.append(np.sum(q * (np.log(q) - np.log(s))))
  return np.mean(losses)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("kind", ["cosine", "mse", "smooth_l1", "kl"])
def test_nitp_loss_matches_numpy(shift, kind):
  rng = np.random.default_rng(0)
  seg = np.asarray(packed_batch()["segment_ids"])
  pred = rng.normal(size=seg.shape + (8,)).astype(np.float32)
  target = rng.normal(size=seg.shape + (8,)).astype(np.float32) * 1.5
  loss, _ = objectives.nitp_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(seg),
                                 shift, kind)
  np.testing.assert_allclose(float(loss), numpy_nitp(pred, target, seg, shift, kind),
                             rtol=1e-5)
  # Masked positions change nothing: scramble every vector that is not part
  # of a valid (t, t+shift) pair.
  valid = np.asarray(objectives.valid_pairs(jnp.asarray(seg), shift))
  used_as_target = np.zeros_like(valid)
  used_as_target[:, shift:] = valid[:, : seg.shape[1] - shift]
  pred2 = np.where(valid[..., None], pred, 1e3 * rng.normal(size=pred.shape))
  target2 = np.where(used_as_target[..., None], target, -1e3 * rng.normal(size=pred.shape))
  loss2, _ = objectives.nitp_loss(jnp.asarray(pred2, jnp.float32),
                                  jnp.asarray(target2, jnp.float32), jnp.asarray(seg), shift, kind)
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


def test_valid_pairs_respect_documents_and_padding():
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(objectives.valid_pairs(seg, 1),
                                [[True, True, False, True, False, False, False]])
  np.testing.assert_array_equal(objectives.valid_pairs(seg, 0),
                                [[True, True, True, True, True, False, False]])


def test_ntp_loss_matches_numpy():
  rng = np.random.default_rng(1)
  batch = packed_batch()
  tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  logits = rng.normal(size=tokens.shape + (97,)).astype(np.float32)
  ce = []
  for r in range(tokens.shape[0]):
    for i in range(tokens.shape[1] - 1):
      if seg[r, i] and seg[r, i + 1] == seg[r, i]:
        row = logits[r, i].astype(np.float64)
        ce.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[r, i + 1]])
  got = objectives.ntp_loss(jnp.asarray(logits), batch["tokens"], batch["segment_ids"])
  np.testing.assert_allclose(float(got), np.mean(ce), rtol=1e-5)


def test_cosine_regularizer_matches_pairwise_mean():
  rng = np.random.default_rng(2)
  h = rng.normal(size=(2, 6, 5)).astype(np.float32) + 0.5
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  expected = []
  for r in range(2):
    u = h[r][mask[r]]
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    g = u @ u.T
    n = len(u)
    expected.append((g.sum() - np.trace(g)) / (n * (n - 1)))
  got = objectives.mean_pairwise_cosine_per_row(jnp.asarray(h), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-5)


def test_stop_gradient_blocks_the_target_path():
  rng = np.random.default_rng(3)
  seg = packed_batch()["segment_ids"]
  pred = jnp.asarray(rng.normal(size=seg.shape + (8,)), jnp.float32)
  target = jnp.asarray(rng.normal(size=seg.shape + (8,)), jnp.float32)
  for stop, expect_zero in ((True, True), (False, False)):
    g = jax.grad(lambda z: objectives.nitp_loss(pred, z, seg, 1, "cosine", stop)[0])(target)
    assert (float(jnp.max(jnp.abs(g))) == 0.0) == expect_zero


def _split_grads(cfg, params, batch, step=0):
  """Gradients of the total and of each term separately."""
  loss_fn = objectives.make_loss_fn(cfg)
  grad = lambda key: jax.jit(jax.grad(lambda p: loss_fn(p, batch, jnp.int32(step))[1][key]))(params)
  return grad("loss"), grad("ntp"), grad


@pytest.mark.parametrize("moe", [False, True])
def test_projector_gets_gradient_only_from_nitp(moe):
  cfg = small_config(moe=moe)
  params = model_lib.init_params(cfg, jax.random.key(0))
  batch = packed_batch()
  total, ntp, grad = _split_grads(cfg, params, batch)
  nitp = grad("nitp")
  assert max_abs_diff(ntp["projector"], jax.tree.map(jnp.zeros_like, ntp["projector"])) == 0
  assert max_abs_diff(nitp["projector"], jax.tree.map(jnp.zeros_like, nitp["projector"])) > 0
  assert max_abs_diff(total["projector"], nitp["projector"]) < 1e-6


def test_stop_gradient_in_model_equals_detached_target_forward():
  """With stop-gradient, the first k blocks see NITP gradient only via h_t:
  identical to computing z from a detached copy of the parameters."""
  cfg = small_config(target_layer=2)
  params = model_lib.init_params(cfg, jax.random.key(1))
  batch = packed_batch()
  model, projector = model_lib.build(cfg)

  def nitp_detached_target(p):
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    _, hidden, _ = model.apply({"params": p["backbone"]}, *args)
    _, hidden_const, _ = model.apply({"params": jax.lax.stop_gradient(p["backbone"])}, *args)
    pred = projector.apply({"params": p["projector"]}, hidden["last"])
    return objectives.nitp_loss(pred, hidden_const["target"], batch["segment_ids"], 1, "cosine",
                                stop_gradient=False)[0]

  _, _, grad = _split_grads(cfg, params, batch)
  g_sg = grad("nitp")
  g_ref = jax.grad(nitp_detached_target)(params)
  assert max_abs_diff(g_sg, g_ref) < 1e-6
  first_blocks = g_sg["backbone"]["layers_0_2"]
  assert max_abs_diff(first_blocks, jax.tree.map(jnp.zeros_like, first_blocks)) > 0

  cfg_nosg = small_config(target_layer=2, stop_gradient=False)
  _, _, grad_nosg = _split_grads(cfg_nosg, params, batch)
  assert max_abs_diff(grad_nosg("nitp")["backbone"]["layers_0_2"], first_blocks) > 1e-6


@pytest.mark.parametrize("moe", [False, True])
def test_zero_weight_equals_plain_ntp(moe):
  batch = packed_batch()
  cfg0 = small_config(moe=moe, weight=0.0)
  params0 = model_lib.init_params(cfg0, jax.random.key(2))
  assert "projector" not in params0
  model, _ = model_lib.build(cfg0)

  def plain_ntp(p):
    logits, _, aux = model.apply({"params": p["backbone"]}, batch["tokens"],
                                 batch["segment_ids"], batch["positions"])
    e = cfg0.model.moe
    return (objectives.ntp_loss(logits, batch["tokens"], batch["segment_ids"])
            + e.aux_loss_weight * aux["load_balance"] + e.z_loss_weight * aux["router_z"])

  loss_fn = objectives.make_loss_fn(cfg0)
  loss, g = jax.value_and_grad(lambda p: loss_fn(p, batch, jnp.int32(0))[0])(params0)
  ref_loss, ref_g = jax.value_and_grad(plain_ntp)(params0)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  assert max_abs_diff(g, ref_g) < 1e-6

  # λ switched off by the start step behaves as λ = 0 for the backbone.
  cfg_late = small_config(moe=moe, start_step=100)
  params = model_lib.init_params(cfg_late, jax.random.key(2))
  loss_fn_late = objectives.make_loss_fn(cfg_late)
  g_late = jax.grad(lambda p: loss_fn_late(p, batch, jnp.int32(5))[0])(params)
  assert max_abs_diff(g_late["backbone"], ref_g["backbone"]) < 1e-6
  g_on = jax.grad(lambda p: loss_fn_late(p, batch, jnp.int32(100))[0])(params)
  assert max_abs_diff(g_on["backbone"], ref_g["backbone"]) > 1e-6


def test_no_projector_and_cosine_regularizer_variants_train():
  batch = packed_batch()
  for overrides in ({"projector": "none"}, {"variant": "cosine_regularizer"},
                    {"shift": 0, "loss": "kl"}, {"target_layer": 0}, {"target_layer": 4}):
    cfg = small_config(**overrides)
    params = model_lib.init_params(cfg, jax.random.key(3))
    assert ("projector" in params) == model_lib.uses_projector(cfg)
    loss, metrics = objectives.make_loss_fn(cfg)(params, batch, jnp.int32(0))
    assert np.isfinite(float(loss)), overrides
    assert float(loss) != float(metrics["ntp"]), overrides
