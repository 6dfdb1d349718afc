"""Job states, kinds and phases: the names that go straight into JSON responses and events."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"  # accepted, waiting for its lane or a worker thread
    RUNNING = "running"  # a worker thread is executing it
    SUCCEEDED = "succeeded"  # finished; the result is readable until the retention ends
    FAILED = "failed"  # finished with an error {message, category}
    CANCELLED = "cancelled"  # stopped by a user before it finished
    TIMED_OUT = "timed_out"  # stopped because it passed its deadline


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT})


class JobKind(str, Enum):
    CREATE_MODEL = "create_model"
    FORWARD = "forward"
    FORWARD_BACKWARD = "forward_backward"
    OPTIM_STEP = "optim_step"
    SAVE_WEIGHTS = "save_weights"
    SAVE_WEIGHTS_FOR_SAMPLER = "save_weights_for_sampler"
    LOAD_WEIGHTS = "load_weights"
    SAMPLE = "sample"
    UNLOAD_MODEL = "unload_model"
    SFT = "sft"


class Phase:
    QUEUED = "queued"
    STARTED = "started"
    PREPARING = "preparing batch"
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer step"
    SAVING = "saving"
    LOADING = "loading"
    SAMPLING = "sampling"
    DONE = "done"


SHUTDOWN_MESSAGE = "the server shut down while this job was running; submit it again"
RESTART_MESSAGE = "the server restarted while this job was queued or running; submit it again"
