// The one multiplexed EventSource on /api/v1/events, with resume, resync and restart handling.
//
// Every frame carries an `id:` line, so the browser's own reconnect sends Last-Event-ID and the
// server replays what was missed. A `resync` event, a server restart or a stream that the browser
// gave up on means that events were lost, and the owner reloads its state through REST.

import { eventsUrl, getJson } from "./api.js";

const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 15000;

export class EventStream {
  // onEvent(envelope) receives every event, and onResync() must reload state. onState(text)
  // receives "connecting", "live" or "offline".
  constructor({ onEvent, onResync, onState }) {
    this.onEvent = onEvent;
    this.onResync = onResync;
    this.onState = onState;
    this.source = null;
    this.lastEventId = null;
    this.retryMs = RETRY_MIN_MS;
    this.retryTimer = null;
    this.received = 0;
  }

  open() {
    this.close();
    this.onState("connecting");
    const source = new EventSource(eventsUrl(this.lastEventId));
    source.onopen = () => {
      this.retryMs = RETRY_MIN_MS;
      this.onState("live");
    };
    source.onmessage = (message) => this.handleMessage(message);
    source.onerror = () => this.handleError(source);
    this.source = source;
  }

  close() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  }

  // Starts over without a resume point, for a server that restarted and numbers events from 1 again.
  restart() {
    this.lastEventId = null;
    this.open();
    this.onResync();
  }

  handleMessage(message) {
    let envelope;
    try {
      envelope = JSON.parse(message.data);
    } catch (error) {
      console.warn("trainpulse: skipped an event that is not JSON", error);
      return;
    }
    if (typeof envelope.id === "number") this.lastEventId = envelope.id;
    this.received += 1;

    if (envelope.type === "resync") {
      this.onResync();
      return;
    }
    if (envelope.type === "server.shutdown") {
      // The server stops, and its successor numbers events from 1, so a resume id would be wrong.
      this.close();
      this.onState("offline");
      this.scheduleRestart();
      return;
    }
    // stream.lagged ends the response, and the browser reconnects with that event's id.
    this.onEvent(envelope);
  }

  handleError(source) {
    if (source !== this.source) return;
    if (source.readyState === EventSource.CONNECTING) {
      this.onState("connecting");
      return;
    }
    // CLOSED: the browser stopped retrying after an HTTP error (401, 5xx) or a wrong content type.
    this.close();
    this.onState("offline");
    this.scheduleReopen();
  }

  scheduleReopen() {
    this.retryTimer = setTimeout(async () => {
      if (await this.isServerReachable()) this.open();
      else this.scheduleReopen();
    }, this.nextDelay());
  }

  scheduleRestart() {
    this.retryTimer = setTimeout(async () => {
      if (await this.isServerReachable()) this.restart();
      else this.scheduleRestart();
    }, this.nextDelay());
  }

  // A status call also brings up the key form when the server returns 401.
  async isServerReachable() {
    try {
      await getJson("/status");
      return true;
    } catch (error) {
      return false;
    }
  }

  nextDelay() {
    const delay = this.retryMs;
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
    return delay;
  }
}
