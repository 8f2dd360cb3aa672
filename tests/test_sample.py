"""Sampling with a KV cache: the cached decode equals recomputing the whole
sequence, greedy output equals transformers' generate() on the exported model
(dense and MoE), batching and padding change nothing, a seed reproduces a
sampled run, and the CLI reads a run's checkpoint and tokenizer."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import model as model_lib
from nitp_jax import sample
from nitp_jax.errors import UserError
from tests.helpers import small_config
from tests.test_export import _config, _random_params, CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 17, 3, 44, 9], [71, 2], [8, 8, 8, 30]]
GREEDY = sample.Sampling()


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
  cfg = _config(*CASES["qwen2_untied" if request.param == "dense" else
                      "qwen2moe_bias_tied_renorm"])
  return cfg, _random_params(cfg)


def recompute_greedy(cfg, params, prompt, n):
  """Greedy decoding without a cache: the whole sequence again per token."""
  net, _ = model_lib.build(cfg)
  forward = jax.jit(lambda tokens: net.apply({"params": params["backbone"]}, tokens)[0])
  tokens = list(prompt)
  for _ in range(n):  # padded at the end to one length: causal, so nothing changes
    padded = tokens + [0] * (cfg.model.max_seq_len - len(tokens))
    logits = forward(jnp.asarray([padded], jnp.int32))
    tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
  return tokens[len(prompt):]


def test_cached_greedy_equals_recomputing_the_sequence(model):
  cfg, params = model
  generator = sample.Generator.from_params(cfg, params)
  batched = generator.generate(PROMPTS, 8, GREEDY)
  for prompt, got in zip(PROMPTS, batched):
    assert got == recompute_greedy(cfg, params, prompt, 8), prompt
    assert generator.generate([prompt], 8, GREEDY)[0] == got  # alone = in a batch


def test_greedy_equals_transformers_generate(model, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from nitp_jax.export import hf
  cfg, params = model
  out = hf.export_hf(params, cfg, str(tmp_path / "hf"))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  p = max(map(len, PROMPTS))
  ids = torch.tensor([[0] * (p - len(x)) + x for x in PROMPTS])
  mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in PROMPTS])
  with torch.no_grad():
    generated = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                max_new_tokens=8, eos_token_id=None, pad_token_id=0)
  ours = sample.Generator.from_params(cfg, params).generate(PROMPTS, 8, GREEDY)
  assert generated[:, p:].tolist() == ours


def test_sampling_is_reproducible_and_the_knobs_act(model):
  cfg, params = model
  generator = sample.Generator.from_params(cfg, params)
  hot = sample.Sampling(temperature=1.5)
  a = generator.generate(PROMPTS, 8, hot, seed=3)
  assert a == generator.generate(PROMPTS, 8, hot, seed=3)
  assert a != generator.generate(PROMPTS, 8, hot, seed=4)
  greedy = generator.generate(PROMPTS, 8, GREEDY)
  assert generator.generate(PROMPTS, 8, sample.Sampling(1.5, top_k=1), seed=5) == greedy
  assert generator.generate(PROMPTS, 8, sample.Sampling(1.5, top_p=1e-6), seed=5) == greedy


def test_choose_keeps_only_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda s: np.array([int(sample.choose(logits, k, s)[0]) for k in keys])
  assert set(draw(sample.Sampling(1.0, top_k=2))) == {0, 1}
  assert set(draw(sample.Sampling(1.0, top_p=0.7))) == {0, 1}    # 0.5 + 0.3 >= 0.7
  assert set(draw(sample.Sampling(1.0, top_p=0.85))) == {0, 1, 2}
  assert set(draw(sample.Sampling(1.0))) == {0, 1, 2, 3}


def test_vocabulary_padding_is_never_sampled():
  cfg = small_config()
  params = model_lib.init_params(cfg, jax.random.key(0))
  generator = sample.Generator.from_params(cfg, params, vocab_limit=10)
  for row in generator.generate(PROMPTS, 6, sample.Sampling(5.0), seed=1):
    assert max(row) < 10


def test_bad_requests_are_one_line_errors():
  cfg = small_config()
  generator = sample.Generator.from_params(cfg, model_lib.init_params(cfg, jax.random.key(0)))
  for bad, match in [(dict(max_new_tokens=20), "max_seq_len=16"),
                     (dict(sampling=sample.Sampling(top_p=0.0)), "--top_p=0.0"),
                     (dict(sampling=sample.Sampling(temperature=-1.0)), "--temperature"),
                     (dict(prompts=[[]]), "at least one token")]:
    kwargs = dict(prompts=PROMPTS, max_new_tokens=4, sampling=GREEDY) | bad
    with pytest.raises(UserError, match=match):
      generator.generate(**kwargs)


def test_cli_samples_a_trained_run(trained_moe_run, tmp_path):
  out = tmp_path / "samples.jsonl"
  args = [sys.executable, "-m", "nitp_jax.sample", f"--workdir={trained_moe_run}",
          "--prompt=def parse(", "--prompt=import os\\n", "--max_new_tokens=6",
          "--temperature=0.9", "--top_k=20", "--seed=2", f"--output={out}"]
  run = lambda: subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
  first = run()
  assert first.returncode == 0, first.stderr[-2000:]
  assert first.stdout.count("--- sample") == 2 and "def parse(" in first.stdout
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["prompt"] for r in records] == ["def parse(", "import os\\n"]
  assert all(1 <= len(r["tokens"]) <= 6 and r["step"] == 6 for r in records)
  assert run().stdout == first.stdout  # same seed, same samples
  bad = subprocess.run(args[:4] + ["--prompt=x", "--top_p=2"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines() == ["error: --top_p=2.0 is invalid: must be in (0, 1]"]
