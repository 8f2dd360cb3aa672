"""The transformer: causality, document isolation, MoE dispatch agreement,
and scan / remat / split-at-k equivalence with an unrolled stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import model as model_lib
from nitp_jax import moe
from nitp_jax.model_config import MoEConfig
from tests.helpers import max_abs_diff, packed_batch, small_config


def _forward(cfg, params, batch):
  model, _ = model_lib.build(cfg)
  return jax.jit(model.apply)({"params": params["backbone"]}, batch["tokens"],
                              batch["segment_ids"], batch["positions"])


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def setup(request):
  cfg = small_config(moe=request.param)
  cfg.model.moe.dispatch = "dense"  # no capacity drops to couple tokens
  return cfg, model_lib.init_params(cfg, jax.random.key(0))


def test_causal_logits_ignore_future_tokens(setup):
  cfg, params = setup
  batch = packed_batch(b=1)
  batch["segment_ids"] = jnp.ones_like(batch["segment_ids"])
  batch["positions"] = jnp.arange(16)[None]
  logits, hidden, _ = _forward(cfg, params, batch)
  t = 9
  changed = dict(batch, tokens=batch["tokens"].at[:, t + 1:].set(3))
  logits2, hidden2, _ = _forward(cfg, params, changed)
  np.testing.assert_allclose(logits2[:, : t + 1], logits[:, : t + 1], atol=1e-5)
  np.testing.assert_allclose(hidden2["target"][:, : t + 1], hidden["target"][:, : t + 1], atol=1e-5)
  assert float(jnp.max(jnp.abs(logits2[:, t + 1:] - logits[:, t + 1:]))) > 1e-3


def test_packed_documents_are_isolated(setup):
  """Doc 2's logits do not depend on doc 1, and equal doc 2 run alone."""
  cfg, params = setup
  batch = packed_batch(b=1)
  seg = np.asarray(batch["segment_ids"][0])
  doc2 = np.where(seg == 2)[0]
  logits, _, _ = _forward(cfg, params, batch)
  changed = dict(batch, tokens=batch["tokens"].at[:, : doc2[0]].set(5))
  logits2, _, _ = _forward(cfg, params, changed)
  np.testing.assert_allclose(logits2[0, doc2], logits[0, doc2], atol=1e-5)
  alone = {"tokens": batch["tokens"][:, doc2], "segment_ids": jnp.ones((1, len(doc2)), jnp.int32),
           "positions": jnp.arange(len(doc2))[None]}
  logits_alone, _, _ = _forward(cfg, params, alone)
  np.testing.assert_allclose(logits_alone[0], logits[0, doc2], atol=1e-4)


def test_hidden_states_are_the_nitp_tensors(setup):
  cfg, params = setup
  batch = packed_batch()
  logits, hidden, _ = _forward(cfg, params, batch)
  assert hidden["target"].shape == hidden["last"].shape == (2, 16, cfg.model.d_model)
  # "last" is what the unembedding reads: logits = last @ unembed.
  backbone = params["backbone"]
  unembed = backbone["embed"].T if cfg.model.tie_embeddings else backbone["unembed"]
  np.testing.assert_allclose(hidden["last"] @ unembed, logits, atol=1e-4)
  k0 = cfg.copy_and_resolve_references()
  k0.nitp.target_layer = 0
  _, hidden0, _ = _forward(k0, {"backbone": model_lib.arrange_layers(backbone, k0)}, batch)
  np.testing.assert_allclose(hidden0["target"], backbone["embed"][batch["tokens"]], atol=1e-6)


def test_last_hidden_before_norm_option(setup):
  cfg, params = setup
  pre = cfg.copy_and_resolve_references()
  pre.nitp.hidden_source = "before_norm"
  batch = packed_batch()
  _, h_after, _ = _forward(cfg, params, batch)
  _, h_before, _ = _forward(pre, params, batch)
  x = h_before["last"]
  normed = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.model.norm_eps)
  np.testing.assert_allclose(normed * params["backbone"]["final_norm"]["scale"], h_after["last"],
                             atol=1e-5)


@pytest.mark.parametrize("layout", ["unrolled", "remat_full", "remat_dots", "split_at_3"])
def test_layouts_match_unrolled_stack(setup, layout):
  cfg, params = setup
  batch = packed_batch()
  ref_logits, ref_hidden, _ = _forward(cfg, params, batch)
  other = cfg.copy_and_resolve_references()
  if layout == "unrolled":
    other.model.scan_layers = False
  elif layout.startswith("remat"):
    other.model.remat_policy = layout.split("_")[1]
  else:
    other.nitp.target_layer = 3
  backbone = model_lib.arrange_layers(params["backbone"], other)
  logits, hidden, _ = _forward(other, {"backbone": backbone}, batch)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  np.testing.assert_allclose(hidden["last"], ref_hidden["last"], atol=1e-5)
  if layout != "split_at_3":
    np.testing.assert_allclose(hidden["target"], ref_hidden["target"], atol=1e-5)


