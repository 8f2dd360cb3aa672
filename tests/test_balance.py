"""Expert balancing: the sequence-wise balance loss, auxiliary-loss-free
router biases (choice only, no gradient, the update rule), their place in
the train state and checkpoints, and the per-layer load metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import model as model_lib
from nitp_jax import moe
from nitp_jax import objectives
from nitp_jax import optim
from nitp_jax import step as step_lib
from nitp_jax.errors import CheckpointError
from tests.helpers import packed_batch, small_config


def _numpy_sequence_loss(experts_BxTxK: np.ndarray, probs_BxTxE: np.ndarray) -> float:
  """DeepSeek-V3 Eq. 17-20, one loop per sequence."""
  b, t, k = experts_BxTxK.shape
  e = probs_BxTxE.shape[-1]
  losses = []
  for s in range(b):
    f = np.array([(experts_BxTxK[s] == i).sum() for i in range(e)]) * e / (k * t)
    p = (probs_BxTxE[s] / probs_BxTxE[s].sum(-1, keepdims=True)).mean(0)
    losses.append(float(np.sum(f * p)))
  return float(np.mean(losses))


def test_sequence_loss_matches_numpy_and_differs_from_batch():
  b, t, e, k = 3, 10, 8, 2
  logits = 2.0 * jax.random.normal(jax.random.key(0), (b * t, e))
  r = moe.route(logits, k, renormalize=False, routed_scaling=1.0)
  ref = _numpy_sequence_loss(np.asarray(r.experts_NxK).reshape(b, t, k),
                             np.asarray(r.probs_NxE).reshape(b, t, e))
  np.testing.assert_allclose(moe.sequence_balance_loss(r, e, b), ref, rtol=1e-6)
  assert abs(float(moe.load_balance_loss(r, e)) - ref) > 1e-3


def test_sequence_loss_is_one_when_uniform_and_scaled_by_alpha():
  b, t, e = 2, 8, 4
  experts = jnp.tile(jnp.arange(e), b * t // e)[:, None]
  logits = jnp.zeros((b * t, e))
  r = moe.Routing(experts, jnp.ones((b * t, 1)), jax.nn.softmax(logits), logits)
  np.testing.assert_allclose(moe.sequence_balance_loss(r, e, b), 1.0, rtol=1e-6)
  # In a model: a router with zero weights gives uniform probabilities; the
  # aux loss is then alpha * 1 per layer (z-loss off) whatever the choice.
  cfg = small_config(moe=True)
  cfg.model.moe.balance_loss, cfg.model.moe.z_loss_weight = "sequence", 0.0
  cfg.model.moe.aux_loss_weight = 0.03
  params = model_lib.init_params(cfg, jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.zeros_like(a) if p[-1].key == "router" else a, params)
  _, m = objectives.make_loss_fn(cfg)(params, packed_batch(), jnp.int32(0))
  # ties in top-k pick experts 0 and 1 for every token: f = (4, 4, 0, ...),
  # P = 1/8, so the loss is still sum f_i P_i = 1.
  np.testing.assert_allclose(m["aux"], 0.03, rtol=1e-5)


def test_none_means_no_balance_loss_in_the_total():
  cfg = small_config(moe=True)
  cfg.model.moe.balance_loss = "none"
  params = model_lib.init_params(cfg, jax.random.key(0))
  _, m = objectives.make_loss_fn(cfg)(params, packed_batch(), jnp.int32(0))
  assert float(m["load_balance"]) > 0  # still logged
  np.testing.assert_allclose(m["aux"], cfg.model.moe.z_loss_weight * m["router_z"], rtol=1e-6)


def test_bias_chooses_experts_but_not_combine_weights():
  logits = jax.random.normal(jax.random.key(3), (50, 8))
  probs = jax.nn.softmax(logits)
  bias = jnp.zeros(8).at[5].set(10.0)
  for renormalize in (False, True):
    r = moe.route(logits, 2, renormalize, 1.0, bias)
    assert bool(jnp.all(jnp.any(r.experts_NxK == 5, axis=-1)))  # the bias decides the choice
    w = jnp.take_along_axis(probs, r.experts_NxK, axis=-1)       # the weights stay unbiased
    if renormalize:
      w = w / jnp.sum(w, -1, keepdims=True)
    np.testing.assert_allclose(r.weights_NxK, w, rtol=1e-6)
  # A zero bias routes exactly as no bias.
  a, b = moe.route(logits, 2, False, 1.0), moe.route(logits, 2, False, 1.0, jnp.zeros(8))
  assert bool(jnp.all(a.experts_NxK == b.experts_NxK))
  np.testing.assert_array_equal(a.weights_NxK, b.weights_NxK)


def _bias_config(scan: bool = True, rate: float = 1e-2):
  cfg = small_config(moe=True)
  cfg.model.moe.bias_update_rate, cfg.model.scan_layers = rate, scan
  cfg.nitp.target_layer = 2  # MoE layers in two segments: layers_1_2, layers_2_4
  return cfg


def test_no_gradient_reaches_the_bias():
  cfg = _bias_config()
  params = model_lib.init_params(cfg, jax.random.key(0))
  # a nonzero bias, so the choice differs from the plain top-k
  params["backbone"] = model_lib.with_router_biases(params["backbone"], {
      n: 0.05 * jax.random.normal(jax.random.key(i), b.shape)
      for i, (n, b) in enumerate(model_lib.router_biases(params["backbone"]))})
  loss_fn = objectives.make_loss_fn(cfg)
  grads = jax.grad(lambda p: loss_fn(p, packed_batch(), jnp.int32(0))[0])(params)
  biases = model_lib.router_biases(grads["backbone"])
  assert [n for n, _ in biases] == ["layers_1_2", "layers_2_4"]
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for _, g in biases)
  router_grads = [float(jnp.max(jnp.abs(g["moe"]["router"])))
                  for n, g in grads["backbone"].items() if n in ("layers_1_2", "layers_2_4")]
  assert min(router_grads) > 0


def test_update_rule_balances_a_skewed_router():
  n, e, k, rate = 512, 8, 2, 2e-3
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (n, 16))
  w = 0.3 * jax.random.normal(key_w, (16, e))
  logits = x @ w + jnp.linspace(1.5, -1.5, e)  # expert 0 favoured, 7 shunned
  backbone = {"layer_1": {"moe": {"router_bias": jnp.zeros(e)}}}

  def ratio(bias):
    load = moe.expert_load(moe.route(logits, k, False, 1.0, bias), e)
    return float(jnp.max(load) / jnp.mean(load)), load

  start, _ = ratio(None)
  for _ in range(400):
    _, load = ratio(backbone["layer_1"]["moe"]["router_bias"])
    backbone = model_lib.with_router_biases(
        backbone, step_lib.router_bias_update(backbone, load[None], rate))
  end, _ = ratio(backbone["layer_1"]["moe"]["router_bias"])
  assert start > 2.0 and end < 1.2, (start, end)
  bias = backbone["layer_1"]["moe"]["router_bias"]
  assert float(bias[0]) < 0 < float(bias[-1])  # the favoured expert is held back


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_train_step_updates_bias_outside_the_optimizer(scan):
  cfg = _bias_config(scan, rate=1e-2)
  opt = optim.make_optimizer(cfg.train)
  state = step_lib.init_state(cfg, opt, jax.random.key(0))
  before = [b for _, b in model_lib.router_biases(state["params"]["backbone"])]
  state, m = jax.jit(step_lib.make_train_step(cfg, opt))(state, packed_batch())
  after = [b for _, b in model_lib.router_biases(state["params"]["backbone"])]
  assert model_lib.LOAD_KEY not in m
  ratios = [float(m[f"moe_load_max_over_mean_l{i}"]) for i in (1, 2, 3)]
  assert all(1.0 <= r <= 8.0 for r in ratios)
  assert float(m["moe_load_max_over_mean"]) == max(ratios)
  # every entry moved by exactly +-rate (or 0 at the mean), starting from 0
  steps = np.concatenate([np.asarray(a - b).reshape(-1) for a, b in zip(after, before)])
  assert set(np.round(np.abs(steps) / 1e-2, 6)) <= {0.0, 1.0} and np.any(steps)


def test_plain_router_has_no_bias_and_logs_loads():
  cfg = small_config(moe=True)
  opt = optim.make_optimizer(cfg.train)
  state = step_lib.init_state(cfg, opt, jax.random.key(0))
  assert model_lib.router_biases(state["params"]["backbone"]) == []
  _, m = jax.jit(step_lib.make_train_step(cfg, opt))(state, packed_batch())
  assert {f"moe_load_max_over_mean_l{i}" for i in (1, 2, 3)} <= set(m)
  assert "moe_load_max_over_mean_l0" not in m  # layer 0 is dense


def test_resume_with_another_bias_setting_names_the_field():
  saved, current = small_config(moe=True), small_config(moe=True)
  current.model.moe.bias_update_rate = 1e-3
  with pytest.raises(CheckpointError, match=r"model.moe.bias_update_rate: 0.0 -> 0.001.*"
                     r"restores only under the same bias_update_rate"):
    ckpt_lib.check_resumable(saved, current, "/ckpt")
  # configs saved before these fields existed mean batch loss, no bias
  old = small_config(moe=True)
  del old.model.moe["balance_loss"], old.model.moe["bias_update_rate"]
  ckpt_lib.check_resumable(old, small_config(moe=True), "/ckpt")
  with pytest.raises(CheckpointError, match="bias_update_rate: 0.0 -> 0.001"):
    ckpt_lib.check_resumable(old, current, "/ckpt")


def test_bias_is_replicated_on_every_mesh_axis():
  _, logical = model_lib.abstract_params(_bias_config())
  specs = [sub["moe"]["router_bias"] for sub in logical["backbone"].values()
           if isinstance(sub, dict) and "moe" in sub]
  assert specs and all(tuple(s) == ("layers", None) for s in specs)
  from nitp_jax import sharding
  assert all(a is None for a in sharding.logical_to_mesh("layers", None))
