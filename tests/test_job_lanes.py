"""The job engine and its seq_id lanes, driven by plain Python work functions (no model)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.errors import QueueFullError, UserError
from server.jobs.engine import JobEngine, JobLimits
from server.jobs.lanes import Lane
from server.jobs.record import Job
from server.jobs.states import JobState


def _job(seq_id: int | None, model_id: str = "m") -> Job:
    return Job(id=f"job-{seq_id}", kind="forward_backward", model_id=model_id, session_id=None, seq_id=seq_id,
               created_at=time.time(), expires_at=None)


def _drain(lane: Lane, gap_timeout_s: float = 60.0) -> list[int | None]:
    released = []
    while (job := lane.next_job(gap_timeout_s)) is not None:
        released.append(job.seq_id)
    return released


# ---- lanes ---------------------------------------------------------------------------------


def test_lane_releases_out_of_order_seq_ids_in_order():
    lane = Lane("m")
    for seq_id in (3, 2):
        lane.add(_job(seq_id))
    assert lane.next_job(60.0) is None
    lane.add(_job(1))
    assert _drain(lane) == [1, 2, 3]


def test_lane_skips_consumed_seq_id():
    lane = Lane("m")
    lane.add(_job(2))
    lane.consume(1)
    assert _drain(lane) == [2]


def test_lane_gap_timeout_releases_next_pending():
    lane = Lane("m")
    lane.add(_job(3))
    assert lane.next_job(0.05) is None
    assert 0 < lane.gap_wait_left_s(0.05) <= 0.05
    time.sleep(0.06)
    assert _drain(lane, 0.05) == [3]
    # A late seq_id below the released one still runs.
    lane.add(_job(2))
    assert _drain(lane, 0.05) == [2]


def test_lane_gap_clock_restarts_after_cancelled_jobs():
    lane = Lane("m")
    waiting = _job(3)
    lane.add(waiting)
    assert lane.next_job(0.05) is None
    lane.remove(waiting)  # consumes seq_id 3
    time.sleep(0.06)
    assert lane.next_job(0.05) is None  # resets the gap clock: nothing is pending
    lane.add(_job(5))  # seq_ids 1, 2 and 4 are missing
    assert lane.next_job(0.05) is None
    assert lane.gap_wait_left_s(0.05) > 0.03


def test_lane_fills_gap_only_below_pending():
    lane = Lane("m")
    assert not lane.fills_gap(1)
    lane.add(_job(3))
    assert lane.fills_gap(1)
    assert lane.fills_gap(2)
    assert not lane.fills_gap(4)


def test_lane_runs_unordered_jobs_while_waiting_on_gap():
    lane = Lane("m")
    lane.add(_job(2))
    lane.add(_job(None))
    assert _drain(lane) == [None]
    assert lane.queued_count() == 1


# ---- engine --------------------------------------------------------------------------------


class Gate:
    """A work function that reports progress at each step and holds at step `hold_at` until released."""

    def __init__(self, steps: int = 5, hold_at: int = 1, step_s: float = 0.0) -> None:
        self.steps = steps
        self.hold_at = hold_at
        self.step_s = step_s
        self.release = threading.Event()
        self.holding = threading.Event()
        self.completed = 0

    def __call__(self, progress):
        for step in range(1, self.steps + 1):
            if step == self.hold_at:
                self.holding.set()
                self.release.wait(10)
            time.sleep(self.step_s)
            progress("forward", step, self.steps)
            self.completed = step
        return {"completed": self.completed}


@pytest.fixture
async def make_engine():
    engines: list[JobEngine] = []

    async def build(**limits) -> tuple[JobEngine, list[tuple[str, str]]]:
        events: list[tuple[str, str]] = []
        engine = JobEngine(JobLimits(**{"workers": 4, **limits}))
        engine.add_listener(lambda event_type, job, data: events.append((event_type, job.id)))
        await engine.start()
        engines.append(engine)
        return engine, events

    yield build
    for engine in engines:
        await engine.stop()


async def _wait_state(engine: JobEngine, job: Job, state: JobState, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while job.state is not state:
        assert time.monotonic() < deadline, f"job stayed {job.state.value}, expected {state.value}"
        await asyncio.sleep(0.01)


async def _wait_thread_event(event: threading.Event, timeout_s: float = 5.0) -> None:
    assert await asyncio.to_thread(event.wait, timeout_s)


async def test_engine_job_succeeds_with_ordered_events(make_engine):
    engine, events = await make_engine()
    job = engine.submit("forward", lambda progress: (progress("forward", 1, 2), progress("forward", 2, 2), 42)[-1],
                        model_id="m", seq_id=1)
    done = await engine.wait(job.id, 5.0)
    assert done.state is JobState.SUCCEEDED
    assert done.result == 42
    assert done.created_at <= done.started_at <= done.finished_at
    assert done.progress.to_dict()["fraction"] == 1.0
    types = [event_type for event_type, job_id in events if job_id == job.id]
    assert types[0] == "job.queued"
    assert types[1] == "job.started"
    assert types[-1] == "job.succeeded"


async def test_engine_cancel_running_stops_at_next_progress(make_engine):
    engine, _ = await make_engine()
    gate = Gate(steps=5, hold_at=3)
    job = engine.submit("forward_backward", gate, model_id="m", seq_id=1)
    await _wait_thread_event(gate.holding)
    engine.cancel(job.id)
    assert job.state is JobState.RUNNING
    assert job.cancel_requested
    gate.release.set()
    done = await engine.wait(job.id, 5.0)
    assert done.state is JobState.CANCELLED
    assert done.error["category"] == "user"
    assert "cancelled" in done.error["message"]
    assert gate.completed == 2  # step 3 ran its work, then its progress call raised


async def test_engine_cancel_is_idempotent(make_engine):
    engine, events = await make_engine()
    blocker = Gate(steps=1, hold_at=1)
    engine.submit("forward_backward", blocker, model_id="m", seq_id=1)
    queued = engine.submit("forward_backward", Gate(steps=1, hold_at=0), model_id="m", seq_id=2)
    first = engine.cancel(queued.id)
    second = engine.cancel(queued.id)
    assert first is second
    assert queued.state is JobState.CANCELLED
    assert [event_type for event_type, job_id in events if job_id == queued.id].count("job.cancelled") == 1
    blocker.release.set()


async def test_engine_cancelled_queued_seq_id_does_not_block_later(make_engine):
    engine, _ = await make_engine()
    blocker = Gate(steps=1, hold_at=1)
    first = engine.submit("forward_backward", blocker, model_id="m", seq_id=1)
    second = engine.submit("forward_backward", lambda progress: "second", model_id="m", seq_id=2)
    third = engine.submit("forward_backward", lambda progress: "third", model_id="m", seq_id=3)
    engine.cancel(second.id)
    blocker.release.set()
    assert (await engine.wait(third.id, 5.0)).state is JobState.SUCCEEDED
    assert first.state is JobState.SUCCEEDED
    assert second.state is JobState.CANCELLED
    assert second.started_at is None


async def test_engine_deadline_times_out_running_job(make_engine):
    engine, _ = await make_engine()
    job = engine.submit("forward_backward", Gate(steps=200, hold_at=0, step_s=0.01), model_id="m", seq_id=1,
                        timeout_s=0.2)
    done = await engine.wait(job.id, 5.0)
    assert done.state is JobState.TIMED_OUT
    assert "timed out" in done.error["message"]
    assert done.error["category"] == "user"
    assert done.finished_at - done.created_at < 2.0


async def test_engine_deadline_times_out_queued_job(make_engine):
    engine, _ = await make_engine(job_timeout_s=0.2)
    blocker = Gate(steps=1, hold_at=1)
    engine.submit("forward_backward", blocker, model_id="m", seq_id=1, timeout_s=30.0)
    queued = engine.submit("forward_backward", lambda progress: None, model_id="m", seq_id=2)
    done = await engine.wait(queued.id, 5.0)
    assert done.state is JobState.TIMED_OUT
    assert done.started_at is None
    blocker.release.set()


async def test_engine_work_finished_past_deadline_succeeds(make_engine):
    """The work applied its effect, so the job must not claim it stopped."""
    engine, _ = await make_engine()

    def slow_tail(progress):
        progress("optimizer step", 1, 1)
        time.sleep(0.3)  # past the deadline, with no progress call left
        return "applied"

    job = engine.submit("optim_step", slow_tail, model_id="m", seq_id=1, timeout_s=0.1)
    done = await engine.wait(job.id, 5.0)
    assert done.state is JobState.SUCCEEDED
    assert done.result == "applied"


async def test_engine_first_stop_reason_wins(make_engine):
    engine, _ = await make_engine()
    gate = Gate(steps=3, hold_at=2)
    job = engine.submit("forward_backward", gate, model_id="m", seq_id=1, timeout_s=0.1)
    await _wait_thread_event(gate.holding)
    await asyncio.sleep(0.2)  # the deadline passes while the work holds
    engine.cancel(job.id)
    gate.release.set()
    done = await engine.wait(job.id, 5.0)
    assert done.state is JobState.TIMED_OUT


async def test_engine_failure_keeps_error_category(make_engine):
    engine, _ = await make_engine()

    def bad_request(progress):
        raise UserError("token id 9 is outside the vocabulary")

    def crash(progress):
        raise RuntimeError("boom")

    user = engine.submit("forward", bad_request, model_id="m", seq_id=1)
    server = engine.submit("forward", crash, model_id="m", seq_id=2)
    assert (await engine.wait(user.id, 5.0)).error == {"message": "token id 9 is outside the vocabulary",
                                                      "category": "user"}
    done = await engine.wait(server.id, 5.0)
    assert done.state is JobState.FAILED
    assert done.error["category"] == "server"
    assert "RuntimeError: boom" in done.error["message"]


async def test_engine_out_of_order_submissions_run_in_order(make_engine):
    engine, _ = await make_engine()
    order: list[int] = []
    jobs = [engine.submit("forward_backward", lambda progress, seq=seq: order.append(seq), model_id="m", seq_id=seq)
            for seq in (3, 2, 1)]
    for job in jobs:
        await engine.wait(job.id, 5.0)
    assert order == [1, 2, 3]


async def test_engine_retried_seq_id_returns_first_job(make_engine):
    engine, _ = await make_engine()
    runs: list[int] = []
    first = engine.submit("forward_backward", lambda progress: runs.append(1), model_id="m", seq_id=1)
    retry = engine.submit("forward_backward", lambda progress: runs.append(2), model_id="m", seq_id=1)
    assert retry is first
    await engine.wait(first.id, 5.0)
    assert runs == [1]


async def test_engine_gap_timeout_runs_next_seq_id(make_engine):
    engine, _ = await make_engine(seq_gap_timeout_s=0.2)
    started = time.monotonic()
    job = engine.submit("forward_backward", lambda progress: None, model_id="m", seq_id=2)
    done = await engine.wait(job.id, 5.0)
    assert done.state is JobState.SUCCEEDED
    assert 0.15 < time.monotonic() - started < 2.0


async def test_engine_rejected_seq_id_does_not_block(make_engine):
    engine, _ = await make_engine(seq_gap_timeout_s=30.0)
    engine.submit("create_model", lambda progress: None, model_id="m", ordered=False)
    engine.reject_seq("m", 1)
    job = engine.submit("forward_backward", lambda progress: None, model_id="m", seq_id=2)
    assert (await engine.wait(job.id, 2.0)).state is JobState.SUCCEEDED


async def test_engine_reject_seq_of_unknown_model_opens_no_lane(make_engine):
    engine, _ = await make_engine()
    engine.reject_seq("model-does-not-exist", 1)
    assert engine.queued_by_model() == {}


async def test_engine_per_model_and_total_limits_raise_queue_full(make_engine):
    engine, _ = await make_engine(max_queued_per_model=2, max_queued_total=3)
    blocker = Gate(steps=1, hold_at=1)
    engine.submit("forward_backward", blocker, model_id="a", seq_id=1)
    await _wait_thread_event(blocker.holding)
    engine.submit("forward_backward", lambda progress: None, model_id="a", seq_id=2)
    engine.submit("forward_backward", lambda progress: None, model_id="a", seq_id=3)
    with pytest.raises(QueueFullError) as per_model:
        engine.submit("forward_backward", lambda progress: None, model_id="a", seq_id=4)
    assert "model a" in per_model.value.message
    assert per_model.value.retry_after_s > 0
    engine.reject_seq("a", 4)

    other = Gate(steps=1, hold_at=1)
    engine.submit("forward_backward", other, model_id="b", seq_id=1)
    await _wait_thread_event(other.holding)
    engine.submit("forward_backward", lambda progress: None, model_id="b", seq_id=2)
    with pytest.raises(QueueFullError) as total:
        engine.submit("forward_backward", lambda progress: None, model_id="b", seq_id=3)
    assert "server" in total.value.message
    engine.reject_seq("b", 3)
    blocker.release.set()
    other.release.set()


async def test_engine_queue_full_seq_id_keeps_its_place(make_engine):
    """A 429 seq_id is sent again by the client, so later seq_ids wait for it instead of passing it."""
    engine, _ = await make_engine(max_queued_per_model=1)
    order: list[int] = []
    blocker = Gate(steps=1, hold_at=1)
    engine.submit("forward_backward", blocker, model_id="m", seq_id=1)
    await _wait_thread_event(blocker.holding)
    engine.submit("forward_backward", lambda progress: order.append(2), model_id="m", seq_id=2)
    with pytest.raises(QueueFullError):
        engine.submit("forward_backward", lambda progress: order.append(3), model_id="m", seq_id=3)
    engine.reject_seq("m", 3)  # what the API layer does after any rejection
    blocker.release.set()
    await _wait_state(engine, engine.list_jobs(model_id="m")[0], JobState.SUCCEEDED)

    # seq_id 4 arrives before the retry of 3; it must wait.
    fourth = engine.submit("forward_backward", lambda progress: order.append(4), model_id="m", seq_id=4)
    await asyncio.sleep(0.1)
    assert fourth.state is JobState.QUEUED
    # The queue is full with seq_id 4, but the retry of 3 fills the gap that 4 waits on.
    third = engine.submit("forward_backward", lambda progress: order.append(3), model_id="m", seq_id=3)
    await engine.wait(fourth.id, 5.0)
    assert third.state is JobState.SUCCEEDED
    assert order == [2, 3, 4]


async def test_engine_cancels_queued_work_of_session(make_engine):
    engine, _ = await make_engine()
    blocker = Gate(steps=1, hold_at=1)
    running = engine.submit("forward_backward", blocker, model_id="m", seq_id=1, session_id="s1")
    await _wait_thread_event(blocker.holding)
    queued = [engine.submit("forward_backward", lambda progress: None, model_id="m", seq_id=seq, session_id="s1")
              for seq in (2, 3)]
    other = engine.submit("forward_backward", lambda progress: None, model_id="m", seq_id=4, session_id="s2")
    assert engine.cancel_queued_of_session("s1", "session s1 expired") == 2
    assert all(job.state is JobState.CANCELLED for job in queued)
    assert queued[0].error["message"] == "session s1 expired"
    assert running.state is JobState.RUNNING
    blocker.release.set()
    assert (await engine.wait(other.id, 5.0)).state is JobState.SUCCEEDED


async def test_engine_listener_failure_does_not_break_jobs(make_engine):
    engine, _ = await make_engine()

    def broken(event_type, job, data):
        raise RuntimeError("listener bug")

    engine.add_listener(broken)
    job = engine.submit("forward", lambda progress: "ok", model_id="m", seq_id=1)
    assert (await engine.wait(job.id, 5.0)).state is JobState.SUCCEEDED


async def test_engine_ended_job_drops_deadline_timer(make_engine):
    engine, _ = await make_engine()
    job = engine.submit("forward", lambda progress: None, model_id="m", seq_id=1, timeout_s=3600.0)
    assert job.deadline_timer is not None
    await engine.wait(job.id, 5.0)
    assert job.deadline_timer is None


async def test_engine_drops_results_after_retention(make_engine):
    engine, _ = await make_engine(retention_s=0.05)
    job = engine.submit("forward", lambda progress: None, model_id="m", seq_id=1)
    await engine.wait(job.id, 5.0)
    assert engine.get(job.id) is job
    await asyncio.sleep(0.1)
    engine.drop_expired()  # the engine's own sweeper, every retention_s / 4, may have dropped it already
    with pytest.raises(LookupError):
        engine.get(job.id)
