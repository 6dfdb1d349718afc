"""The in-process pub-sub hub: numbered events, a replay ring buffer and bounded subscribers.

Everything here runs on the event-loop thread and never awaits while publishing, so taking a
replay snapshot and registering a subscriber happen in one step, with no event in between.
Worker threads publish through `publish_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

from server.events.types import (
    COALESCED_EVENTS,
    CONTROL_EVENTS,
    TERMINAL_JOB_EVENTS,
    Event,
    EventFilter,
    EventType,
)

logger = logging.getLogger(__name__)

DEFAULT_RING_SIZE = 10_000
DEFAULT_QUEUE_SIZE = 1_000
DEFAULT_COALESCE_INTERVAL_S = 0.1  # at most 10 progress and 10 metrics events per job per second
DEFAULT_DRAIN_TIMEOUT_S = 1.0  # how long close() waits for streams to send server.shutdown


class Subscription:
    """One subscriber: an async iterator of events from its own bounded queue.

    Replayed events come first, then live ones. The iterator ends after a final
    `stream.lagged` or `server.shutdown` event, or at once after `close()`.
    """

    def __init__(self, hub: EventHub, event_filter: EventFilter, queue_size: int) -> None:
        self.event_filter = event_filter
        # The hub's last event id when the subscription was made. Live events have larger ids.
        self.start_id = hub.last_event_id
        self._hub = hub
        self._capacity = queue_size
        # One slot past the capacity stays free for the final control event, so the hub can
        # always end a subscription without waiting for its reader.
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=queue_size + 1)
        self._replay: collections.deque[Event] = collections.deque()
        self._last_queued_id = self.start_id
        self._ending = False  # the final event is queued: deliver what is left, then stop
        self._closed = False  # the reader closed the subscription: stop at once
        self._finished = asyncio.Event()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise self._finish()
        if self._replay:
            return self._replay.popleft()
        if self._ending and self._queue.empty():
            raise self._finish()

        event = await self._queue.get()
        if event is None or self._closed:
            raise self._finish()
        return event

    async def next_event(self, timeout_s: float | None) -> Event | None:
        """Wait for the next event, or return None if `timeout_s` passes first.

        Raises StopAsyncIteration once the subscription has ended.
        """
        try:
            async with asyncio.timeout(timeout_s):
                return await self.__anext__()
        except TimeoutError:
            return None

    def close(self) -> None:
        """Unsubscribe. Safe to call more than once and from `finally` blocks."""
        if self._closed:
            return
        self._closed = True
        self._hub._unregister(self)
        self._replay.clear()
        self._finished.set()
        try:
            self._queue.put_nowait(None)  # wakes a reader blocked in get()
        except asyncio.QueueFull:
            pass  # a full queue means no reader is blocked

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def _offer(self, event: Event) -> bool:
        """Queue a live event, or return False when the queue is full."""
        if self._queue.qsize() >= self._capacity:
            return False
        self._queue.put_nowait(event)
        self._last_queued_id = event.id
        return True

    def _end_with(self, event: Event) -> None:
        self._ending = True
        self._queue.put_nowait(event)  # fits: the reserved slot is used only here, once

    def _finish(self) -> StopAsyncIteration:
        self._closed = True
        self._hub._unregister(self)
        self._finished.set()
        return StopAsyncIteration()


@dataclass
class _PendingEvent:
    """The latest coalesced event of one job and type, waiting for its timer."""

    type: str
    time: float
    job_id: str
    model_id: str | None
    session_id: str | None
    data: dict[str, Any]
    timer: asyncio.TimerHandle


class EventHub:
    """Fans events out to subscribers without ever waiting on one.

    A subscriber whose queue is full gets a final `stream.lagged` event and is dropped, so one
    stalled client neither slows the others nor grows memory past its queue.
    """

    def __init__(
        self,
        *,
        ring_size: int = DEFAULT_RING_SIZE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        coalesce_interval_s: float = DEFAULT_COALESCE_INTERVAL_S,
    ) -> None:
        if ring_size < 1:
            raise ValueError(f"ring_size must be at least 1, got {ring_size}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if coalesce_interval_s < 0:
            raise ValueError(f"coalesce_interval_s must be >= 0, got {coalesce_interval_s}")

        self._ring: collections.deque[Event] = collections.deque(maxlen=ring_size)
        self._queue_size = queue_size
        self._coalesce_interval_s = coalesce_interval_s
        # A dict keeps subscription order, so fan-out order is stable.
        self._subscribers: dict[Subscription, None] = {}
        self._last_id = 0
        self._pending: dict[tuple[str, str], _PendingEvent] = {}
        self._last_emitted_at: dict[tuple[str, str], float] = {}  # loop.time() per job and type
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._closed_event = asyncio.Event()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def last_event_id(self) -> int:
        return self._last_id

    @property
    def closed(self) -> bool:
        return self._closed

    def bind_loop(self) -> None:
        """Remember the running loop so worker threads can publish before anything else has."""
        self._loop = asyncio.get_running_loop()

    def publish(
        self,
        type: EventType | str,
        data: dict[str, Any],
        *,
        job_id: str | None = None,
        model_id: str | None = None,
        session_id: str | None = None,
    ) -> None:
        """Publish one event without awaiting or blocking. Call it on the event-loop thread.

        Raises ValueError for an unknown type or a type that only the hub sends.
        """
        event_type = EventType(type).value
        if event_type in CONTROL_EVENTS:
            raise ValueError(f"{event_type} is sent by the hub itself and cannot be published")
        if self._closed:
            logger.debug("dropped %s event for job %s: the hub is closed", event_type, job_id)
            return
        if self._loop is None:
            self.bind_loop()

        published_at = time.time()
        data = dict(data)  # a later change to the caller's dict must not alter the event
        if job_id is not None and event_type in COALESCED_EVENTS and self._coalesce_interval_s:
            self._coalesce(event_type, published_at, job_id, model_id, session_id, data)
            return

        if job_id is not None:
            self._flush_job(job_id)
        self._append(event_type, published_at, job_id, model_id, session_id, data)
        if job_id is not None and event_type in TERMINAL_JOB_EVENTS:
            # NOTE: only a terminal event frees this per-job state, so a job that never
            # publishes one keeps two small entries until the hub closes.
            for coalesced_type in COALESCED_EVENTS:
                self._last_emitted_at.pop((job_id, coalesced_type), None)

    def publish_threadsafe(
        self,
        type: EventType | str,
        data: dict[str, Any],
        *,
        job_id: str | None = None,
        model_id: str | None = None,
        session_id: str | None = None,
    ) -> None:
        """Publish from a worker thread; the event is published on the loop thread soon after."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("EventHub has no event loop yet: call bind_loop() on the loop first")
        # The copy is taken now, because the worker may change its dict before the loop runs.
        publish = functools.partial(
            self.publish, type, dict(data), job_id=job_id, model_id=model_id, session_id=session_id
        )
        try:
            loop.call_soon_threadsafe(publish)
        except RuntimeError:
            # The loop has closed, so the server has stopped and no subscriber is left.
            logger.debug("dropped %s event for job %s: the event loop is closed", type, job_id)

    def buffered_events(self, event_filter: EventFilter) -> list[Event]:
        """Return the events still in the ring buffer that match `event_filter`, oldest first."""
        return [event for event in self._ring if event_filter.matches(event)]

    def subscribe(self, event_filter: EventFilter, *, since: int | None = None) -> Subscription:
        """Subscribe to live events. With `since`, first replay buffered events with id > since.

        The subscription starts with a `resync` event instead, and then continues live, when
        events after `since` have already left the ring buffer, or when `since` is larger than
        the last event id. Ids start at 1 in each server run, so such an id comes from an earlier run.
        """
        if self._loop is None:
            self.bind_loop()
        subscription = Subscription(self, event_filter, self._queue_size)
        if self._closed:
            shutdown = self._control_event(EventType.SERVER_SHUTDOWN, {}, self._last_id)
            subscription._end_with(shutdown)
            return subscription

        if since is not None and since > self._last_id:
            subscription._replay.append(self._resync_from_earlier_run(since))
        elif since is not None and since < self._last_id:
            subscription._replay.extend(self._replay_after(since, event_filter))
        self._subscribers[subscription] = None
        return subscription

    async def close(self, *, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> None:
        """Send `server.shutdown` to every subscriber, end every subscription and stop publishing.

        Waits up to `drain_timeout_s` for the readers to take their last event.
        """
        if self._closed:
            return
        for key in list(self._pending):
            self._flush_pending(key)
        self._closed = True
        self._closed_event.set()

        subscriptions = list(self._subscribers)
        self._subscribers.clear()
        for subscription in subscriptions:
            shutdown = self._control_event(
                EventType.SERVER_SHUTDOWN, {}, subscription._last_queued_id
            )
            subscription._end_with(shutdown)
        await self._wait_finished(subscriptions, drain_timeout_s)

    async def wait_closed(self) -> None:
        """Wait until close() starts. Stream handlers use it to end sessions with no events."""
        await self._closed_event.wait()

    def _unregister(self, subscription: Subscription) -> None:
        self._subscribers.pop(subscription, None)

    def _append(
        self,
        event_type: str,
        published_at: float,
        job_id: str | None,
        model_id: str | None,
        session_id: str | None,
        data: dict[str, Any],
    ) -> None:
        # The id is taken only here, when the event enters the ring, so ids have no holes even
        # though coalesced events are held back.
        self._last_id += 1
        event = Event(self._last_id, event_type, published_at, job_id, model_id, session_id, data)
        self._ring.append(event)

        lagging = [
            subscription
            for subscription in self._subscribers
            if subscription.event_filter.matches(event) and not subscription._offer(event)
        ]
        for subscription in lagging:
            self._drop_lagging(subscription)

    def _drop_lagging(self, subscription: Subscription) -> None:
        self._unregister(subscription)
        resume_id = subscription._last_queued_id
        lagged = self._control_event(
            EventType.STREAM_LAGGED,
            {
                "reason": f"subscriber queue full ({self._queue_size} events); "
                "reconnect with the last event id to resume",
                "last_event_id": resume_id,
            },
            resume_id,
        )
        subscription._end_with(lagged)
        logger.warning(
            "dropped a lagging event subscriber: queue of %d full at event %d (%s)",
            self._queue_size,
            self._last_id,
            subscription.event_filter,
        )

    def _replay_after(self, since: int, event_filter: EventFilter) -> list[Event]:
        oldest_id = self._ring[0].id
        if since < oldest_id - 1:
            resync = self._control_event(
                EventType.RESYNC,
                {
                    "reason": f"events after id {since} are no longer buffered; "
                    "reload state through the REST API",
                    "oldest_id": oldest_id,
                },
                self._last_id,
            )
            return [resync]

        # Ids are consecutive, so walking back from the newest stops right after `since`.
        replay = []
        for event in reversed(self._ring):
            if event.id <= since:
                break
            if event_filter.matches(event):
                replay.append(event)
        replay.reverse()
        return replay

    def _resync_from_earlier_run(self, since: int) -> Event:
        oldest_id = self._ring[0].id if self._ring else self._last_id + 1
        return self._control_event(
            EventType.RESYNC,
            {
                "reason": f"event id {since} is past the last event id {self._last_id}, so it "
                "comes from an earlier server run; reload state through the REST API",
                "oldest_id": oldest_id,
            },
            self._last_id,
        )

    def _coalesce(
        self,
        event_type: str,
        published_at: float,
        job_id: str,
        model_id: str | None,
        session_id: str | None,
        data: dict[str, Any],
    ) -> None:
        assert self._loop is not None
        key = (job_id, event_type)
        pending = self._pending.get(key)
        if pending is not None:
            # The latest data wins, and the timer already set keeps the original deadline.
            pending.time, pending.data = published_at, data
            pending.model_id, pending.session_id = model_id, session_id
            return

        now = self._loop.time()
        last_emitted_at = self._last_emitted_at.get(key)
        if last_emitted_at is None or now - last_emitted_at >= self._coalesce_interval_s:
            self._last_emitted_at[key] = now
            self._append(event_type, published_at, job_id, model_id, session_id, data)
            return

        delay_s = last_emitted_at + self._coalesce_interval_s - now
        timer = self._loop.call_later(delay_s, self._flush_pending, key)
        self._pending[key] = _PendingEvent(
            event_type, published_at, job_id, model_id, session_id, data, timer
        )

    def _flush_job(self, job_id: str) -> None:
        """Publish the job's held-back progress and metrics before its next other event."""
        for key in [key for key in self._pending if key[0] == job_id]:
            self._flush_pending(key)

    def _flush_pending(self, key: tuple[str, str]) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        pending.timer.cancel()
        assert self._loop is not None
        self._last_emitted_at[key] = self._loop.time()
        self._append(
            pending.type,
            pending.time,
            pending.job_id,
            pending.model_id,
            pending.session_id,
            pending.data,
        )

    def _control_event(self, event_type: EventType, data: dict[str, Any], event_id: int) -> Event:
        return Event(event_id, event_type.value, time.time(), data=data)

    async def _wait_finished(self, subscriptions: list[Subscription], timeout_s: float) -> None:
        if not subscriptions:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(s._finished.wait() for s in subscriptions))
        except TimeoutError:
            unfinished = sum(not s._finished.is_set() for s in subscriptions)
            logger.warning(
                "%d event subscribers did not take server.shutdown within %.1f s",
                unfinished,
                timeout_s,
            )
