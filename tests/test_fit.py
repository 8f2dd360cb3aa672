"""The fit check: what one device must hold of the train state, against its memory."""

import math

import jax

from nitp_jax import config as config_lib
from nitp_jax import fit
from nitp_jax import jitted


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
