"""The event hub: ids, filters, replay, slow subscribers, coalescing and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.events.hub import EventHub, Subscription
from server.events.types import Event, EventFilter, EventType

READ_TIMEOUT_S = 2.0


async def take(subscription: Subscription, count: int) -> list[Event]:
    events = []
    async with asyncio.timeout(READ_TIMEOUT_S):
        for _ in range(count):
            events.append(await anext(subscription))
    return events


async def take_all(subscription: Subscription) -> list[Event]:
    """Read until the subscription ends."""
    async with asyncio.timeout(READ_TIMEOUT_S):
        return [event async for event in subscription]


async def assert_nothing_pending(subscription: Subscription, wait_s: float = 0.05) -> None:
    event = await subscription.next_event(wait_s)
    assert event is None, f"unexpected event {event}"


def publish_started(hub: EventHub, count: int, job_id: str = "job-1") -> None:
    for _ in range(count):
        hub.publish(EventType.JOB_STARTED, {}, job_id=job_id)


async def test_ids_start_at_one_and_are_consecutive():
    hub = EventHub()
    subscription = hub.subscribe(EventFilter())

    hub.publish(EventType.MODEL_CREATED, {"name": "m"}, model_id="model-1")
    hub.publish(EventType.JOB_QUEUED, {}, job_id="job-1", model_id="model-1")
    hub.publish("checkpoint.saved", {"path": "tinker://x"}, model_id="model-1")

    events = await take(subscription, 3)
    assert [event.id for event in events] == [1, 2, 3]
    assert hub.last_event_id == 3
    assert events[2].type == "checkpoint.saved"


async def test_event_to_dict_has_exactly_the_envelope_keys():
    hub = EventHub()
    subscription = hub.subscribe(EventFilter())
    before = time.time()

    hub.publish(EventType.JOB_QUEUED, {"seq_id": 4}, job_id="j", model_id="m", session_id="s")

    (event,) = await take(subscription, 1)
    envelope = event.to_dict()
    assert set(envelope) == {"id", "type", "time", "job_id", "model_id", "session_id", "data"}
    assert envelope["type"] == "job.queued"
    assert (envelope["job_id"], envelope["model_id"], envelope["session_id"]) == ("j", "m", "s")
    assert envelope["data"] == {"seq_id": 4}
    assert before <= envelope["time"] <= time.time()


async def test_publish_copies_the_data_dict():
    hub = EventHub()
    subscription = hub.subscribe(EventFilter())
    data = {"phase": "forward"}

    hub.publish(EventType.JOB_PHASE, data, job_id="j")
    data["phase"] = "changed later"

    (event,) = await take(subscription, 1)
    assert event.data == {"phase": "forward"}


async def test_publish_rejects_unknown_and_hub_only_types():
    hub = EventHub()

    with pytest.raises(ValueError):
        hub.publish("job.exploded", {})
    for hub_only in ("stream.lagged", "resync", "server.shutdown"):
        with pytest.raises(ValueError):
            hub.publish(hub_only, {})
    assert hub.last_event_id == 0


@pytest.mark.parametrize(
    ("event_filter", "expected"),
    [
        (EventFilter(), True),
        (EventFilter(job_ids=frozenset({"j1"})), True),
        (EventFilter(job_ids=frozenset({"j2"})), False),
        (EventFilter(model_ids=frozenset({"m1", "m2"})), True),
        (EventFilter(model_ids=frozenset({"m2"})), False),
        (EventFilter(session_ids=frozenset({"s1"})), True),
        (EventFilter(session_ids=frozenset({"s2"})), False),
        (EventFilter(types=frozenset({"job.failed"})), True),
        (EventFilter(types=frozenset({"job.succeeded"})), False),
        (EventFilter(types=frozenset({"job.*"})), True),
        (EventFilter(types=frozenset({"model.*"})), False),
        (EventFilter(types=frozenset({"model.created", "job.*"})), True),
        # Sets combine with AND.
        (EventFilter(job_ids=frozenset({"j1"}), types=frozenset({"model.*"})), False),
        (EventFilter(job_ids=frozenset({"j1"}), model_ids=frozenset({"m1"})), True),
    ],
)
def test_filter_matches(event_filter, expected):
    event = Event(7, "job.failed", 0.0, job_id="j1", model_id="m1", session_id="s1")

    assert event_filter.matches(event) is expected


def test_filter_type_prefix_keeps_the_dot():
    event = Event(1, "jobs.other", 0.0)

    assert not EventFilter(types=frozenset({"job.*"})).matches(event)


def test_filter_on_id_rejects_events_without_that_id():
    event = Event(1, "model.created", 0.0, model_id="m1")

    assert not EventFilter(job_ids=frozenset({"j1"})).matches(event)


async def test_subscriber_receives_only_matching_events():
    hub = EventHub()
    job_watch = hub.subscribe(EventFilter(job_ids=frozenset({"j1"})))
    model_watch = hub.subscribe(EventFilter(model_ids=frozenset({"m2"})))
    session_watch = hub.subscribe(EventFilter(session_ids=frozenset({"s1"})))
    type_watch = hub.subscribe(EventFilter(types=frozenset({"model.*", "checkpoint.saved"})))

    hub.publish(EventType.JOB_QUEUED, {}, job_id="j1", model_id="m1", session_id="s1")  # 1
    hub.publish(EventType.JOB_QUEUED, {}, job_id="j2", model_id="m2", session_id="s2")  # 2
    hub.publish(EventType.MODEL_CREATED, {}, model_id="m2", session_id="s1")  # 3
    hub.publish(EventType.CHECKPOINT_SAVED, {}, model_id="m1")  # 4
    hub.publish(EventType.JOB_SUCCEEDED, {}, job_id="j1", model_id="m1")  # 5

    assert [event.id for event in await take(job_watch, 2)] == [1, 5]
    assert [event.id for event in await take(model_watch, 2)] == [2, 3]
    assert [event.id for event in await take(session_watch, 2)] == [1, 3]
    assert [event.id for event in await take(type_watch, 2)] == [3, 4]
    for subscription in (job_watch, model_watch, session_watch, type_watch):
        await assert_nothing_pending(subscription)


async def test_replay_then_live_has_no_gap():
    hub = EventHub()
    publish_started(hub, 10)

    subscription = hub.subscribe(EventFilter(), since=4)
    publish_started(hub, 2)

    events = await take(subscription, 8)
    assert [event.id for event in events] == list(range(5, 13))
    await assert_nothing_pending(subscription)


async def test_replay_applies_the_filter():
    hub = EventHub()
    for index in range(6):
        hub.publish(EventType.JOB_STARTED, {}, job_id=f"j{index % 2}")

    subscription = hub.subscribe(EventFilter(job_ids=frozenset({"j1"})), since=0)

    assert [event.id for event in await take(subscription, 3)] == [2, 4, 6]
    await assert_nothing_pending(subscription)


async def test_replay_interleaved_with_live_publishing_keeps_order():
    hub = EventHub()
    received: list[int] = []

    async def publisher() -> None:
        for _ in range(200):
            hub.publish(EventType.JOB_PHASE, {}, job_id="j")
            await asyncio.sleep(0)

    publishing = asyncio.create_task(publisher())
    await asyncio.sleep(0.01)
    subscription = hub.subscribe(EventFilter(), since=0)
    while len(received) < 200:
        event = await subscription.next_event(READ_TIMEOUT_S)
        assert event is not None
        received.append(event.id)
    await publishing

    assert received == list(range(1, 201))


async def test_since_at_last_id_is_live_only():
    hub = EventHub()
    publish_started(hub, 3)

    at_last = hub.subscribe(EventFilter(), since=3)
    publish_started(hub, 1)

    assert [event.id for event in await take(at_last, 1)] == [4]
    await assert_nothing_pending(at_last)


async def test_since_past_last_id_starts_with_resync():
    hub = EventHub()
    publish_started(hub, 3)

    # Ids restart at 1 with each server run, so an id past the last one comes from an earlier run.
    past_last = hub.subscribe(EventFilter(job_ids=frozenset({"job-1"})), since=99)
    publish_started(hub, 1)

    resync, live = await take(past_last, 2)
    assert resync.type == "resync"
    assert "earlier server run" in resync.data["reason"]
    assert resync.data["oldest_id"] == 1
    assert resync.id == 3  # resuming from here is gap-free
    assert live.id == 4
    await assert_nothing_pending(past_last)


async def test_since_on_a_hub_without_events_starts_with_resync():
    hub = EventHub()

    subscription = hub.subscribe(EventFilter(), since=7)
    publish_started(hub, 1)

    resync, live = await take(subscription, 2)
    assert resync.type == "resync"
    assert resync.id == 0
    assert resync.data["oldest_id"] == 1
    assert live.id == 1


async def test_replay_from_oldest_buffered_id_needs_no_resync():
    hub = EventHub(ring_size=5)
    publish_started(hub, 10)  # the ring keeps ids 6..10

    subscription = hub.subscribe(EventFilter(), since=5)

    assert [event.id for event in await take(subscription, 5)] == [6, 7, 8, 9, 10]


async def test_resync_when_since_fell_out_of_the_ring():
    hub = EventHub(ring_size=5)
    publish_started(hub, 10)  # the ring keeps ids 6..10, so event 5 is lost

    subscription = hub.subscribe(EventFilter(), since=4)
    publish_started(hub, 1)

    resync, live = await take(subscription, 2)
    assert resync.type == "resync"
    assert resync.data["oldest_id"] == 6
    assert resync.data["reason"]
    assert resync.id == 10  # resuming from here is gap-free
    assert live.id == 11
    await assert_nothing_pending(subscription)


async def test_stalled_subscriber_dropped_others_unaffected():
    hub = EventHub(queue_size=3)
    stalled = hub.subscribe(EventFilter())
    reader = hub.subscribe(EventFilter())
    latencies_s: list[float] = []
    published_at: dict[int, float] = {}

    async def read_all() -> list[int]:
        ids = []
        async for event in reader:
            latencies_s.append(time.monotonic() - published_at[event.id])
            ids.append(event.id)
            if len(ids) == 50:
                return ids
        return ids

    reading = asyncio.create_task(read_all())
    for _ in range(50):
        hub.publish(EventType.JOB_PHASE, {}, job_id="j")
        published_at[hub.last_event_id] = time.monotonic()
        await asyncio.sleep(0)  # a publisher that yields, as the job engine does

    async with asyncio.timeout(READ_TIMEOUT_S):
        assert await reading == list(range(1, 51))
    assert max(latencies_s) < 0.5
    assert hub.subscriber_count == 1

    stalled_events = await take_all(stalled)
    assert [event.id for event in stalled_events[:3]] == [1, 2, 3]
    lagged = stalled_events[3]
    assert lagged.type == "stream.lagged"
    assert lagged.id == 3
    assert lagged.data["last_event_id"] == 3
    assert len(stalled_events) == 4


async def test_stalled_subscriber_queue_never_grows_past_its_size():
    hub = EventHub(queue_size=5)
    stalled = hub.subscribe(EventFilter())

    publish_started(hub, 1_000)

    assert hub.subscriber_count == 0
    assert stalled._queue.qsize() == 6  # five events and the lagged event


async def test_coalescing_keeps_first_and_latest_progress():
    hub = EventHub(coalesce_interval_s=0.05)
    subscription = hub.subscribe(EventFilter())

    for step in range(100):
        hub.publish(EventType.JOB_PROGRESS, {"completed": step}, job_id="j")

    first, last = await take(subscription, 2)
    assert first.data == {"completed": 0}
    assert last.data == {"completed": 99}
    assert (first.id, last.id) == (1, 2)
    await assert_nothing_pending(subscription, wait_s=0.1)


async def test_coalescing_caps_progress_rate_per_job():
    interval_s = 0.05
    hub = EventHub(coalesce_interval_s=interval_s)
    subscription = hub.subscribe(EventFilter(types=frozenset({"job.progress"})))

    started = time.monotonic()
    step = 0
    while time.monotonic() - started < 0.5:
        hub.publish(EventType.JOB_PROGRESS, {"completed": step}, job_id="j")
        step += 1
        await asyncio.sleep(0.002)
    elapsed_s = time.monotonic() - started
    await asyncio.sleep(interval_s * 2)  # the last pending event flushes

    events = []
    while (event := await subscription.next_event(0.01)) is not None:
        events.append(event)
    assert step > 50  # enough publishes that coalescing had work to do
    assert 2 <= len(events) <= elapsed_s / interval_s + 2
    assert events[-1].data == {"completed": step - 1}


async def test_coalescing_is_per_job_and_per_type():
    hub = EventHub(coalesce_interval_s=10.0)
    subscription = hub.subscribe(EventFilter())

    hub.publish(EventType.JOB_PROGRESS, {"completed": 1}, job_id="a")
    hub.publish(EventType.JOB_PROGRESS, {"completed": 1}, job_id="b")
    hub.publish(EventType.JOB_METRICS, {"loss": 1.0}, job_id="a")

    events = await take(subscription, 3)
    assert [(event.job_id, event.type) for event in events] == [
        ("a", "job.progress"),
        ("b", "job.progress"),
        ("a", "job.metrics"),
    ]


async def test_terminal_event_flushes_pending_progress_first():
    hub = EventHub(coalesce_interval_s=10.0)
    subscription = hub.subscribe(EventFilter())

    hub.publish(EventType.JOB_PROGRESS, {"completed": 1}, job_id="j")
    hub.publish(EventType.JOB_PROGRESS, {"completed": 2}, job_id="j")
    hub.publish(EventType.JOB_METRICS, {"loss": 0.5}, job_id="j")
    hub.publish(EventType.JOB_METRICS, {"loss": 0.25}, job_id="j")
    hub.publish(EventType.JOB_PROGRESS, {"completed": 3}, job_id="j")
    hub.publish(EventType.JOB_SUCCEEDED, {}, job_id="j")

    events = await take(subscription, 5)
    assert [(event.type, event.data) for event in events] == [
        ("job.progress", {"completed": 1}),
        ("job.metrics", {"loss": 0.5}),
        ("job.progress", {"completed": 3}),
        ("job.metrics", {"loss": 0.25}),
        ("job.succeeded", {}),
    ]
    assert [event.id for event in events] == [1, 2, 3, 4, 5]
    await assert_nothing_pending(subscription)


async def test_phase_event_flushes_only_its_own_job():
    hub = EventHub(coalesce_interval_s=10.0)
    subscription = hub.subscribe(EventFilter())
    for job_id in ("a", "b"):
        hub.publish(EventType.JOB_PROGRESS, {"completed": 1}, job_id=job_id)
        hub.publish(EventType.JOB_PROGRESS, {"completed": 2}, job_id=job_id)

    hub.publish(EventType.JOB_PHASE, {"phase": "optim_step"}, job_id="a")

    events = await take(subscription, 4)
    assert [(event.job_id, event.type, event.data) for event in events] == [
        ("a", "job.progress", {"completed": 1}),
        ("b", "job.progress", {"completed": 1}),
        ("a", "job.progress", {"completed": 2}),
        ("a", "job.phase", {"phase": "optim_step"}),
    ]
    await assert_nothing_pending(subscription)


async def test_close_flushes_pending_progress_before_shutdown():
    hub = EventHub(coalesce_interval_s=10.0)
    subscription = hub.subscribe(EventFilter())
    hub.publish(EventType.JOB_PROGRESS, {"completed": 1}, job_id="j")
    hub.publish(EventType.JOB_PROGRESS, {"completed": 2}, job_id="j")

    closing = asyncio.create_task(hub.close())
    events = await take_all(subscription)
    await closing

    assert [(event.type, event.data) for event in events] == [
        ("job.progress", {"completed": 1}),
        ("job.progress", {"completed": 2}),
        ("server.shutdown", {}),
    ]


async def test_close_ends_every_subscription_with_shutdown():
    hub = EventHub()
    everything = hub.subscribe(EventFilter())
    other_job = hub.subscribe(EventFilter(job_ids=frozenset({"nobody"})))
    publish_started(hub, 2)

    async def read(subscription: Subscription) -> list[str]:
        return [event.type for event in await take_all(subscription)]

    readers = [asyncio.create_task(read(everything)), asyncio.create_task(read(other_job))]
    await asyncio.sleep(0)
    await asyncio.wait_for(hub.close(), READ_TIMEOUT_S)

    assert await readers[0] == ["job.started", "job.started", "server.shutdown"]
    assert await readers[1] == ["server.shutdown"]
    assert hub.subscriber_count == 0
    assert hub.closed


async def test_hub_after_close_ignores_publish():
    hub = EventHub()
    await hub.close()

    hub.publish(EventType.JOB_STARTED, {}, job_id="j")
    late = hub.subscribe(EventFilter())

    assert hub.last_event_id == 0
    assert [event.type for event in await take_all(late)] == ["server.shutdown"]


async def test_close_bounds_wait_for_stalled_reader():
    hub = EventHub()
    hub.subscribe(EventFilter())  # never read

    started = time.monotonic()
    await hub.close(drain_timeout_s=0.1)

    assert time.monotonic() - started < 1.0


async def test_subscription_close_wakes_a_blocked_reader_and_unsubscribes():
    hub = EventHub()
    subscription = hub.subscribe(EventFilter())
    reading = asyncio.create_task(take_all(subscription))
    await asyncio.sleep(0.01)

    subscription.close()

    assert await reading == []
    assert hub.subscriber_count == 0


async def test_subscription_context_manager_unsubscribes():
    hub = EventHub()

    async with hub.subscribe(EventFilter()) as subscription:
        assert hub.subscriber_count == 1
        publish_started(hub, 1)
        assert [event.id for event in await take(subscription, 1)] == [1]

    assert hub.subscriber_count == 0


async def test_next_event_timeout_loses_nothing():
    hub = EventHub()
    subscription = hub.subscribe(EventFilter())

    assert await subscription.next_event(0.01) is None
    publish_started(hub, 1)

    event = await subscription.next_event(READ_TIMEOUT_S)
    assert event is not None and event.id == 1


async def test_publish_threadsafe_from_worker_thread_keeps_order():
    hub = EventHub()
    hub.bind_loop()
    subscription = hub.subscribe(EventFilter())

    def worker() -> None:
        for step in range(20):
            hub.publish_threadsafe(EventType.JOB_PHASE, {"step": step}, job_id="j")

    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.to_thread(thread.join)

    events = await take(subscription, 20)
    assert [event.data["step"] for event in events] == list(range(20))


def test_publish_threadsafe_without_a_loop_raises():
    hub = EventHub()

    with pytest.raises(RuntimeError, match="bind_loop"):
        hub.publish_threadsafe(EventType.JOB_PHASE, {}, job_id="j")


@pytest.mark.parametrize(
    "settings",
    [{"ring_size": 0}, {"queue_size": 0}, {"coalesce_interval_s": -1.0}],
)
def test_hub_rejects_invalid_settings(settings):
    with pytest.raises(ValueError):
        EventHub(**settings)
