"""Sample from a run's checkpoint: greedy, temperature, top-k and top-p, in
batches, with a KV cache (each new token attends to the cached keys and
values; the prompt is never recomputed).

  python -m nitp_jax.sample --workdir=runs/tiny --prompt="def parse("
  python -m nitp_jax.sample --workdir=DIR --prompts_file=prompts.txt \\
      --temperature=0.8 --top_p=0.95 --max_new_tokens=64 --seed=1 [--step=N]

--temperature=0 (the default) is greedy decoding. A prompts file has one
prompt per line ("\\n" in a line stands for a newline). Each prompt is printed
with its continuation; --output=FILE.jsonl also writes {"prompt",
"completion", "tokens"} per prompt. The same seed gives the same samples.

Prompts of a batch are left-padded to one length; each row's positions
start at its first real token, so a prompt samples the same alone or in a
batch. Generation stops at the tokenizer's end-of-text token (per row), or
after --max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import cli
from nitp_jax import layout
from nitp_jax import model as model_lib
from nitp_jax.attention import CacheView, KVCache, cached_mask
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: temperature 0 = greedy (argmax)."""
  temperature: float = 0.0
  top_k: int = 0          # 0 = all tokens
  top_p: float = 1.0      # nucleus: the smallest set with this much probability

  def check(self) -> None:
    if not (np.isfinite(self.temperature) and self.temperature >= 0):
      raise ConfigError(f"--temperature={self.temperature} is invalid: must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ConfigError(f"--top_k={self.top_k} is invalid: must be >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"--top_p={self.top_p} is invalid: must be in (0, 1]")


