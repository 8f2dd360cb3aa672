"""HuggingFace tokenizer.json support: a BPE tokenizer built with `tokenizers`
itself (no downloads) loads, encodes exactly as the library does, round-trips
losslessly, finds its end-of-text token; and our SentencePiece models convert
to a tokenizer.json that encodes exactly as SentencePiece does."""

import glob
import json
import os
import sysconfig

import numpy as np
import pytest

from nitp_jax.data import hf_tokenizer
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.errors import DataError

TRICKY = ("  leading spaces\n\ttab\t\tand  runs    of spaces  \n\n\n"
          "emoji 😀🚀👩‍💻 CJK 日本語のテキスト 中文 한국어 ünïcödé ß ﬁ Å\r\n"
          "zero\u200bwidth, combining e\u0301, rtl مرحبا, math ∑∫√ \x7f end  123456 3.14159")
EOT = "<|endoftext|>"


def _texts() -> list[str]:
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
  return [open(f, encoding="utf-8").read() for f in files] + [TRICKY]


def build_bpe_json(directory, vocab_size: int = 600, specials=(EOT, "<|pad|>")) -> str:
  """A byte-level BPE tokenizer.json (Qwen2's kind), trained by `tokenizers`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_texts(), trainer)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(str(directory), "tokenizer.json")
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
  return build_bpe_json(tmp_path_factory.mktemp("bpe"))


def test_tokenizer_json_encodes_as_the_library_and_round_trips(bpe_json):
  from tokenizers import Tokenizer
  ours = tok_lib.load_tokenizer(bpe_json)
  theirs = Tokenizer.from_file(bpe_json)
  assert ours.kind == "huggingface" and ours.file_name == "tokenizer.json"
  assert ours.vocab_size == theirs.get_vocab_size() == 600
  assert ours.eos_id == theirs.token_to_id(EOT)
  assert ours.pad_id == theirs.token_to_id("<|pad|>") and ours.bos_id is None
  texts = _texts()
  for text in texts:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text
  assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]
  docs = tok_lib.encode_documents(ours, texts[:2])
  assert all(d.dtype == np.int32 and d[-1] == ours.eos_id for d in docs)


def test_an_end_of_text_token_written_in_a_document_is_text(bpe_json):
  ours = tok_lib.load_tokenizer(bpe_json)
  ids = ours.encode(f"a {EOT} b")
  assert ours.eos_id not in ids
  assert ours.decode(ids) == f"a {EOT} b"


def test_tokenizer_config_names_the_special_tokens(tmp_path):
  path = build_bpe_json(tmp_path, specials=(EOT, "<|im_end|>"))
  assert tok_lib.load_tokenizer(path).eos_id == 0
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": {"content": "<|im_end|>"}, "pad_token": EOT,
               "bos_token": None}, f)
  tok = tok_lib.load_tokenizer(path)
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (1, 0, None)
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "<|nope|>"}, f)
  with pytest.raises(DataError, match=r"names eos_token '<\|nope\|>', which is not in"):
    tok_lib.load_tokenizer(path)


def test_tokenizer_json_errors_are_one_line(tmp_path):
  path = build_bpe_json(tmp_path, specials=("<unk>",))
  with pytest.raises(DataError, match="no end-of-text token.*tokenizer_config.json") as e:
    tok_lib.load_tokenizer(path)
  assert "\n" not in str(e.value)
  broken = tmp_path / "broken" / "tokenizer.json"
  broken.parent.mkdir()
  broken.write_text('{"model": ')
  with pytest.raises(DataError, match="is not a HuggingFace tokenizer.json") as e:
    tok_lib.load_tokenizer(str(broken))
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="does not exist.*tokenizer.json"):
    tok_lib.load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))


@pytest.mark.parametrize("vocab", [400, 1200])
def test_sentencepiece_converts_to_an_identical_tokenizer_json(vocab, tmp_path):
  texts = _texts()
  model = tok_lib.train_tokenizer(texts, vocab, str(tmp_path / "sp"))
  sp = tok_lib.load_tokenizer(model)
  converted = hf_tokenizer.from_sentencepiece(model)
  for text in texts + ["<s> and </s> are text here", "\n\n\t x\t\n", "unseen 🙂 ± ∰"]:
    ids = converted.encode(text, add_special_tokens=False).ids
    assert ids == sp.encode(text), text[:60]
    assert converted.decode(ids, skip_special_tokens=False) == text
  assert converted.get_vocab_size() == sp.vocab_size


def test_only_nitp_style_sentencepiece_models_convert(tmp_path):
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_texts()), model_prefix=str(tmp_path / "u"),
                                 vocab_size=300, model_type="unigram", minloglevel=2)
  with pytest.raises(DataError, match="only SentencePiece BPE models"):
    hf_tokenizer.from_sentencepiece(str(tmp_path / "u.model"))


def test_training_on_a_tokenizer_json_with_a_padded_vocabulary(tmp_path):
  from nitp_jax import train
  from nitp_jax.data import pipeline
  from tests.conftest import CORPUS_GLOB, train_config
  path = build_bpe_json(tmp_path / "tok", vocab_size=600, specials=(EOT, "<|im_end|>"))
  (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  cfg = train_config(str(tmp_path / "prepared"), steps=2, eval_every=2, checkpoint_every=2)
  cfg.data.input, cfg.data.tokenizer, cfg.model.vocab_size = CORPUS_GLOB, path, 640
  result = train.run(cfg, str(tmp_path / "run"))
  assert result["step"] == 2 and np.isfinite(result["eval"]["ntp"])
  with open(tmp_path / "prepared" / "manifest.json") as f:
    manifest = json.load(f)["tokenizer"]
  assert manifest["kind"] == "huggingface" and manifest["file"] == "tokenizer.json"
  assert manifest["eos_id"] == 1 and manifest["vocab_size"] == 600
  tok = tok_lib.load_tokenizer(str(tmp_path / "prepared" / "tokenizer.json"))
  assert tok.eos_id == 1  # its tokenizer_config.json came along
  doc = pipeline.heldout_documents(str(tmp_path / "prepared"))[0]
  assert doc[-1] == tok.eos_id and tok.decode(doc[:-1]) in "".join(
      open(p, encoding="utf-8").read() for p in sorted(glob.glob(CORPUS_GLOB)))
  cfg.model.vocab_size = 500
  with pytest.raises(DataError, match="the tokenizer has 600 tokens but the model's vocab_size "
                     "is 500"):
    train.run(cfg, str(tmp_path / "run_small"))
