"""Small building blocks: parameter helpers, RMSNorm, SwiGLU, RoPE."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# model.remat_policy -> what jax.checkpoint saves ("none": no remat at all).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def dtype(name: str) -> jnp.dtype:
  return DTYPES[name]


def param(module: nn.Module, name: str, shape: Sequence[int],
          axes: Sequence[str | None], std: float | None, param_dtype) -> jax.Array:
  """A parameter annotated with logical axis names (ones when std is None)."""
  init = nn.initializers.ones if std is None else nn.initializers.normal(std)
  if std == 0.0:
    init = nn.initializers.zeros
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)),
                      tuple(shape), param_dtype)


def flat_matmul(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """Contract the last `contract` dims of x with the first of w, as one 2-D
  matmul: x[..., *C] @ w[*C, ...] -> [..., ...]. Same as the einsum, but
  XLA:CPU runs the weight gradient of a 2-D matmul about 2x faster than a
  contraction over several batch-like dims (B and T); free elsewhere."""
  lead, inner, outer = x.shape[:-contract], w.shape[:contract], w.shape[contract:]
  y = x.reshape(math.prod(lead), math.prod(inner)) @ w.reshape(math.prod(inner), -1)
  return y.reshape(*lead, *outer)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = param(self, "scale", (x_BxTxD.shape[-1],), ("embed",), None,
                    self.param_dtype)
    x32 = x_BxTxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale_D.astype(jnp.float32)).astype(x_BxTxD.dtype)


class SwiGLU(nn.Module):
  """down(silu(x @ gate) * (x @ up)); used for dense FFNs, shared experts and
  the NITP projector."""
  hidden: int
  std: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    d = x_BxTxD.shape[-1]
    gate_DxF = param(self, "gate", (d, self.hidden), ("embed", "mlp"), self.std, self.param_dtype)
    up_DxF = param(self, "up", (d, self.hidden), ("embed", "mlp"), self.std, self.param_dtype)
    down_FxD = param(self, "down", (self.hidden, d), ("mlp", "embed"), self.std, self.param_dtype)
    x = x_BxTxD.astype(self.dtype)
    g_BxTxF = flat_matmul(x, gate_DxF.astype(self.dtype))
    u_BxTxF = flat_matmul(x, up_DxF.astype(self.dtype))
    h_BxTxF = nn.with_logical_constraint(
        nn.silu(g_BxTxF) * u_BxTxF, ("activation_batch", "activation_length", "activation_mlp"))
    return flat_matmul(h_BxTxF, down_FxD.astype(self.dtype))


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, "rotate half" layout (as in HF Llama/Qwen2)."""
  h = x_BxTxNxH.shape[-1]
  inv_freq_H2 = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  angle_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2
  cos = jnp.cos(angle_BxTxH2)[:, :, None, :]
  sin = jnp.sin(angle_BxTxH2)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)
