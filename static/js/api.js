// REST calls to /api/v1 with the API key, and the key form for servers that require one.

const KEY_STORAGE = "trainpulse.apiKey";
const API = "/api/v1";

let pendingKeyRequest = null;
let keyDialogReady = false;

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export async function getJson(path) {
  return request("GET", path);
}

export async function postJson(path, body) {
  return request("POST", path, body);
}

// Returns the events URL with the key as a query parameter, because EventSource cannot set headers.
export function eventsUrl(lastEventId) {
  const params = new URLSearchParams();
  const key = apiKey();
  if (key) params.set("api_key", key);
  if (lastEventId !== null && lastEventId !== undefined) params.set("last_event_id", String(lastEventId));
  const query = params.toString();
  return `${API}/events${query ? "?" + query : ""}`;
}

// Sends one request. After a 401 it shows the key form, then repeats the request with the new key.
async function request(method, path, body) {
  for (;;) {
    const response = await send(method, path, body);
    if (response.status === 401) {
      await requestApiKey(apiKey() ? "The stored key was rejected. Enter a valid key." : "");
      continue;
    }
    const payload = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, payload);
    return payload;
  }
}

function send(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  return fetch(API + path, init);
}

// Shows the key form and resolves once the user submits a key. Concurrent 401s share one form.
export function requestApiKey(message) {
  if (pendingKeyRequest) return pendingKeyRequest;
  const dialog = document.getElementById("api-key-dialog");
  const form = document.getElementById("api-key-form");
  const input = document.getElementById("api-key-input");
  const error = document.getElementById("api-key-error");

  if (!keyDialogReady) {
    // The form stays open until a key is given, because every call would fail without one.
    dialog.addEventListener("cancel", (event) => event.preventDefault());
    keyDialogReady = true;
  }
  error.hidden = !message;
  error.textContent = message || "";
  input.value = "";
  pendingKeyRequest = new Promise((resolve) => {
    const onSubmit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      form.removeEventListener("submit", onSubmit);
      dialog.close();
      pendingKeyRequest = null;
      resolve(key);
    };
    form.addEventListener("submit", onSubmit);
  });
  dialog.showModal();
  input.focus();
  return pendingKeyRequest;
}
