"""The CPU study: NTP vs NITP on the embedded corpus, about 10 minutes per
arm and seed on 2 cores, so 2 arms × 3 seeds fit in about an hour:

  python -m nitp_jax.experiments.compare --config=configs/cpu_study.py \
      --out=runs/cpu_study --seeds=3

The model is `configs/tiny.py`'s (4 layers, d=256, NITP target block 1)
trained 5× longer (1,000 steps, 2M tokens, a fifth of one epoch) and
evaluated on 8× more held-out tokens (64k), so that seed noise rather than
evaluation noise sets the error bars. Results: docs/cpu_study.md."""
import os

from nitp_jax.config import load_config_file

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")


def get_config(variant: str = ""):
  c = load_config_file(f"{TINY}:{variant}" if variant else TINY)
  t = c.train
  t.steps, t.warmup_steps = 1000, 50
  t.eval_every = t.geometry_every = t.checkpoint_every = 200
  t.eval_batches = 32
  return c