def test_layer_params_roundtrip(setup):
  cfg, params = setup
  layers = model_lib.layer_params(params["backbone"])
  assert sorted(layers) == list(range(cfg.model.num_layers))
  again = model_lib.arrange_layers(params["backbone"], cfg)
  assert max_abs_diff(again, params["backbone"]) == 0


# ---- MoE -------------------------------------------------------------------

def _moe_layer(dispatch, capacity_factor=100.0, renormalize=False, shared=1):
  cfg = MoEConfig(num_experts=8, top_k=3, expert_ffn=16, num_shared_experts=shared,
                  shared_expert_ffn=16, renormalize=renormalize, routed_scaling=1.0,
                  dispatch=dispatch, capacity_factor=capacity_factor)
  return moe.MoE(cfg, std=0.3)


def test_moe_dispatches_agree():
  x = jax.random.normal(jax.random.key(1), (2, 12, 32))
  import flax.linen as nn
  params = nn.unbox(_moe_layer("dense").init(jax.random.key(2), x))
  outs, grads = {}, {}
  for dispatch in ("dense", "dropless", "capacity", "gather", "ragged"):
    layer = _moe_layer(dispatch)
    f = lambda p, xx: jnp.sum(jnp.sin(layer.apply(p, xx)[0]))
    outs[dispatch], aux = jax.jit(lambda p: layer.apply(p, x))(params)
    assert float(aux["dropped_fraction"]) == 0.0
    grads[dispatch] = jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)
  for dispatch in ("dropless", "capacity", "gather", "ragged"):
    np.testing.assert_allclose(outs[dispatch], outs["dense"], atol=1e-5)
    assert max_abs_diff(grads[dispatch], grads["dense"]) < 1e-4


def test_capacity_drops_are_counted_and_gather_drops_the_same():
  x = jax.random.normal(jax.random.key(1), (2, 12, 32))
  import flax.linen as nn
  params = nn.unbox(_moe_layer("capacity").init(jax.random.key(2), x))
  outs, grads, dropped = {}, {}, {}
  for dispatch in ("capacity", "gather"):
    layer = _moe_layer(dispatch, capacity_factor=0.25)
    f = lambda p, xx: jnp.sum(jnp.sin(layer.apply(p, xx)[0]))
    outs[dispatch], aux = jax.jit(lambda p: layer.apply(p, x))(params)
    dropped[dispatch] = float(aux["dropped_fraction"])
    grads[dispatch] = jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)
  c = moe.capacity(12, 3, 8, 0.25)
  assert 0.0 < dropped["capacity"] <= 1.0 - 8 * c / (12 * 3) + 1e-6
  assert dropped["gather"] == dropped["capacity"]
  np.testing.assert_allclose(outs["gather"], outs["capacity"], atol=1e-5)
  assert max_abs_diff(grads["gather"], grads["capacity"]) < 1e-4


def test_renormalised_topk_weights_sum_to_one():
  logits = jax.random.normal(jax.random.key(3), (50, 8))
  r = moe.route(logits, 3, renormalize=True, routed_scaling=1.0)
  np.testing.assert_allclose(jnp.sum(r.weights_NxK, -1), 1.0, atol=1e-6)
  r_raw = moe.route(logits, 3, renormalize=False, routed_scaling=2.0)
  assert float(jnp.max(jnp.sum(r_raw.weights_NxK, -1))) < 2.0
  np.testing.assert_allclose(r_raw.weights_NxK, 2.0 * jnp.sort(jax.nn.softmax(logits), -1)[:, ::-1][:, :3],
                             atol=1e-6)


def test_shared_expert_acts_on_every_token():
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), (2, 12, 32))
  layer = _moe_layer("capacity")
  params = nn.unbox(layer.init(jax.random.key(2), x))
  # Silence the routed experts: what is left is the shared expert alone.
  silent = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if len(path) == 1 and path[0].key == "down" else a,
      params["params"])
  y, _ = layer.apply({"params": silent}, x)
  shared = nn.unbox(params)["params"]["shared"]
  from nitp_jax.layers import SwiGLU
  ref = SwiGLU(16, 0.3).apply({"params": shared}, x)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert float(jnp.min(jnp.linalg.norm(y, axis=-1))) > 0


def test_load_balance_loss_is_one_when_uniform():
  e = 4
  logits = jnp.zeros((8, e))
  experts = jnp.tile(jnp.arange(e), 2)[:, None]
  r = moe.Routing(experts, jnp.ones((8, 1)), jax.nn.softmax(logits), logits)
  np.testing.assert_allclose(moe.load_balance_loss(r, e), 1.0, rtol=1e-6)


def test_init_does_not_depend_on_target_layer_or_scanning():
  base = small_config()
  ref = model_lib.layer_params(model_lib.init_params(base, jax.random.key(5))["backbone"])
  for k, scan in ((0, True), (3, True), (2, False)):
    other = small_config(target_layer=k)
    other.model.scan_layers = scan
    params = model_lib.init_params(other, jax.random.key(5))
    assert max_abs_diff(model_lib.layer_params(params["backbone"]), ref) == 0.0
