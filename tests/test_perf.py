"""Fast paths and MFU accounting: chunked cross-entropy, attention kernel
choice, the peak table and the MFU arithmetic. Nothing here is timed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import attention
from nitp_jax import config as config_lib
from nitp_jax import flops
from nitp_jax import model as model_lib
from nitp_jax import objectives
from nitp_jax.metrics_log import Throughput, console_line
from tests.helpers import max_abs_diff, packed_batch, small_config


@pytest.mark.parametrize("chunk", [4, 5, 16])
def test_chunked_ce_equals_full_ce(chunk):
  b, t, d, v = 2, 16, 8, 37
  k1, k2 = jax.random.split(jax.random.key(0))
  x_BxTxD = jax.random.normal(k1, (b, t, d))
  w_DxV = jax.random.normal(k2, (d, v))
  batch = packed_batch(b, t, v)
  tokens, seg = batch["tokens"], batch["segment_ids"]

  def full(x, w):
    return objectives.ntp_loss(model_lib.unembed(x, w, jnp.float32), tokens, seg)

  def chunked(x, w):
    return objectives.chunked_ntp_loss(x, w, tokens, seg, chunk)

  (l_full, g_full) = jax.value_and_grad(full, argnums=(0, 1))(x_BxTxD, w_DxV)
  (l_chunk, g_chunk) = jax.value_and_grad(chunked, argnums=(0, 1))(x_BxTxD, w_DxV)
  np.testing.assert_allclose(l_chunk, l_full, rtol=1e-6)
  assert max_abs_diff(g_chunk, g_full) < 1e-5


def test_loss_fn_with_ce_chunk_matches_full_logits():
  def config(chunk):
    c = small_config()
    c.model.tie_embeddings, c.model.num_layers, c.model.ce_chunk = False, 2, chunk
    return c

  cfg, chunked = config(0), config(6)
  params = model_lib.init_params(cfg, jax.random.key(1))
  batch, step = packed_batch(), jnp.int32(0)
  grad = lambda c: jax.jit(jax.value_and_grad(objectives.make_loss_fn(c), has_aux=True))
  (loss, m), g = grad(cfg)(params, batch, step)
  (loss_c, m_c), g_c = grad(chunked)(params, batch, step)
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  np.testing.assert_allclose(m_c["ntp"], m["ntp"], rtol=1e-6)
  assert max_abs_diff(g_c, g) < 1e-5


def test_unembed_matrix_follows_tying():
  embed, unembed = jnp.arange(6.0).reshape(3, 2), jnp.ones((2, 3))
  tied = model_lib.unembed_matrix({"embed": embed}, True)
  assert (tied == embed.T).all()
  assert model_lib.unembed_matrix({"embed": embed, "unembed": unembed}, False) is unembed


def test_causal_flag_plus_document_mask_equals_full_mask():
  """The cudnn path's masking (is_causal + same-document mask), run by XLA."""
  b, t, n, kv, h = 2, 16, 4, 2, 8
  q, k, v = (jax.random.normal(key, (b, t, heads, h)) for key, heads in
             zip(jax.random.split(jax.random.key(2), 3), (n, kv, kv)))
  seg = packed_batch(b, t)["segment_ids"]
  full = attention.attend(q, k, v, seg, "xla")
  split = jax.nn.dot_product_attention(q, k, v, mask=attention.same_document_mask(seg),
                                       is_causal=True, implementation="xla")
  np.testing.assert_allclose(split, full, atol=1e-6)


def test_attention_kernel_choice_on_cpu():
  assert attention.resolve_impl("auto", jnp.bfloat16, 64) == "xla"
  assert attention.resolve_impl("xla", jnp.float32, 64) == "xla"
  with pytest.raises(config_lib.ConfigError, match="needs a GPU"):
    attention.resolve_impl("cudnn", jnp.bfloat16, 64)


@pytest.mark.parametrize("field,value,message", [
    ("model.compute_dtype", "float32", "needs model.compute_dtype bfloat16"),
    ("model.head_dim", 36, "multiple of 8"),
])
def test_cudnn_rejects_unsupported_settings(field, value, message):
  cfg = config_lib.base_config()
  cfg.model.attention_impl, cfg.model.compute_dtype = "cudnn", "bfloat16"
  section, name = field.split(".")
  cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg)


@pytest.mark.parametrize("field,value", [("model.ce_chunk", -1),
                                         ("train.peak_flops_per_device", -1.0)])
def test_new_fields_are_validated(field, value):
  cfg = config_lib.base_config()
  section, name = field.split(".")
  cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=field):
    config_lib.validate(cfg)


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("TPU v4 lite", None), ("cpu", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table_lookup(kind, peak):
  assert flops.peak_flops_for_kind(kind) == peak


def test_peak_override_and_cpu_fallback(monkeypatch):
  assert flops.peak_flops_per_device(3e12) == 3e12
  monkeypatch.setattr(flops, "measured_matmul_peak", lambda *a, **k: 8e11)
  expected = 8e11 / jax.local_device_count()
  assert flops.peak_flops_per_device() == pytest.approx(expected)


def test_mfu_arithmetic():
  # 1e9 FLOPs/token at 1,000 tokens/s = 1e12 FLOP/s over 2 chips of 1e13.
  assert flops.mfu(1e9, 1000.0, 1e13, 2) == pytest.approx(0.05)
  tp = Throughput(1000, 10, flops_per_token=1e9, peak_flops_per_device=1e13,
                  num_devices=2)
  assert tp.utilisation(1000.0) == pytest.approx({"model_tflops": 0.5, "mfu": 0.05})
  assert Throughput(1000, 10).utilisation(1000.0) == {}


def test_throughput_leaves_out_evals_and_saves():
  # 10 steps take 1 s each; an eval and a save after step 20 take 30 s.
  now = iter([0.0, 10.0, 40.0, 50.0])
  tp = Throughput(1000, 100, clock=lambda: next(now))
  assert tp.update(10) == {}  # the first report only starts the clock
  assert tp.update(20)["step_s"] == pytest.approx(1.0)
  tp.restart(20)  # after the eval and the save of step 20
  after = tp.update(30)
  assert after["step_s"] == pytest.approx(1.0)
  assert after["tokens_per_s"] == pytest.approx(1000.0)
  assert after["eta_s"] == pytest.approx(70.0)


def test_console_line_shows_mfu():
  m = {"loss": 2.0, "ntp": 1.9, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
       "eta_s": 60.0, "model_tflops": 0.5, "mfu": 0.05}
  line = console_line(3, 10, m)
  assert "MFU 5.0%" in line and "0.5 TFLOP/s/dev" in line


def test_training_flops_include_nitp_extra():
  ntp, nitp = small_config(weight=0.0), small_config()
  extra = flops.training_flops_per_token(nitp) - flops.training_flops_per_token(ntp)
  assert extra == pytest.approx(flops.nitp_extra_flops_per_token(nitp))
  assert extra == pytest.approx(72 * 32 ** 2 + 18 * 32)
