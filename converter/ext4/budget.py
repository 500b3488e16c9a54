"""A process-wide bound on the inodes held by in-memory ext4 models, shared by concurrent conversions.

Each model costs ~300 bytes per inode (docs/ext4.md, "Memory"), and an index converts up to
`concurrency_limit` (4) children at once in one process, each child with its own model; a webhook worker
may run several conversions too. Without a common bound, four children of a million files each would
need four times what one needs.

The rule: models reserve inodes in steps of STEP. A reservation that would take the total past the
limit waits while another model is applying a layer and not waiting itself, i.e. while some model is
making progress and will give memory back when it ends. Otherwise it proceeds over the limit. So:

* a conversion alone never waits, whatever its size;
* the waiting can never deadlock: of the models applying a layer, at least one is always running;
* concurrent models stay within the limit, except that one of them may grow past it alone
  (peak inodes <= limit + the largest model).

A model gives its reservation back when it is garbage-collected (the pipeline drops its builder when
the image is done) or explicitly with `release`.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter

STEP = 4096  # inodes reserved at a time: a model takes the lock once per STEP new inodes
DEFAULT_LIMIT = 1_000_000  # inodes held by all models of the process (~300 MB)


class ModelBudget:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._held: Counter[int] = Counter()  # model key -> inodes reserved
        self._applying: set[int] = set()
        self._waiting: set[int] = set()
        self._next_key = 0
        self.waits = 0  # reservations that had to wait (for the bench and the tests)
        self.peak = 0  # the highest total ever reserved

    @property
    def total(self) -> int:
        return sum(self._held.values())

    def register(self, model: object) -> int:
        """A key for a new model; its reservation is released when `model` is garbage-collected."""
        with self._cond:
            self._next_key += 1
            key = self._next_key
        weakref.finalize(model, self.release, key)
        return key

    def reserve(self, key: int, count: int) -> None:
        with self._cond:
            if self.total + count > self.limit and self._others_running(key):
                self.waits += 1
                self._waiting.add(key)
                self._cond.notify_all()  # others re-check: this one no longer makes progress
                try:
                    while self.total + count > self.limit and self._others_running(key):
                        self._cond.wait(1.0)  # notified on every change; the timeout only guards the logic
                finally:
                    self._waiting.discard(key)
            self._held[key] += count
            self.peak = max(self.peak, self.total)

    def give_back(self, key: int, count: int) -> None:
        with self._cond:
            self._held[key] = max(0, self._held[key] - count)
            self._cond.notify_all()

    def applying(self, key: int, active: bool) -> None:
        """A model starts (True) or ends (False) applying a layer."""
        with self._cond:
            (self._applying.add if active else self._applying.discard)(key)
            self._cond.notify_all()

    def release(self, key: int) -> None:
        with self._cond:
            self._held.pop(key, None)
            self._applying.discard(key)
            self._waiting.discard(key)
            self._cond.notify_all()

    def _others_running(self, key: int) -> bool:
        return any(k != key and k not in self._waiting for k in self._applying)


MODEL_BUDGET = ModelBudget()