def choose(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """The next token of each row [B] under `sampling`."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / sampling.temperature
  if sampling.top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if sampling.top_p < 1:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the better tokens
    kept_BxV = jnp.where(before_BxV < sampling.top_p, sorted_BxV, jnp.inf)
    cutoff_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def _decode_step(model: model_lib.Transformer, vocab_limit: int, backbone: dict,
                 tokens_BxT: jax.Array, positions_BxT: jax.Array, valid_BxS: jax.Array,
                 offset: jax.Array, caches: list[KVCache], key: jax.Array,
                 sampling: Sampling) -> tuple[jax.Array, list[KVCache]]:
  """Run T new tokens through the model, writing them into the caches at
  `offset`; the next token of each row, and the caches."""
  t = tokens_BxT.shape[1]
  view = CacheView(offset, cached_mask(valid_BxS, offset, t))
  logits_BxTxV, caches = model.apply({"params": backbone}, tokens_BxT, jnp.ones_like(tokens_BxT),
                                     positions_BxT, caches=caches, view=view)
  logits_BxV = logits_BxTxV[:, -1]
  in_vocab_V = jnp.arange(logits_BxV.shape[-1]) < vocab_limit
  return choose(jnp.where(in_vocab_V, logits_BxV, -jnp.inf), key, sampling), caches


@dataclasses.dataclass
class Generator:
  """A model with its parameters, ready to continue batches of prompts."""
  model: model_lib.Transformer
  backbone: dict
  max_seq_len: int
  vocab_limit: int        # ids >= this are never sampled (vocabulary padding)

  def __post_init__(self):
    self._step = jax.jit(functools.partial(_decode_step, self.model, self.vocab_limit),
                         static_argnames="sampling")

  @classmethod
  def from_params(cls, cfg: ml_collections.ConfigDict, params: dict,
                  vocab_limit: int | None = None) -> "Generator":
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.model.scan_layers = False  # the KV-cache path runs layer by layer
    model, _ = model_lib.build(cfg)
    backbone = model_lib.arrange_layers(params["backbone"], cfg)
    return cls(model, backbone, cfg.model.max_seq_len, vocab_limit or cfg.model.vocab_size)

  def _empty_caches(self, batch: int, slots: int) -> list[KVCache]:
    a = self.model.cfg.attention
    shape = (batch, slots, a.num_kv_heads, a.head_dim)
    dtype = self.model.cfg.compute_jnp_dtype
    return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(self.model.cfg.num_layers)]

  def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
               seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (up to and including `eos_id`)."""
    sampling.check()
    if not prompts or any(not p for p in prompts):
      raise DataError("every prompt needs at least one token")
    if max_new_tokens < 1:
      raise ConfigError(f"--max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    b, p = len(prompts), max(map(len, prompts))
    slots = p + max_new_tokens
    if slots > self.max_seq_len:
      raise ConfigError(
          f"the longest prompt ({p} tokens) plus --max_new_tokens={max_new_tokens} is "
          f"{slots} tokens, more than the model's max_seq_len={self.max_seq_len}: shorten "
          "the prompt or ask for fewer tokens")
    pads = np.array([p - len(x) for x in prompts])
    tokens_BxP = np.zeros((b, p), np.int32)
    for row, prompt in enumerate(prompts):
      tokens_BxP[row, pads[row]:] = prompt
    positions_BxP = np.maximum(np.arange(p)[None, :] - pads[:, None], 0).astype(np.int32)
    valid_BxS = np.zeros((b, slots), bool)
    valid_BxS[:, :p] = np.arange(p)[None, :] >= pads[:, None]
    key = jax.random.key(seed)
    caches = self._empty_caches(b, slots)
    key, sub = jax.random.split(key)
    token_B, caches = self._step(self.backbone, tokens_BxP, positions_BxP, valid_BxS,
                                 jnp.int32(0), caches, sub, sampling=sampling)
    out = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    next_position_B = (p - pads).astype(np.int32)
    for i in range(max_new_tokens):
      token_B = np.asarray(token_B)
      for row in np.flatnonzero(~done):
        out[row].append(int(token_B[row]))
      done |= (token_B == eos_id) if eos_id is not None else False
      if done.all() or i == max_new_tokens - 1:
        break
      # New arrays, never in-place updates: a dispatched step may still read
      # the host arrays it was given (JAX on CPU does not copy them).
      valid_BxS = valid_BxS | (np.arange(slots) == p + i)[None, :]
      key, sub = jax.random.split(key)
      token_B, caches = self._step(self.backbone, token_B[:, None], next_position_B[:, None],
                                   valid_BxS, jnp.int32(p + i), caches, sub, sampling=sampling)
      next_position_B = next_position_B + 1
    return out


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
  """--prompt values, then the lines of --prompts_file ("\\n" = newline)."""
  texts = list(prompts or [])
  if prompts_file:
    try:
      with open(prompts_file, encoding="utf-8") as f:
        texts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f"--prompts_file={prompts_file} cannot be read ({e})") from None
  if not texts:
    raise DataError("no prompt: pass --prompt=TEXT (repeatable) or --prompts_file=FILE")
  return texts


def sample_run(workdir: str, texts: list[str], max_new_tokens: int, sampling: Sampling,
               seed: int = 0, step: int | None = None, batch_size: int = 8
               ) -> tuple[int, list[dict]]:
  """(checkpoint step, [{"prompt", "completion", "tokens"}]) for a run."""
  sampling.check()
  step, cfg, params = ckpt_lib.restore_params(workdir, step)
  tokenizer_path = layout.run_tokenizer(cfg, workdir)
  if tokenizer_path is None:
    raise DataError(f"no tokenizer found for {workdir} (its prepared data has none and "
                    "config.data.tokenizer is unset): sampling needs the run's tokenizer")
  tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  generator = Generator.from_params(cfg, params, vocab_limit=tokenizer.vocab_size)
  results = []
  for start in range(0, len(texts), batch_size):
    chunk = texts[start:start + batch_size]
    new = generator.generate([tokenizer.encode(t) for t in chunk], max_new_tokens, sampling,
                             seed + start, tokenizer.eos_id)
    for text, ids in zip(chunk, new):
      shown = ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids
      results.append({"prompt": text, "completion": tokenizer.decode(shown), "tokens": ids})
  return step, results


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  texts = read_prompts(f.prompt, f.prompts_file)
  sampling = Sampling(f.temperature, f.top_k, f.top_p)
  if f.output:
    check_output(f.output)  # before the restore and the sampling
  step, results = sample_run(f.workdir, texts, f.max_new_tokens, sampling, f.seed, f.step,
                             f.batch_size)
  for i, r in enumerate(results):
    print(f"--- sample {i + 1}/{len(results)} (step {step}) ---\n{r['prompt']}{r['completion']}")
  sys.stdout.flush()
  if f.output:
    with open(f.output, "w", encoding="utf-8") as out:
      for r in results:
        out.write(json.dumps({**r, "step": step}) + "\n")


def check_output(path: str) -> None:
  """ConfigError naming --output if `path` cannot be written; an existing
  file is left as it is (opened to append, nothing written) until the
  samples replace it."""
  existed = os.path.exists(path)
  try:
    with open(path, "a", encoding="utf-8"):
      pass
  except OSError as e:
    raise ConfigError(f"--output={path} cannot be written ({e.strerror or e}): pass a file "
                      "path in a writable directory") from e
  if not existed:
    os.remove(path)


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training run directory (its checkpoints/).",
                      required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sample at this temperature.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens with this "
                     "much probability (1 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same samples.")
  flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
  flags.DEFINE_string("output", None, "Also write the samples as JSON lines to this file.")


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--workdir=DIR --prompt=TEXT [--max_new_tokens=N] "
               "[--temperature=T --top_k=K --top_p=P --seed=S]")
