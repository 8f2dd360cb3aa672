"""HuggingFace `tokenizer.json` tokenizers (the `tokenizers` library): how a
run uses the paper's Qwen2 tokenizer, and how an export ships ours.

  HFTokenizer(path)              load a tokenizer.json (e.g. Qwen2's)
  from_sentencepiece(model)      the same tokenizer as a SentencePiece BPE
                                 model (ours), as a `tokenizers.Tokenizer`

Special tokens: a `tokenizer.json` does not say which token ends a document.
HFTokenizer reads `eos_token` / `bos_token` / `pad_token` from the
`tokenizer_config.json` beside it (as transformers writes it), else looks for
the usual names (`<|endoftext|>`, `</s>`, ...). Special tokens written
literally in a document are encoded as text, never as a real EOS.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from nitp_jax.errors import DataError

CONFIG_FILE = "tokenizer_config.json"
# Names tried, in order, when no tokenizer_config.json names the token.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _token_name(value: Any) -> str | None:
  """A tokenizer_config.json token entry: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A loaded `tokenizer.json` with the calls the project needs."""

  kind = "huggingface"
  file_name = "tokenizer.json"

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  # the library raises plain Exception
      raise DataError(f"tokenizer {path!r} is not a HuggingFace tokenizer.json "
                      f"({str(e).splitlines()[0][:200]})") from None
    self._tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text
    names = self._configured_names()
    self.eos_id = self._find("eos", names.get("eos"), EOS_NAMES)
    if self.eos_id is None:
      raise DataError(
          f"tokenizer {path!r} has no end-of-text token (none of {', '.join(EOS_NAMES)}): "
          f"put a {CONFIG_FILE} with \"eos_token\" beside it, as transformers writes it")
    self.bos_id = self._find("bos", names.get("bos"), BOS_NAMES)
    pad = self._find("pad", names.get("pad"), PAD_NAMES)
    self.pad_id = self.eos_id if pad is None else pad
    self.unk_id = self._find("unk", names.get("unk"), ("<unk>", "[UNK]"))

  def _configured_names(self) -> dict[str, str | None]:
    config = os.path.join(os.path.dirname(self.path), CONFIG_FILE)
    if not os.path.isfile(config):
      return {}
    try:
      with open(config, encoding="utf-8") as f:
        values = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"{config} is not readable JSON ({e}); fix or remove it") from None
    return {k: _token_name(values.get(f"{k}_token")) for k in ("eos", "bos", "pad", "unk")}

  def _find(self, what: str, configured: str | None, names: Sequence[str]) -> int | None:
    if configured is not None:
      token_id = self._tok.token_to_id(configured)
      if token_id is None:
        raise DataError(f"{CONFIG_FILE} beside {self.path!r} names {what}_token "
                        f"{configured!r}, which is not in the tokenizer")
      return token_id
    return next((self._tok.token_to_id(n) for n in names
                 if self._tok.token_to_id(n) is not None), None)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    del num_threads  # the library's own thread pool (TOKENIZERS_PARALLELISM)
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def piece(self, token_id: int) -> str:
    return self._tok.id_to_token(token_id)


def from_sentencepiece(model_path: str):
  """A `tokenizers.Tokenizer` that encodes and decodes as the SentencePiece
  BPE model at `model_path` (the settings of tokenizer.train_tokenizer:
  identity normalisation, no dummy prefix, byte fallback, user-defined
  symbols). Merges follow the pieces' order, as SentencePiece BPE applies
  them. Control tokens keep their ids but are not matched in text."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, "rb") as f:
    proto.ParseFromString(f.read())
  if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
    raise DataError(f"{model_path}: only SentencePiece BPE models convert to tokenizer.json "
                    "(this one is not BPE)")
  if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.name != "identity":
    raise DataError(f"{model_path}: only models with identity normalisation and no dummy "
                    "prefix (as nitp_jax trains them) convert to tokenizer.json")
  pieces = [(p.piece, p.type) for p in proto.pieces]
  vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
  mergeable = {piece for piece, kind in pieces if kind == _NORMAL}
  merges = []
  for piece in mergeable:
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if all(p in mergeable or (len(p) == 1 and p in vocab) for p in (left, right)):
        merges.append((vocab[piece], vocab[left], vocab[right], left, right))
  merges.sort()
  unknown = next(piece for piece, kind in pieces if kind == _UNKNOWN)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[(l, r) for *_, l, r in merges],
                             unk_token=unknown, fuse_unk=True, byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", "▁")
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  tok.add_tokens([AddedToken(piece, normalized=False, special=False)
                  for piece, kind in pieces if kind == _USER_DEFINED])
  return tok
