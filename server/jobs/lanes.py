"""Per-model lanes that release training work in seq_id order.

The SDK numbers every training request of one model from 1 and may send them out of order (a
chunked forward_backward sends its first chunk last). A lane holds a later seq_id until the gap
before it fills. A seq_id that will never arrive (its POST was rejected) is marked consumed; a gap
that stays open longer than the gap timeout is skipped with a warning, so a lost request never
blocks the model forever.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .record import Job

logger = logging.getLogger(__name__)


@dataclass
class Lane:
    model_id: str
    last_seq: int = 0  # the highest seq_id released so far
    pending: dict[int, Job] = field(default_factory=dict)  # queued jobs by seq_id
    unordered: list[Job] = field(default_factory=list)  # queued jobs without a seq_id, in arrival order
    consumed: set[int] = field(default_factory=set)  # seq_ids that will never run (rejected, cancelled)
    busy: bool = False  # a job of this lane is running
    gap_since: float | None = None  # when the lane started waiting for a missing seq_id

    def queued_count(self) -> int:
        return len(self.pending) + len(self.unordered)

    def add(self, job: Job) -> None:
        if job.seq_id is None:
            self.unordered.append(job)
        else:
            self.pending[job.seq_id] = job

    def remove(self, job: Job) -> None:
        if job.seq_id is not None and self.pending.get(job.seq_id) is job:
            del self.pending[job.seq_id]
            self.consume(job.seq_id)
        elif job in self.unordered:
            self.unordered.remove(job)

    def consume(self, seq_id: int) -> None:
        if seq_id > self.last_seq:
            self.consumed.add(seq_id)

    def fills_gap(self, seq_id: int) -> bool:
        """Whether seq_id is a missing one that queued later seq_ids of this lane are waiting for."""
        return seq_id > self.last_seq and bool(self.pending) and seq_id < min(self.pending)

    def next_job(self, gap_timeout_s: float) -> Job | None:
        """Pick the job to run next, or None while the lane is busy or waiting on a gap."""
        if self.busy:
            return None
        self._skip_consumed()
        if not self.pending:
            self.gap_since = None  # the jobs behind a gap may have been cancelled
        if self.pending:
            lowest = min(self.pending)
            # A seq_id at or below the last one released comes from a new client of the same model.
            if lowest <= self.last_seq + 1:
                return self._release(lowest)
            if self.gap_since is None:
                self.gap_since = time.monotonic()
            if time.monotonic() - self.gap_since >= gap_timeout_s:
                logger.warning("lane %s: seq_id %d never arrived after %.1f s; running seq_id %d",
                               self.model_id, self.last_seq + 1, gap_timeout_s, lowest)
                return self._release(lowest)
        if self.unordered:
            return self.unordered.pop(0)
        return None

    def gap_wait_left_s(self, gap_timeout_s: float) -> float | None:
        """Seconds until the gap timeout releases the next pending seq_id, or None without a gap."""
        if not self.pending or self.busy or self.gap_since is None:
            return None
        return max(0.0, self.gap_since + gap_timeout_s - time.monotonic())

    def _skip_consumed(self) -> None:
        while self.last_seq + 1 in self.consumed:
            self.consumed.discard(self.last_seq + 1)
            self.last_seq += 1

    def _release(self, seq_id: int) -> Job:
        job = self.pending.pop(seq_id)
        self.last_seq = seq_id
        self.gap_since = None
        # A gap skipped by the timeout leaves consumed seq_ids behind last_seq; they mean nothing now.
        self.consumed = {consumed for consumed in self.consumed if consumed > seq_id}
        return job

    def positions(self) -> list[Job]:
        """Queued jobs in the order the lane will run them."""
        return [self.pending[s] for s in sorted(self.pending)] + list(self.unordered)
