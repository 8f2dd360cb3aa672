"""Scalar TensorBoard event files written without TensorFlow.

An event file is a sequence of records: uint64 length, masked CRC-32C of the
length, the serialized `Event` proto, masked CRC-32C of the data. The two
protos needed (Event, Summary.Value with simple_value) are encoded by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    bits, n = n & 0x7F, n >> 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2, _varint(len(payload)) + payload)


SESSION_START = 1  # SessionLog.SessionStatus.START


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None,
                 session_status: int | None = None) -> bytes:
  """Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5,
  session_log=7 {status=1}}."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if session_status is not None:
    out += _length_delimited(7, _field(1, 0, _varint(session_status)))
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode())
                          + _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars.items())
    out += _length_delimited(5, values)
  return out


def encode_record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc(header)) + data
          + struct.pack("<I", masked_crc(data)))


class SummaryWriter:
  """Appends scalar summaries to one new event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, event: bytes) -> None:
    self._file.write(encode_record(event))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(encode_event(time.time(), step, scalars=values))
    self._file.flush()

  def restart_at(self, step: int) -> None:
    """A SessionLog START at `step`: TensorBoard drops the points at `step`
    and later written before it (by a run that is now resumed from an
    earlier checkpoint), so re-run steps do not show twice."""
    self._write(encode_event(time.time(), step, session_status=SESSION_START))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
