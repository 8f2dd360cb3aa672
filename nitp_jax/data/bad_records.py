"""Malformed records: skipped and counted, never silent, refused above a limit.

One policy for every reader (prepared corpora and streaming alike): a record
that cannot be read (a line that is not JSON, a row or line without a string
text field, undecodable bytes, an unreadable file) is skipped, counted and its
location kept; `check()` raises a DataError once bad records exceed
`max_fraction` of all records read (good + bad).

  bad = BadRecords(cfg.data.max_bad_fraction)
  for each record: bad.record_ok() or bad.skip("a.jsonl:17", "not valid JSON")
  bad.check()                     # after the pass (or periodically)
  logging.warning(bad.summary())  # when bad.count
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from nitp_jax.errors import DataError
from nitp_jax.flag_names import flag

KEPT_LOCATIONS = 100   # (location, reason) pairs kept, for the manifest
SHOWN_LOCATIONS = 3    # named in log lines and errors


@dataclasses.dataclass
class BadRecords:
  """Counts of good and malformed records, with the first bad locations.

  Attributes:
    max_fraction: bad / (good + bad) above this is a DataError in `check`.
    good: records read.
    count: records skipped as malformed.
    locations: the first KEPT_LOCATIONS (location, reason) of skipped records.
  """
  max_fraction: float = 0.01
  good: int = 0
  count: int = 0
  locations: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def record_ok(self, n: int = 1) -> None:
    """Count `n` good records."""
    self.good += n

  def skip(self, location: str, reason: str) -> None:
    """Count one malformed record at `location` (e.g. "a.jsonl:17")."""
    self.count += 1
    if len(self.locations) < KEPT_LOCATIONS:
      self.locations.append((location, reason))

  @property
  def total(self) -> int:
    return self.good + self.count

  @property
  def fraction(self) -> float:
    return self.count / self.total if self.total else 0.0

  def exceeded(self) -> bool:
    return self.fraction > self.max_fraction

  def check(self) -> None:
    """DataError when bad records exceed `max_fraction` of all records."""
    if not self.exceeded():
      return
    raise DataError(
        f"{self._counted()}, above the limit {flag('data.max_bad_fraction')}="
        f"{self.max_fraction:g}; first: {self._first()}. Fix or remove those records, "
        f"or accept them with {flag('data.max_bad_fraction')}={_ceil(self.fraction)}")

  def summary(self) -> str:
    """One line for the logs: the count, the fraction and the first locations."""
    if not self.count:
      return f"no malformed records in {self.total} records"
    return (f"{self._counted()} (limit {self.max_fraction:g}), skipped; first: "
            f"{self._first()}")

  def to_json(self) -> dict[str, Any]:
    """The manifest's record of what was skipped."""
    return {"skipped_count": self.count, "records": self.total,
            "skipped": [{"path": p, "reason": r} for p, r in self.locations]}

  def _counted(self) -> str:
    return (f"{self.count} of {self.total} records are malformed "
            f"({100 * self.fraction:.2g}%)")

  def _first(self) -> str:
    shown = " | ".join(f"{p}: {r}" for p, r in self.locations[:SHOWN_LOCATIONS])
    more = self.count - min(self.count, SHOWN_LOCATIONS)
    return shown + (f" (and {more} more)" if more else "")


def _ceil(fraction: float) -> str:
  """A limit that accepts `fraction`: rounded up to two significant digits."""
  if fraction >= 1:
    return "1"
  digits = max(2, 1 - math.floor(math.log10(fraction)))
  scale = 10 ** digits
  return f"{math.ceil(fraction * scale) / scale:g}"
