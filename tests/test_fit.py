"""The fit check: what one device must hold of the train state, against its memory."""

import math

import jax
import jax.experimental
import jax.numpy as jnp
import pytest

from nitp_jax import config as config_lib
from nitp_jax import fit
from nitp_jax import jitted
from nitp_jax.errors import ConfigError


def test_a_tiny_config_passes_and_its_state_is_counted_exactly():
  cfg = config_lib.validate(config_lib.base_config())
  steps = jitted.build(cfg, jitted.mesh_for_config(cfg))
  fit.check(steps)  # raises ConfigError if it cannot fit
  sizes = fit.state_bytes_per_device(steps.abstract_state, steps.state_shardings)
  params = sum(math.prod(a.shape) for a in jax.tree.leaves(steps.abstract_state["params"]))
  if jax.device_count() == 1:  # float32 parameters, AdamW's two float32 moments (+ counts)
    assert sizes["param_bytes_per_device"] == 4 * params
    assert 8 * params <= sizes["opt_state_bytes_per_device"] <= 8 * params + 64
  have, what = fit.device_memory()
  assert sum(sizes.values()) < have, (sizes, have, what)
  if jax.devices()[0].platform == "cpu":
    assert have == fit.host_ram_bytes() // jax.local_device_count() and "host RAM" in what


def test_running_out_of_memory_is_one_line_naming_what_shrinks_a_step():
  """A real RESOURCE_EXHAUSTED from XLA (256 TiB: more than any address space)."""
  with pytest.raises(ConfigError) as err, fit.out_of_memory_as_config_error():
    jax.jit(lambda: jnp.ones((2**46,), jnp.float32))().block_until_ready()
  message = str(err.value)
  assert message.startswith("the run does not fit in device memory (RESOURCE_EXHAUSTED")
  assert "--config.train.microbatches" in message and "\n" not in message


def test_other_runtime_errors_keep_their_traceback():
  with pytest.raises(jax.errors.JaxRuntimeError), fit.out_of_memory_as_config_error():
    jax.jit(lambda x: jax.experimental.io_callback(_fail, x, x))(jnp.ones(2)).block_until_ready()


def _fail(x):
  raise RuntimeError("a bug, not a user error")
