"""Tokenizers: a SentencePiece `.model` (trained here, losslessly) or a
HuggingFace `tokenizer.json` (nitp_jax.data.hf_tokenizer), loaded by file
name; vocab checks.

The training settings make `decode(encode(text)) == text` for any Unicode
text: identity normalisation, whitespace kept as is, byte fallback for unseen
characters, and "\\n" / "\\t" as single pieces. Ids: 0 pad, 1 unk, 2 bos, 3 eos.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from nitp_jax import storage
from nitp_jax.data import hf_tokenizer
from nitp_jax.data.hf_tokenizer import HFTokenizer
from nitp_jax.errors import DataError
from nitp_jax.flag_names import flag

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
MAX_LINE_BYTES = 16384          # SP's max_sentence_length: it drops longer
                                # lines, so _sample_lines splits them first


class SentencePieceTokenizer:
  """A loaded SentencePiece model with the few calls the project needs."""

  kind = "sentencepiece"
  file_name = "tokenizer.model"

  def __init__(self, path: str):
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(token_id)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1
                   ) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


Tokenizer = SentencePieceTokenizer | HFTokenizer


def is_hf_json(path: str) -> bool:
  return path.endswith(".json")


def load_tokenizer(path: str) -> Tokenizer:
  """Load a SentencePiece .model, or a HuggingFace tokenizer.json (by its
  name); DataError if missing or not that kind of file."""
  if not os.path.isfile(path):
    raise DataError(f"tokenizer {path!r} does not exist: pass an existing SentencePiece "
                    f".model or HuggingFace tokenizer.json file to {flag('data.tokenizer')}.")
  if is_hf_json(path):
    return HFTokenizer(path)
  try:
    return SentencePieceTokenizer(path)
  except (RuntimeError, OSError) as e:
    raise DataError(f"tokenizer {path!r} is not a SentencePiece model "
                    f"({e}).") from None


def local_tokenizer(path: str) -> str:
  """`path` itself, or for gs://... its copy in the local cache (with the
  tokenizer_config.json beside a tokenizer.json); DataError when missing."""
  if not storage.is_remote(path):
    return path
  storage.check(path)
  if not storage.isfile(path):
    raise DataError(f"tokenizer {path!r} does not exist: pass an existing SentencePiece "
                    f".model or HuggingFace tokenizer.json file to {flag('data.tokenizer')}.")
  config = storage.join(posixpath.dirname(path), hf_tokenizer.CONFIG_FILE)
  if is_hf_json(path) and storage.isfile(config):
    storage.local_copy(config)
  return storage.local_copy(path)


def copy_tokenizer(path: str, dest: str) -> None:
  """Copy a tokenizer file, with the tokenizer_config.json beside a
  tokenizer.json (it names the special tokens)."""
  shutil.copyfile(path, dest)
  config = os.path.join(os.path.dirname(path), hf_tokenizer.CONFIG_FILE)
  if is_hf_json(path) and os.path.isfile(config):
    shutil.copyfile(config, os.path.join(os.path.dirname(dest), hf_tokenizer.CONFIG_FILE))


def check_fits(tokenizer_vocab: int, model_vocab: int) -> None:
  """DataError unless every token id is a valid model embedding row."""
  if tokenizer_vocab > model_vocab:
    raise DataError(
        f"the tokenizer has {tokenizer_vocab} tokens but the model's "
        f"vocab_size is {model_vocab}: token ids would index past the "
        f"embedding. Set {flag('model.vocab_size')}={tokenizer_vocab} (or "
        "larger), or use a tokenizer with at most "
        f"{model_vocab} tokens.")


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def train_tokenizer(text_iter_or_files: Iterable[str | os.PathLike],
                    vocab_size: int, model_prefix: str, *,
                    model_type: str = "bpe", max_chars: int = 20_000_000,
                    num_threads: int = 2, split_digits: bool = True) -> str:
  """Train a lossless SentencePiece model; return the .model path.

  Args:
    text_iter_or_files: documents (str) or files (os.PathLike, read as
      UTF-8); consumed in order until `max_chars` characters, so training
      time is bounded and the sample deterministic.
    vocab_size: exact number of pieces (DataError if the text cannot give it).
    model_prefix: writes `<prefix>.model` and `<prefix>.vocab`.
    model_type: "bpe" or "unigram".
  """
  if model_type not in MODEL_TYPES:
    raise DataError(f"model_type={model_type!r} is invalid: use one of "
                    f"{', '.join(MODEL_TYPES)}")
  lines = list(_sample_lines(text_iter_or_files, max_chars))
  if not lines:
    raise DataError("cannot train a tokenizer on empty text; give a corpus "
                    "with non-blank documents.")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=model_prefix,
        vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        byte_fallback=True, user_defined_symbols=["\n", "\t"],
        split_digits=split_digits, character_coverage=0.9995,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        input_sentence_size=0, max_sentence_length=MAX_LINE_BYTES,
        num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    high = re.search(r"value <= (\d+)", str(e))
    if "too high" in str(e) and high:
      raise CorpusTooSmallError(vocab_size, int(high.group(1))) from None
    raise DataError(_training_error(str(e), vocab_size)) from None
  return model_prefix + ".model"


def _sample_lines(items: Iterable[str | os.PathLike], max_chars: int
                  ) -> Iterator[str]:
  """Non-empty lines of the documents, in order, up to `max_chars` chars;
  lines longer than SentencePiece accepts come in pieces (`_pieces`)."""
  total = 0
  for item in items:
    text = (open(item, encoding="utf-8").read()
            if isinstance(item, os.PathLike) else item)
    for line in text.split("\n"):
      for piece in _pieces(line):
        yield piece
        total += len(piece)
        if total >= max_chars:
          return


def _pieces(line: str, max_bytes: int = MAX_LINE_BYTES) -> Iterator[str]:
  """`line` cut into pieces of at most `max_bytes` UTF-8 bytes, at the last
  space of each piece where there is one in its second half (a line over
  SentencePiece's max_sentence_length would be dropped from its training,
  and a corpus of such lines fails it)."""
  if len(line) * 4 <= max_bytes or len(line.encode("utf-8")) <= max_bytes:
    if line:
      yield line
    return
  chars = max_bytes // 4  # a UTF-8 character has at most 4 bytes
  start = 0
  while start < len(line):
    end = min(start + chars, len(line))
    if end < len(line):
      space = line.rfind(" ", start + chars // 2, end)
      end = space if space > start else end
    yield line[start:end]
    start = end


class CorpusTooSmallError(DataError):
  """The text cannot give a tokenizer this many pieces."""

  def __init__(self, vocab_size: int, max_pieces: int):
    self.vocab_size, self.max_pieces = vocab_size, max_pieces
    super().__init__(
        f"the corpus is too small for a tokenizer of vocab_size={vocab_size}: "
        f"SentencePiece can make at most {max_pieces} pieces from it. Use "
        f"{flag('model.vocab_size')}={max_pieces}, or a larger corpus.")


def _training_error(message: str, vocab_size: int) -> str:
  """A DataError message for SentencePiece's other training failures."""
  small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
  if small:
    return (f"vocab_size={vocab_size} is too small: byte fallback, special "
            f"tokens and the corpus's characters need {small.group(2)} "
            f"pieces. Use {flag('model.vocab_size')}={small.group(2)} or more.")
  return f"SentencePiece training failed for vocab_size={vocab_size}: {message}"


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str],
                     num_threads: int = 1) -> list[np.ndarray]:
  """Token ids of each text with EOS appended, as int32 arrays."""
  eos = tokenizer.eos_id
  return [np.asarray(ids + [eos], dtype=np.int32)
          for ids in tokenizer.encode_batch(texts, num_threads)]
