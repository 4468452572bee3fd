// One job: live charts, events, actions, checkpoints, parameters and data.

import { get, post, stream } from "../api.js";
import { lineChart } from "../charts.js";
import { STATUSES, duration, h, num, problem, progressBar, show, statusBadge, viewSignal, when } from "../dom.js";

export async function jobView(jobId) {
  let job;
  try {
    job = await get(`/jobs/${jobId}`);
  } catch (e) {
    show(h("h1", {}, jobId), problem(e));
    return;
  }
  const title = h("h1", {}, `${job.kind} ${job.job_id}`);
  const status = h("p", { class: "status" });
  const actions = h("p", { class: "actions" });
  const charts = h("div", { class: "charts" });
  const checkpoints = h("tbody");
  const details = h("dl", { class: "details" });
  const log = h("ol", { class: "events", "aria-live": "polite" });
  const message = h("div", { "aria-live": "assertive" });
  show(
    title,
    status,
    actions,
    message,
    charts,
    h("h2", {}, "Checkpoints"),
    h("table", {}, h("thead", {}, h("tr", {}, ["iteration", "validation loss", ""].map((c) => h("th", { scope: "col" }, c)))), checkpoints),
    h("h2", {}, "Parameters and data"),
    details,
    h("h2", {}, "Events"),
    log,
  );
  const train = [];
  const val = [];
  const rate = [];
  const speed = [];
  // Preference runs (parameters.method dpo or orpo): the chosen answer's reward over the rejected's.
  const margin = [];
  const valMargin = [];
  const accuracy = [];
  const valAccuracy = [];

  function act(label, path) {
    return h(
      "button",
      {
        type: "button",
        onclick: async () => {
          message.replaceChildren();
          try {
            job = await post(path);
            paint();
            if (label === "Resume") follow();
          } catch (e) {
            message.replaceChildren(problem(e));
          }
        },
      },
      label,
    );
  }

  function paint() {
    const p = job.progress ?? {};
    status.replaceChildren(
      statusBadge(job.status),
      " ",
      progressBar(p.iteration, p.total_iterations),
      h("span", { class: "num" }, ` ${p.iteration ?? 0}/${p.total_iterations ?? "?"} · epoch ${num(p.epoch, 2)} · loss ${num(p.train_loss)} · val ${num(p.val_loss)}${p.val_reward_accuracy !== undefined ? ` · val reward accuracy ${num(p.val_reward_accuracy, 2)}` : ""} · ${p.tokens_per_second ? Math.round(p.tokens_per_second) : "–"} tok/s · ETA ${job.status === "running" ? duration(p.eta_seconds) : "–"}`),
      job.error ? h("p", { class: "error" }, job.error) : job.message ? h("p", {}, job.message) : "",
    );
    const live = ["queued", "running"].includes(job.status);
    actions.replaceChildren(
      live ? act("Cancel", `/jobs/${job.job_id}/cancel`) : "",
      live ? act("Pause", `/jobs/${job.job_id}/pause`) : "",
      ["failed", "cancelled", "paused"].includes(job.status) && job.kind === "finetune" ? act("Resume", `/jobs/${job.job_id}/resume`) : "",
      job.status === "success" ? h("a", { class: "button", href: `#/playground?model=${encodeURIComponent(job.model_id)}` }, "Try the model") : "",
    );
    charts.replaceChildren(
      lineChart(
        [
          { name: "train loss", points: train, className: "train" },
          { name: "validation loss", points: val, className: "val" },
        ],
        { title: "loss", width: 1160, height: 320 },
      ),
      ...(margin.length || valMargin.length
        ? [
            lineChart(
              [
                { name: "train reward margin", points: margin, className: "train" },
                { name: "validation reward margin", points: valMargin, className: "val" },
              ],
              { title: "reward margin (chosen over rejected)", height: 220 },
            ),
            lineChart(
              [
                { name: "train reward accuracy", points: accuracy, className: "train" },
                { name: "validation reward accuracy", points: valAccuracy, className: "val" },
              ],
              { title: "reward accuracy (share of rows where the chosen answer wins)", height: 220 },
            ),
          ]
        : []),
      lineChart([{ name: "learning rate", points: rate, className: "rate" }], { title: "learning rate", height: 180 }),
      lineChart([{ name: "tokens/s", points: speed, className: "speed" }], { title: "tokens per second", height: 180 }),
    );
    checkpoints.replaceChildren(
      ...(job.checkpoints ?? []).map((c) =>
        h(
          "tr",
          {},
          h("td", { class: "num" }, c.iteration),
          h("td", { class: "num" }, num(c.val_loss)),
          h("td", {}, h("a", { href: `#/playground?model=${encodeURIComponent(`${job.model_id}:step-${c.iteration}`)}` }, "Try this checkpoint")),
        ),
      ),
    );
    const facts = [
      ["model", job.model_id],
      ["base model", job.base_model],
      ["created", when(job.created_at)],
      ["data", job.training_data ? `${job.training_data.samples} ${job.training_data.format} samples, sha256 ${job.training_data.sha256}` : "–"],
      ...Object.entries(job.parameters ?? {}).map(([k, v]) => [k, JSON.stringify(v)]),
    ];
    details.replaceChildren(...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function onEvent(e) {
    const line = h("li", {}, h("span", { class: "muted" }, new Date(e.time * 1000).toLocaleTimeString()), ` ${e.type} `, summary(e));
    log.append(line);
    if (e.type === "train") {
      train.push([e.iteration, e.train_loss]);
      if (e.learning_rate !== undefined) rate.push([e.iteration, e.learning_rate]);
      if (e.tokens_per_second !== undefined) speed.push([e.iteration, e.tokens_per_second]);
      if (e.reward_margin !== undefined) margin.push([e.iteration, e.reward_margin]);
      if (e.reward_accuracy !== undefined) accuracy.push([e.iteration, e.reward_accuracy]);
    } else if (e.type === "val") {
      val.push([e.iteration, e.val_loss]);
      if (e.val_reward_margin !== undefined) valMargin.push([e.iteration, e.val_reward_margin]);
      if (e.val_reward_accuracy !== undefined) valAccuracy.push([e.iteration, e.val_reward_accuracy]);
    }
  }

  let lastSeen = 0;
  const follow = async () => {
    const signal = viewSignal();
    let pending = 0;
    await stream(
      `/jobs/${job.job_id}/events`,
      async ({ id, data }) => {
        lastSeen = Number(id);
        onEvent(data);
        if (["train", "val", "checkpoint", "started", "retention", "resumed", "requeued", ...STATUSES].includes(data.type) && !pending) {
          pending = 1;
          job = await get(`/jobs/${job.job_id}`).catch(() => job);
          pending = 0;
        }
        paint();
      },
      { signal, lastEventId: lastSeen },
    ).catch((e) => {
      if (!signal.aborted) message.replaceChildren(problem(e));
    });
    job = await get(`/jobs/${job.job_id}`).catch(() => job);
    paint();
  };
  paint();
  follow();
}

function summary(e) {
  const skip = new Set(["type", "time", "seq", "job_id"]);
  if (e.message) return e.message;
  if (e.error) return e.error;
  return Object.entries(e)
    .filter(([k, v]) => !skip.has(k) && v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : v}`)
    .join(" ");
}
