// Dashboard entry point: loads state through REST, then follows the event stream.

import { getJson } from "./api.js";
import { ChartsView } from "./charts.js";
import { EventStream } from "./events.js";
import { formatDuration } from "./format.js";
import { JobTable } from "./jobs.js";
import { MetricStore } from "./metrics.js";
import { RunsPanel } from "./runs.js";
import { FrameScheduler } from "./scheduler.js";

const STATUS_POLL_MS = 3000;
// A job that starts or ends refreshes the status after this delay, and events within it share one refresh.
const STATUS_AFTER_EVENT_MS = 1000;
const STATUS_EVENTS = new Set(["job.queued", "job.started", "job.succeeded", "job.failed", "job.cancelled",
  "job.timed_out", "model.created", "model.unloaded"]);

const scheduler = new FrameScheduler(draw);
const jobs = new JobTable(scheduler);
const store = new MetricStore((modelId) => charts.markModel(modelId));
const charts = new ChartsView(store, scheduler);
const runs = new RunsPanel(store, charts, scheduler);
const stream = new EventStream({ onEvent: handleEvent, onResync: reload, onState: showConnection });

// Events that arrive while REST state loads wait here, so no event is applied to a state that
// the REST response then overwrites.
let pendingEvents = [];
let loading = null;
let lastUptimeS = null;
let statusTimer = null;

function draw() {
  jobs.render(Date.now() / 1000);
  runs.render();
  charts.render();
}

function handleEvent(envelope) {
  if (pendingEvents) {
    pendingEvents.push(envelope);
    return;
  }
  applyEvent(envelope);
}

function applyEvent(envelope) {
  const { type, model_id: modelId, data } = envelope;
  if (type.startsWith("job.")) jobs.apply(envelope);
  if (type === "job.metrics" && modelId && data && data.metrics) {
    store.addStep(modelId, data.step, envelope.time, data.metrics);
    runs.noteStep(modelId, data.step);
  } else if (type === "model.created" && data && data.model_id) {
    runs.addModel(data);
  } else if (type === "checkpoint.saved" && modelId) {
    runs.onCheckpointSaved(modelId);
  }
  if (STATUS_EVENTS.has(type) && statusTimer === null) {
    statusTimer = setTimeout(() => {
      statusTimer = null;
      refreshStatus();
    }, STATUS_AFTER_EVENT_MS);
  }
  scheduler.request();
}

// Reloads jobs, models and the selected models' history. Overlapping calls share one reload.
function reload() {
  if (loading) return loading;
  pendingEvents = pendingEvents || [];
  loading = (async () => {
    try {
      await Promise.all([jobs.reload(), runs.reload(), refreshStatus()]);
    } catch (error) {
      console.warn("trainpulse: reload failed", error);
    } finally {
      const queued = pendingEvents;
      pendingEvents = null;
      loading = null;
      for (const envelope of queued) applyEvent(envelope);
      scheduler.request();
    }
  })();
  return loading;
}

async function refreshStatus() {
  if (document.hidden) return;
  let status;
  try {
    status = await getJson("/status");
  } catch (error) {
    showConnection("offline");
    return;
  }
  setText("status-models", status.models_loaded);
  setText("status-running", status.jobs_running);
  setText("status-queued", status.jobs_queued);
  setText("status-subscribers", status.subscribers);
  setText("status-uptime", formatDuration(status.uptime_s));
  // A smaller uptime means a new server process, whose event ids start again at 1.
  if (lastUptimeS !== null && status.uptime_s < lastUptimeS) stream.restart();
  lastUptimeS = status.uptime_s;
}

function showConnection(state) {
  const element = document.getElementById("status-connection");
  element.dataset.state = state;
  element.textContent = state;
}

function setText(id, value) {
  document.getElementById(id).textContent = value === undefined || value === null ? "–" : String(value);
}

function wireControls() {
  const slider = document.getElementById("smoothing");
  const output = document.getElementById("smoothing-value");
  slider.addEventListener("input", () => {
    const weight = Number(slider.value);
    output.textContent = weight.toFixed(2);
    charts.setSmoothing(weight);
  });
  document.getElementById("x-axis").addEventListener("change", (event) => charts.setXMode(event.target.value));
  document.getElementById("reset-zoom").addEventListener("click", () => charts.resetZoom());
}

function start() {
  wireControls();
  // The stream opens before the REST reads, so no event falls between the two.
  stream.open();
  reload();
  setInterval(refreshStatus, STATUS_POLL_MS);
  // Elapsed times of running jobs move on between events.
  setInterval(() => {
    if (jobs.hasActive()) scheduler.request();
  }, 1000);
}

// Test and debugging aid, read by tests/test_dashboard.py.
window.trainpulse = {
  jobs, store, charts, runs, stream, scheduler,
  ready: () => pendingEvents === null && loading === null,
  seriesLength: (modelId, name) => (store.series(modelId, name) || { length: 0 }).length,
  chartPoints: (name) => charts.pointCount(name),
};

start();
