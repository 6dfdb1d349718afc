// The job table: records from REST, updated live by job.* events, newest first and bounded.

import { getJson, postJson } from "./api.js";
import { formatDuration, shortId } from "./format.js";

export const MAX_JOBS = 200;
// Rows in the page at first. Every row repaints when a new job pushes the table down, so a
// short table keeps a busy server cheap to watch. "Show more" adds rows up to MAX_JOBS.
export const PAGE_ROWS = 25;
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);
const FULL_RECORD_EVENTS = new Set(["job.queued", "job.succeeded", "job.failed", "job.cancelled", "job.timed_out"]);

export class JobTable {
  constructor(scheduler) {
    this.scheduler = scheduler;
    this.jobs = new Map(); // id -> record
    this.rows = new Map(); // id -> row elements
    this.dirty = new Set();
    this.orderChanged = true;
    this.fetching = new Set();
    this.body = document.getElementById("jobs-body");
    this.empty = document.getElementById("jobs-empty");
    this.count = document.getElementById("jobs-count");
    this.rowLimit = PAGE_ROWS;
    this.moreButton = document.getElementById("jobs-more");
    this.moreButton.addEventListener("click", () => {
      this.rowLimit = Math.min(MAX_JOBS, this.rowLimit + PAGE_ROWS);
      this.orderChanged = true;
      this.scheduler.request();
    });
  }

  async reload() {
    const page = await getJson(`/jobs?limit=${MAX_JOBS}`);
    this.jobs.clear();
    for (const record of page.jobs) this.jobs.set(record.id, record);
    this.total = page.total;
    this.markAll();
  }

  apply(envelope) {
    const { type, job_id: id, data } = envelope;
    if (!id) return;
    if (FULL_RECORD_EVENTS.has(type)) {
      this.upsert(data);
      return;
    }
    const record = this.jobs.get(id);
    if (!record) {
      this.fetchMissing(id);
      return;
    }
    // A record that REST already shows as finished must not go back to an older live state.
    if (TERMINAL.has(record.state)) return;

    if (type === "job.started") {
      record.state = data.state;
      record.started_at = data.started_at;
      record.queue_position = null;
    } else if (type === "job.phase") {
      record.phase = data.phase;
    } else if (type === "job.progress") {
      record.phase = data.phase;
      record.progress = { completed: data.completed, total: data.total, fraction: data.fraction, eta_s: data.eta_s };
      if (data.cancel_requested) record.cancel_requested = true;
    } else if (type === "job.metrics") {
      record.metrics = { ...record.metrics, ...data.metrics };
    } else {
      return;
    }
    record.updated_at = envelope.time;
    this.markRow(id);
  }

  upsert(record) {
    const known = this.jobs.get(record.id);
    if (known && TERMINAL.has(known.state) && !TERMINAL.has(record.state)) return;
    // A finished job moves from the unfinished group to the finished one.
    if (!known || TERMINAL.has(known.state) !== TERMINAL.has(record.state)) this.orderChanged = true;
    this.jobs.set(record.id, record);
    this.markRow(record.id);
  }

  // Loads a job whose job.queued event this page never saw, such as one queued before a resync.
  async fetchMissing(id) {
    if (this.fetching.has(id)) return;
    this.fetching.add(id);
    try {
      this.upsert(await getJson(`/jobs/${encodeURIComponent(id)}`));
    } catch (error) {
      console.warn("trainpulse: could not load job", id, error);
    } finally {
      this.fetching.delete(id);
    }
  }

  async cancel(id, button) {
    button.disabled = true;
    button.textContent = "Cancelling…";
    try {
      this.upsert(await postJson(`/jobs/${encodeURIComponent(id)}/cancel`));
    } catch (error) {
      button.disabled = false;
      button.textContent = "Cancel";
      button.title = `Cancel failed: ${error.message}`;
    }
  }

  countFinished(ids) {
    return ids.filter((id) => TERMINAL.has(this.jobs.get(id).state)).length;
  }

  hasActive() {
    for (const record of this.jobs.values()) if (!TERMINAL.has(record.state)) return true;
    return false;
  }

  markRow(id) {
    this.dirty.add(id);
    this.scheduler.request();
  }

  markAll() {
    this.orderChanged = true;
    for (const id of this.jobs.keys()) this.dirty.add(id);
    this.scheduler.request();
  }

  // Returns the ids to keep, unfinished jobs first, each group newest first. Every unfinished job
  // stays, and the newest finished ones fill the rest of MAX_JOBS.
  keptIds() {
    const records = [...this.jobs.values()].sort(
      (a, b) => TERMINAL.has(a.state) - TERMINAL.has(b.state) || b.created_at - a.created_at);
    let finishedSlots = MAX_JOBS - records.filter((record) => !TERMINAL.has(record.state)).length;
    const visible = [];
    for (const record of records) {
      if (!TERMINAL.has(record.state)) {
        visible.push(record.id);
      } else if (finishedSlots > 0) {
        visible.push(record.id);
        finishedSlots -= 1;
      } else {
        this.jobs.delete(record.id);
      }
    }
    return visible;
  }

