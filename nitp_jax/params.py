"""Print parameter counts and training FLOPs per token as one JSON object.

  python -m nitp_jax.params --config=configs/moe_9b.py
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from nitp_jax import cli
from nitp_jax import config as config_lib
from nitp_jax import flops

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)


def main(argv) -> None:
  del argv
  cfg = config_lib.validate(_CONFIG.value)
  print(json.dumps(flops.report(cfg)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags_or_exit)
