// The page's small pieces: elements built from data as text (never HTML), number formats, and
// the life of a view (its streams end when the user goes elsewhere).

import { ApiError } from "./api.js";

export const main = document.querySelector("main");
export const STATUSES = ["queued", "running", "success", "failed", "cancelled", "paused"];
let leaving = new AbortController();

/** A new view: the previous one's streams are aborted. */
export function enterView() {
  leaving.abort();
  leaving = new AbortController();
}

/** Aborted when the current view is left. */
export const viewSignal = () => leaving.signal;

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const num = (v, digits = 4) => (v === undefined || v === null ? "–" : Number(v).toFixed(digits));
export const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
export const size = (b) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(2)} GiB` : `${(b / 2 ** 20).toFixed(1)} MiB`);
export function duration(s) {
  if (s === undefined || s === null) return "–";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

export function problem(error) {
  return h("p", { class: "error", role: "alert" }, error instanceof ApiError ? `${error.message} (HTTP ${error.status})` : String(error));
}

export function show(...nodes) {
  main.replaceChildren(...nodes);
  main.focus({ preventScroll: true });
}

export function statusBadge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function progressBar(iteration, total) {
  const value = total ? Math.min(iteration / total, 1) : 0;
  return h("progress", { max: 1, value, "aria-label": `${iteration ?? 0} of ${total ?? "?"} iterations` });
}
