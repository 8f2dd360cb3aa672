"""Small configs and batches shared by the tests."""

from __future__ import annotations

import glob
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np

from nitp_jax import config as config_lib


def small_config(moe: bool = False, **nitp):
  """A model small enough for many jitted calls in a test."""
  c = config_lib.base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = 97, 32, 4
  m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_dim = 4, 2, 8, 64
  m.max_seq_len = c.train.seq_len = 16
  c.nitp.target_layer = 1
  if moe:
    e = m.moe
    e.num_experts, e.top_k, e.num_dense_layers = 8, 2, 1
    e.expert_ffn = e.shared_expert_ffn = 16
    e.z_loss_weight = 1e-3
  for k, v in nitp.items():
    c.nitp[k] = v
  return config_lib.validate(c)


def packed_batch(b: int = 2, t: int = 16, vocab: int = 97, seed: int = 0) -> dict:
  """Rows holding two documents and trailing padding (segment 0)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(b, t)).astype(np.int32)
  seg = np.zeros((b, t), np.int32)
  pos = np.zeros((b, t), np.int32)
  for r in range(b):
    cut, end = 5 + r, t - 2 - r
    seg[r, :cut], seg[r, cut:end] = 1, 2
    pos[r, :cut] = np.arange(cut)
    pos[r, cut:end] = np.arange(end - cut)
    tokens[r, end:] = 0
  return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos)}


def max_abs_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- TensorBoard event files, read back independently of the writer ----

def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  """The CRC of a TFRecord: CRC-32C rotated right by 15 plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_records(path: str) -> list[bytes]:
  """The payloads of an event file, checking both CRCs of every record
  (uint64 length, its masked CRC, payload, the payload's masked CRC). A
  record cut short at the end of the file (a killed writer) is not read,
  as TensorBoard does."""
  with open(path, "rb") as f:
    data = f.read()
  events, i = [], 0
  while i + 12 <= len(data):
    header = data[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc(header)
    if i + 16 + length > len(data):
      break
    payload = data[i + 12:i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == masked_crc(payload)
    events.append(payload)
    i += 16 + length
  return events


SESSION_START = 1  # SessionLog.SessionStatus.START


def _proto_fields(data: bytes) -> list[tuple[int, int | bytes]]:
  """(field number, value) pairs of a protobuf message (wire types 0/1/2/5)."""
  def varint(i):
    n = shift = 0
    while True:
      n |= (data[i] & 0x7F) << shift
      shift += 7
      i += 1
      if not data[i - 1] & 0x80:
        return n, i
  out, i = [], 0
  while i < len(data):
    key, i = varint(i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = varint(i)
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, i = data[i:i + size], i + size
    else:
      size, i = varint(i)
      value, i = data[i:i + size], i + size
    out.append((number, value))
  return out


def _session_start(fields: dict) -> bool:
  """Event field 7 is a SessionLog; its field 1 the status."""
  return 7 in fields and dict(_proto_fields(fields[7])).get(1) == SESSION_START


def session_start_steps(path: str) -> list[int]:
  """The steps of the SessionLog START events in one event file."""
  return [fields.get(2, 0) for fields in map(dict, map(_proto_fields, read_event_records(path)))
          if _session_start(fields)]


def tensorboard_view(logdir: str, tag: str) -> list[tuple[int, float]]:
  """The (step, value) points TensorBoard shows for `tag`: event files in
  name order, and a SessionLog START at step s drops earlier points at s or
  later (TensorBoard's purge of orphaned data after a restart)."""
  points = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for payload in read_event_records(path):
      fields = dict(_proto_fields(payload))
      step = fields.get(2, 0)
      if _session_start(fields):
        points = [p for p in points if p[0] < step]
      for number, value in _proto_fields(fields.get(5, b"")):
        entry = dict(_proto_fields(value)) if number == 1 else {}
        if entry.get(1) == tag.encode():
          points.append((step, struct.unpack("<f", entry[2])[0]))
  return points


def take(it, n: int) -> list:
  """The next n items of an iterator."""
  return [next(it) for _ in range(n)]


def same_batches(a, b) -> bool:
  """Two lists of batches (dicts of arrays) are equal, key by key."""
  return len(a) == len(b) and all(
      all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))