  render(nowS) {
    if (this.orderChanged) {
      this.renderOrder();
      this.orderChanged = false;
    }
    for (const id of this.dirty) {
      const record = this.jobs.get(id);
      const row = this.rows.get(id);
      if (record && row) updateRow(row, record, nowS);
    }
    this.dirty.clear();
    // Elapsed time moves on for running jobs even without events.
    for (const [id, row] of this.rows) {
      const record = this.jobs.get(id);
      if (record && record.state === "running") setText(row.elapsed, formatDuration(elapsedS(record, nowS)));
    }
  }

  renderOrder() {
    const kept = this.keptIds();
    const ids = kept.slice(0, Math.max(this.rowLimit, kept.length - this.countFinished(kept)));
    const shown = new Set(ids);
    for (const [id, row] of this.rows) {
      if (!shown.has(id)) {
        row.tr.remove();
        this.rows.delete(id);
      }
    }
    let previous = null;
    for (const id of ids) {
      let row = this.rows.get(id);
      if (!row) {
        row = createRow(id, (button) => this.cancel(id, button));
        this.rows.set(id, row);
        this.dirty.add(id);
      }
      const expectedPosition = previous ? previous.nextSibling : this.body.firstChild;
      if (row.tr !== expectedPosition) this.body.insertBefore(row.tr, expectedPosition);
      previous = row.tr;
    }
    this.empty.hidden = ids.length > 0;
    this.count.textContent = kept.length ? `${ids.length} of ${kept.length} shown · unfinished first, then newest` : "";
    this.moreButton.hidden = ids.length >= kept.length;
  }
}

function createRow(id, onCancel) {
  const tr = document.createElement("tr");
  tr.dataset.jobId = id;
  const cell = (label) => {
    const td = document.createElement("td");
    td.dataset.label = label;
    tr.appendChild(td);
    return td;
  };
  const kind = cell("Kind");
  const model = cell("Model");
  model.className = "job-model";
  const stateCell = cell("State");
  const stateWrap = document.createElement("div");
  const state = document.createElement("span");
  state.className = "state";
  const error = document.createElement("div");
  error.className = "job-error";
  stateWrap.append(state, error);
  stateCell.appendChild(stateWrap);
  const phase = cell("Phase");
  const progressCell = cell("Progress");
  progressCell.innerHTML =
    '<div class="progress"><div class="progress-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100">' +
    '<div class="progress-fill"></div></div><span class="progress-text"></span></div>';
  const elapsed = cell("Elapsed");
  const actions = cell("");
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "cancel";
  cancel.textContent = "Cancel";
  cancel.addEventListener("click", () => onCancel(cancel));
  actions.appendChild(cancel);
  return {
    tr, kind, model, state, error, phase, elapsed, cancel,
    bar: progressCell.querySelector(".progress-bar"),
    fill: progressCell.querySelector(".progress-fill"),
    progressText: progressCell.querySelector(".progress-text"),
  };
}

function updateRow(row, record, nowS) {
  row.tr.dataset.state = record.state;
  setText(row.kind, record.kind);
  setText(row.model, record.model_id ? shortId(record.model_id) : "–");
  row.model.title = record.model_id || "";
  setText(row.state, stateText(record));
  row.state.dataset.state = record.state;
  setText(row.error, record.error && record.state !== "cancelled" ? record.error.message : "");
  setText(row.phase, record.phase || "");

  const percent = progressPercent(record);
  const width = `${percent}%`;
  if (row.fill.style.width !== width) row.fill.style.width = width;
  row.fill.dataset.state = record.state;
  row.bar.setAttribute("aria-valuenow", String(Math.round(percent)));
  setText(row.progressText, progressText(record));
  setText(row.elapsed, formatDuration(elapsedS(record, nowS)));

  const active = !TERMINAL.has(record.state);
  row.cancel.hidden = !active;
  if (active && record.cancel_requested) {
    row.cancel.disabled = true;
    setText(row.cancel, "Cancelling…");
  }
}

// Writes only changed text, because every write invalidates the layout of the table.
function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

function stateText(record) {
  if (record.state === "queued" && record.queue_position !== null && record.queue_position !== undefined) {
    return `queued #${record.queue_position + 1}`;
  }
  return record.state.replace("_", " ");
}

function progressPercent(record) {
  if (record.state === "succeeded") return 100;
  const fraction = record.progress ? record.progress.fraction : 0;
  return Math.max(0, Math.min(100, (fraction || 0) * 100));
}

function progressText(record) {
  const progress = record.progress || {};
  if (!progress.total) return record.state === "succeeded" ? "done" : "";
  const parts = [`${progress.completed}/${progress.total}`];
  if (record.state === "running" && progress.eta_s !== null && progress.eta_s !== undefined) {
    parts.push(`ETA ${formatDuration(progress.eta_s)}`);
  }
  return parts.join(" · ");
}

function elapsedS(record, nowS) {
  if (!record.started_at) return null;
  const end = record.finished_at || nowS;
  return Math.max(0, end - record.started_at);
}
