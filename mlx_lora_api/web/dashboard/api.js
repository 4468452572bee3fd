// The service's public API, as the page calls it: JSON over fetch, Server-Sent Events read from
// a fetch stream (EventSource cannot send the API key), the key kept in sessionStorage.

const KEY = "mlx-lora-api.key";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => (value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY)),
};

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function headers(extra = {}) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export async function call(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data?.message ?? data?.error?.message ?? (text || response.statusText);
    if (response.status === 401) window.dispatchEvent(new CustomEvent("api-key-needed", { detail: message }));
    throw new ApiError(response.status, message, data);
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
export const del = (path) => call("DELETE", path);

// Server-Sent Events from `path`: calls onEvent({id, event, data}) for each, until the stream
// ends or `signal` aborts. Resolves when the stream ends.
export async function stream(path, onEvent, { signal, lastEventId, method = "GET", body } = {}) {
  const extra = lastEventId ? { "Last-Event-ID": String(lastEventId) } : {};
  if (body !== undefined) extra["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers: headers(extra),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    let message = response.statusText;
    try {
      const data = await response.json();
      message = data?.message ?? data?.error?.message ?? message;
    } catch {
      // not JSON: the status text says it
    }
    if (response.status === 401) window.dispatchEvent(new CustomEvent("api-key-needed", { detail: message }));
    throw new ApiError(response.status, message);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let current = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (current.data !== undefined) onEvent({ ...current, data: JSON.parse(current.data) });
        current = {};
      } else if (line.startsWith("data:")) {
        current.data = (current.data === undefined ? "" : current.data + "\n") + line.slice(5).trimStart();
      } else if (line.startsWith("event:")) {
        current.event = line.slice(6).trim();
      } else if (line.startsWith("id:")) {
        current.id = line.slice(3).trim();
      }
    }
  }
}
