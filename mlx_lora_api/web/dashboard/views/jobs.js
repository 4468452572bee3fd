// Jobs, live: every job's events over one stream (GET /jobs/events).

import { get, stream } from "../api.js";
import { sparkline } from "../charts.js";
import { STATUSES, duration, h, main, num, problem, progressBar, show, statusBadge, viewSignal } from "../dom.js";

export async function jobsView(params) {
  const filter = params.get("status") ?? "";
  const select = h(
    "select",
    { id: "status-filter", onchange: (e) => (location.hash = e.target.value ? `#/jobs?status=${e.target.value}` : "#/jobs") },
    h("option", { value: "" }, "every status"),
    STATUSES.map((s) => h("option", { value: s, selected: s === filter }, s)),
  );
  const body = h("tbody");
  const table = h(
    "table",
    { class: "jobs" },
    h("thead", {}, h("tr", {}, ["job", "kind", "status", "progress", "epoch", "loss", "ETA", "", "model"].map((c) => h("th", { scope: "col" }, c)))),
    body,
  );
  show(h("h1", {}, "Jobs"), h("p", {}, h("label", { for: "status-filter" }, "Show "), select, " ", h("a", { href: "#/new", class: "button" }, "New fine-tune")), table);
  const rows = new Map();
  const losses = new Map();

  function render(job) {
    const p = job.progress ?? {};
    const cells = [
      h("td", {}, h("a", { href: `#/jobs/${job.job_id}` }, job.job_id)),
      h("td", {}, job.kind),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, p.total_iterations ? [progressBar(p.iteration, p.total_iterations), h("span", { class: "num" }, ` ${p.iteration ?? 0}/${p.total_iterations}`)] : "–"),
      h("td", { class: "num" }, p.epoch === undefined ? "–" : num(p.epoch, 2)),
      h("td", { class: "num" }, num(p.train_loss)),
      h("td", { class: "num" }, job.status === "running" ? duration(p.eta_seconds) : "–"),
      h("td", {}, sparkline(losses.get(job.job_id) ?? [])),
      h("td", {}, job.model_id),
    ];
    let row = rows.get(job.job_id);
    if (!row) {
      row = h("tr", { dataset: { job: job.job_id } });
      rows.set(job.job_id, row);
      body.prepend(row);
    }
    row.replaceChildren(...cells);
  }

  let page;
  try {
    page = await get(`/jobs?limit=50${filter ? `&status=${filter}` : ""}`);
  } catch (e) {
    main.append(problem(e));
    return;
  }
  for (const job of [...page.jobs].reverse()) render(job);
  await Promise.all(
    page.jobs
      .filter((j) => j.kind === "finetune")
      .slice(0, 10)
      .map(async (j) => {
        const m = await get(`/jobs/${j.job_id}/metrics`).catch(() => null);
        if (m) losses.set(j.job_id, m.train.map((t) => t.train_loss));
        render(j);
      }),
  );
  const fetching = new Set();
  const signal = viewSignal();
  stream(
    "/jobs/events",
    async ({ data }) => {
      if (data.type === "train") losses.set(data.job_id, [...(losses.get(data.job_id) ?? []), data.train_loss]);
      if (fetching.has(data.job_id)) return; // one request a job at a time; the next event catches up
      fetching.add(data.job_id);
      const job = await get(`/jobs/${data.job_id}`).catch(() => null);
      fetching.delete(data.job_id);
      if (!job || signal.aborted) return;
      if (filter && job.status !== filter) {
        rows.get(job.job_id)?.remove();
        rows.delete(job.job_id);
        return;
      }
      render(job);
    },
    { signal, lastEventId: page.latest_event },
  ).catch((e) => {
    if (!signal.aborted) main.append(problem(e));
  });
}
