"""Every HTTP and WebSocket route of the server, in one table.

Paths are relative to /api/v1. A `job` endpoint returns {request_id} at once and runs as a
background job; an `ordered` one carries a model seq_id that its lane must see even when the
request is rejected.
"""

from __future__ import annotations

from . import futures, jobs, live, models, prometheus, sampling, schemas, service, sessions, sft, training
from .registrar import Endpoint

ENDPOINTS: list[Endpoint] = [
    # Handshake and housekeeping
    Endpoint("healthz", "GET", "/healthz", service.healthz),
    Endpoint("client_config", "POST", "/client/config", service.client_config, schemas.ClientConfigRequest),
    Endpoint("dynamic_config", "POST", "/client/dynamic_config", service.client_config, schemas.EmptyRequest),
    Endpoint("server_capabilities", "GET", "/get_server_capabilities", service.server_capabilities),
    Endpoint("telemetry", "POST", "/telemetry", service.telemetry, schemas.TelemetryRequest),
    Endpoint("status", "GET", "/status", service.status),
    Endpoint("prometheus_metrics", "GET", "!/metrics", prometheus.metrics),
    # Sessions
    Endpoint("create_session", "POST", "/create_session", sessions.create_session, schemas.CreateSessionRequest),
    Endpoint("session_heartbeat", "POST", "/session_heartbeat", sessions.heartbeat, schemas.SessionRequest),
    Endpoint("finish_session", "POST", "/sessions/<session_id>/finish", sessions.finish),
    Endpoint("get_session", "GET", "/sessions/<session_id>", sessions.get_session),
    Endpoint("list_sessions", "GET", "/sessions", sessions.list_sessions),
    # Models
    Endpoint("create_model", "POST", "/create_model", models.create_model, schemas.CreateModelRequest, job=True),
    Endpoint("get_info", "POST", "/get_info", models.get_info, schemas.ModelRequest),
    Endpoint("unload_model", "POST", "/unload_model", models.unload_model, schemas.ModelRequest, job=True),
    Endpoint("list_models", "GET", "/models", models.list_models),
    Endpoint("get_model", "GET", "/models/<model_id>", models.get_model),
    Endpoint("metric_history", "GET", "/models/<model_id>/metrics", models.metric_history),
    Endpoint("weights_info", "POST", "/weights_info", models.weights_info, schemas.WeightsInfoRequest),
    Endpoint("list_checkpoints", "GET", "/training_runs/<model_id>/checkpoints", models.list_checkpoints),
    # Training
    Endpoint("forward", "POST", "/forward", training.forward, schemas.ForwardRequest, job=True,
             ordered=True),
    Endpoint("forward_backward", "POST", "/forward_backward", training.forward_backward,
             schemas.ForwardBackwardRequest, job=True, ordered=True),
    Endpoint("optim_step", "POST", "/optim_step", training.optim_step, schemas.OptimStepRequest, job=True,
             ordered=True),
    Endpoint("save_weights", "POST", "/save_weights", training.save_weights, schemas.SaveWeightsRequest, job=True,
             ordered=True),
    Endpoint("save_weights_for_sampler", "POST", "/save_weights_for_sampler", training.save_weights_for_sampler,
             schemas.SaveWeightsForSamplerRequest, job=True, ordered=True),
    Endpoint("load_weights", "POST", "/load_weights", training.load_weights, schemas.LoadWeightsRequest, job=True,
             ordered=True),
    # Sampling
    Endpoint("create_sampling_session", "POST", "/create_sampling_session", sampling.create_sampling_session,
             schemas.CreateSamplingSessionRequest),
    Endpoint("get_sampler", "GET", "/samplers/<sampler_id>", sampling.get_sampler),
    Endpoint("asample", "POST", "/asample", sampling.sample, schemas.SampleRequest, job=True,
             aliases=("/api/v1/sample",)),
    # Futures and jobs
    Endpoint("retrieve_future", "POST", "/retrieve_future", futures.retrieve_future, schemas.RetrieveFutureRequest),
    Endpoint("cancel_future", "POST", "/cancel_future", futures.cancel_future, schemas.CancelFutureRequest),
    Endpoint("list_jobs", "GET", "/jobs", jobs.list_jobs),
    Endpoint("submit_job", "POST", "/jobs", sft.submit_job, sft.SftJobRequest),
    Endpoint("get_job", "GET", "/jobs/<job_id>", jobs.get_job),
    Endpoint("cancel_job", "POST", "/jobs/<job_id>/cancel", jobs.cancel_job),
    # Live events
    Endpoint("events", "GET", "/events", live.events),
    Endpoint("job_events", "GET", "/jobs/<job_id>/events", live.job_events),
    Endpoint("events_websocket", "WEBSOCKET", "/ws", live.events_websocket),
]
