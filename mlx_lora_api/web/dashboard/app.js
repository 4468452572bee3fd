// The dashboard: routes (#/jobs, #/jobs/ID, #/models, #/new, #/playground) to their views, and
// asks for the API key when the service wants one. Every number comes from the public API.

import { apiKey } from "./api.js";
import { enterView, h } from "./dom.js";
import { jobView } from "./views/job.js";
import { jobsView } from "./views/jobs.js";
import { modelsView } from "./views/models.js";
import { newView } from "./views/new.js";
import { playgroundView } from "./views/playground.js";

function keyDialog(reason) {
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true });
  const dialog = h(
    "dialog",
    { id: "key-dialog", "aria-labelledby": "key-title" },
    h(
      "form",
      {
        method: "dialog",
        onsubmit: () => {
          apiKey.set(input.value.trim());
          dialog.remove();
          route();
        },
      },
      h("h2", { id: "key-title" }, "API key"),
      h("p", {}, reason ?? "This service needs its API key."),
      h("label", { for: "api-key" }, "Key "),
      input,
      h("button", { type: "submit" }, "Use it"),
      h("p", { class: "muted" }, "Kept in this tab only (sessionStorage)."),
    ),
  );
  document.body.append(dialog);
  dialog.showModal();
}
window.addEventListener("api-key-needed", (e) => document.getElementById("key-dialog") || keyDialog(e.detail));

function route() {
  enterView();
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query ?? "");
  const parts = path.split("/").filter(Boolean);
  for (const link of document.querySelectorAll("nav a")) link.toggleAttribute("aria-current", link.getAttribute("href") === `#/${parts[0] ?? "jobs"}`);
  if (parts[0] === "jobs" && parts[1]) return jobView(decodeURIComponent(parts[1]));
  if (parts[0] === "models") return modelsView();
  if (parts[0] === "new") return newView();
  if (parts[0] === "playground") return playgroundView(params);
  return jobsView(params);
}

window.addEventListener("hashchange", route);
route();
