"""Counting skipped samples, logging each one, and stopping the run when too many go bad.

A few unreadable images in millions are normal and must not end a run; a dataset where one
sample in twenty is broken is a different dataset than the one the user thinks they train on.
"""
from __future__ import annotations

import logging
from collections import deque

logger = logging.getLogger("clipforge.data")


class TooManyBadSamples(RuntimeError):
    """The share of skipped samples passed the limit; the message names the counts and last keys."""

    def __init__(self, skipped: int, seen: int, max_rate: float, last_bad: list[tuple[str, str]]):
        self.skipped, self.seen, self.max_rate, self.last_bad = skipped, seen, max_rate, last_bad
        examples = "; ".join(f"{key} ({reason})" for key, reason in last_bad)
        super().__init__(
            f"skipped {skipped} of {seen} samples ({skipped / seen:.2%}), above the limit of {max_rate:.2%}; "
            f"last bad samples: {examples}. Fix or remove them, or raise the limit (--set data.max_skip_fraction=0.05)"
        )


class SkipCounter:
    """Tallies samples seen and skipped on this rank; ``check`` raises TooManyBadSamples.

    The rate is only judged once ``min_seen`` samples were seen, or at the end of the data
    (``final=True``), so one bad image among the first ten does not stop a large run.
    """

    def __init__(self, max_rate: float = 0.01, min_seen: int = 1000, keep_last: int = 5):
        if not 0.0 <= max_rate <= 1.0:
            raise ValueError(f"max skip rate must be in [0, 1], got {max_rate}")
        self.max_rate, self.min_seen = max_rate, min_seen
        self.seen = 0      # samples attempted, good and bad
        self.skipped = 0   # samples dropped as bad
        self.last_bad: deque[tuple[str, str]] = deque(maxlen=keep_last)  # (key, reason), newest last

    def add(self, seen: int, bad: list[tuple[str, str]]) -> None:
        """Record ``seen`` attempted samples of which ``bad`` (key, reason) pairs were skipped; logs each."""
        self.seen += seen
        self.skipped += len(bad)
        for key, reason in bad:
            logger.warning("skipped sample %s: %s", key, reason)
            self.last_bad.append((key, reason))

    @property
    def rate(self) -> float:
        """Skipped / seen so far (0.0 before anything was seen)."""
        return self.skipped / self.seen if self.seen else 0.0

    def check(self, final: bool = False) -> None:
        """Raise TooManyBadSamples when the skip rate is above the limit (see class docstring)."""
        judged = final or self.seen >= self.min_seen
        if judged and self.skipped and self.rate > self.max_rate:
            raise TooManyBadSamples(self.skipped, self.seen, self.max_rate, list(self.last_bad))
