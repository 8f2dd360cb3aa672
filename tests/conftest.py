"""Shared fixtures: one small real corpus (stdlib sources) prepared once."""

import atexit
import glob
import os
import shutil
import sysconfig
import tempfile

# One XLA compilation cache for the session, set before jax loads and
# inherited by the child processes the tests start (`python -m nitp_jax.…`):
# the suite compiles the same tiny models in dozens of processes, and
# compiling, not running, is most of its time on 2 cores. A fresh directory
# per session, so no run reuses another's executables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="nitp_jax_xla_cache_")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_XLA_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pytest  # noqa: E402

from nitp_jax import config as config_lib  # noqa: E402
from nitp_jax.data import prepare  # noqa: E402

CORPUS_GLOB = os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py")
VOCAB = 512


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> str:
  assert glob.glob(CORPUS_GLOB), CORPUS_GLOB
  out = str(tmp_path_factory.mktemp("prepared") / "email")
  prepare.prepare(CORPUS_GLOB, out, VOCAB, val_fraction=0.1, seed=0, workers=2)
  return out


def train_config(prepared: str, moe: bool = False, **train):
  """A model that trains a step in well under a second on 2 cores."""
  c = config_lib.base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = VOCAB, 64, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_dim = 4, 2, 16, 128
  m.max_seq_len = c.train.seq_len = 64
  if moe:
    m.moe.num_experts, m.moe.top_k, m.moe.num_dense_layers = 4, 2, 1
    m.moe.expert_ffn = m.moe.shared_expert_ffn = 32
  c.nitp.target_layer = 1
  c.data.input, c.data.prepared_dir, c.data.val_fraction = CORPUS_GLOB, prepared, 0.1
  t = c.train
  t.steps, t.global_batch, t.lr, t.warmup_steps = 40, 8, 3e-3, 5
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 1, 20, 20, 2
  for k, v in train.items():
    t[k] = v
  return config_lib.validate(c)


@pytest.fixture(scope="session")
def trained_moe_run(prepared_dir, tmp_path_factory) -> str:
  """The workdir of a 6-step MoE run with the default (dropless) dispatch."""
  from nitp_jax import train  # pylint: disable=import-outside-toplevel
  cfg = train_config(prepared_dir, moe=True, steps=6, eval_every=6, checkpoint_every=6,
                     geometry_every=0, log_every=3)
  assert cfg.model.moe.dispatch == "dropless"
  workdir = str(tmp_path_factory.mktemp("moe_run"))
  train.run(cfg, workdir)
  return workdir
