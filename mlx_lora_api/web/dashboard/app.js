// The dashboard: jobs (live), a job's page, models as a lineage tree, a new fine-tune, and a
// playground. Every number comes from the public API (api.js); user data only ever becomes text
// (textContent), never HTML.

import { ApiError, apiKey, del, get, post, stream } from "./api.js";
import { lineChart, sparkline } from "./charts.js";

const main = document.querySelector("main");
const STATUSES = ["queued", "running", "success", "failed", "cancelled", "paused"];
let leaving = new AbortController(); // aborts the current view's streams when the view changes

// -- small helpers ---------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
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

const num = (v, digits = 4) => (v === undefined || v === null ? "–" : Number(v).toFixed(digits));
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
const size = (b) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(2)} GiB` : `${(b / 2 ** 20).toFixed(1)} MiB`);
function duration(s) {
  if (s === undefined || s === null) return "–";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

function problem(error) {
  return h("p", { class: "error", role: "alert" }, error instanceof ApiError ? `${error.message} (HTTP ${error.status})` : String(error));
}

function show(...nodes) {
  main.replaceChildren(...nodes);
  main.focus({ preventScroll: true });
}

function statusBadge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

function progressBar(iteration, total) {
  const value = total ? Math.min(iteration / total, 1) : 0;
  return h("progress", { max: 1, value, "aria-label": `${iteration ?? 0} of ${total ?? "?"} iterations` });
}

// -- jobs, live ------------------------------------------------------------------------------

async function jobsView(params) {
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
  const signal = leaving.signal;
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

// -- one job ---------------------------------------------------------------------------------

async function jobView(jobId) {
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
      h("span", { class: "num" }, ` ${p.iteration ?? 0}/${p.total_iterations ?? "?"} · epoch ${num(p.epoch, 2)} · loss ${num(p.train_loss)} · val ${num(p.val_loss)} · ${p.tokens_per_second ? Math.round(p.tokens_per_second) : "–"} tok/s · ETA ${job.status === "running" ? duration(p.eta_seconds) : "–"}`),
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
    } else if (e.type === "val") {
      val.push([e.iteration, e.val_loss]);
    }
  }

  let lastSeen = 0;
  const follow = async () => {
    const signal = leaving.signal;
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

// -- models as a lineage tree ----------------------------------------------------------------

async function modelsView() {
  let models;
  try {
    models = (await get("/models")).models;
  } catch (e) {
    show(h("h1", {}, "Models"), problem(e));
    return;
  }
  const message = h("div", { "aria-live": "assertive" });
  const byParent = new Map();
  const ids = new Set(models.map((m) => m.model_id));
  for (const m of models) {
    const parent = m.kind === "fused" ? m.adapter ?? m.base_model : m.kind === "adapter" ? m.base_model : m.base_model && ids.has(m.base_model) ? m.base_model : null;
    const key = parent && ids.has(parent) ? parent : null;
    byParent.set(key, [...(byParent.get(key) ?? []), m]);
  }

  async function run(label, doing) {
    message.replaceChildren(h("p", {}, `${label}…`));
    try {
      const answer = await doing();
      message.replaceChildren(h("p", { role: "status" }, `${label}: `, answer?.job_id ? h("a", { href: `#/jobs/${answer.job_id}` }, `job ${answer.job_id}`) : "done"));
      if (!answer?.job_id) route();
    } catch (e) {
      message.replaceChildren(problem(e));
    }
  }

  function actions(m) {
    const buttons = [];
    if (m.status !== "ready") return buttons;
    if (m.kind === "adapter") {
      buttons.push(h("button", { type: "button", onclick: () => run(`fuse ${m.model_id}`, () => post("/lora-fuse", { base_model: m.base_model, lora_adapter: m.model_id })) }, "Fuse"));
    } else {
      buttons.push(h("button", { type: "button", onclick: () => run(`quantize ${m.model_id}`, () => post(`/models/${m.model_id}/quantize`, { bits: 4 })) }, "Quantize (4-bit)"));
      buttons.push(h("button", { type: "button", onclick: () => run(`export ${m.model_id}`, () => post(`/models/${m.model_id}/export`, { format: "gguf" })) }, "Export GGUF"));
    }
    const repo = h("input", { type: "text", placeholder: "user/repo", "aria-label": `Hub repository for ${m.model_id}`, size: 16 });
    buttons.push(
      h(
        "form",
        { class: "inline", onsubmit: (e) => (e.preventDefault(), run(`push ${m.model_id}`, () => post(`/models/${m.model_id}/push`, { repo_id: repo.value }))) },
        repo,
        h("button", { type: "submit" }, "Push"),
      ),
    );
    buttons.push(h("button", { type: "button", class: "danger", onclick: () => confirm(`Delete ${m.model_id}?`) && run(`delete ${m.model_id}`, () => del(`/models/${m.model_id}`)) }, "Delete"));
    buttons.push(h("a", { class: "button", href: `#/playground?model=${encodeURIComponent(m.model_id)}` }, "Try"));
    return buttons;
  }

  function node(m) {
    const facts = [m.kind, size(m.size_bytes), when(m.created_at)];
    if (m.parity) {
      const { max_abs_logit_diff: diff, tolerance } = m.parity;
      facts.push(`parity: logits within ${Number(diff).toExponential(1)} of base + adapter (tolerance ${Number(tolerance).toExponential(1)})`);
    }
    if (m.retention) facts.push(`retention ${num(m.retention.score, 2)}`);
    if (m.status !== "ready") facts.push(m.status);
    const children = byParent.get(m.model_id) ?? [];
    return h(
      "li",
      {},
      h("div", { class: "node" }, h("strong", {}, m.model_id), h("span", { class: "muted" }, ` ${facts.join(" · ")}`), h("span", { class: "actions" }, actions(m))),
      children.length ? h("ul", {}, children.map(node)) : "",
    );
  }

  show(h("h1", {}, "Models"), message, h("ul", { class: "tree" }, (byParent.get(null) ?? []).map(node)));
}

// -- a new fine-tune -------------------------------------------------------------------------

function parseSamples(text) {
  const lines = text.split("\n").filter((l) => l.trim());
  const samples = [];
  lines.forEach((line, i) => {
    try {
      samples.push(JSON.parse(line));
    } catch {
      if (line.trim().startsWith("{")) throw new Error(`line ${i + 1} is not valid JSON`);
      samples.push(line); // a plain string sample
    }
  });
  return samples;
}

function sampleFormat(samples) {
  const forms = new Set(samples.map((s) => (typeof s === "string" || s.text !== undefined ? "text" : s.messages ? "chat" : s.prompt !== undefined ? "prompt/completion" : "unknown")));
  return [...forms].join(", ");
}

async function newView() {
  let models;
  let schema;
  try {
    [models, schema] = await Promise.all([get("/models"), get("/openapi.json")]);
  } catch (e) {
    show(h("h1", {}, "New fine-tune"), problem(e));
    return;
  }
  const bases = models.models.filter((m) => m.kind !== "adapter" && m.status === "ready");
  const parameters = schema.components.schemas.Parameters.properties;
  const fields = new Map();
  const base = h("select", { id: "base_model", name: "base_model" }, h("option", { value: "default" }, "default"), bases.map((m) => h("option", { value: m.model_id }, m.model_id)));
  const data = h("textarea", { id: "training_data", rows: 8, placeholder: '{"messages": [...]} or {"text": ...} per line, or one plain sentence per line' });
  const file = h("input", { id: "training_file", type: "file", accept: ".jsonl,.json,.txt" });
  const validation = h("textarea", { id: "validation_data", rows: 3, placeholder: "optional, the same format" });
  const summaryBox = h("p", { id: "dataset-summary", "aria-live": "polite" });
  const message = h("div", { "aria-live": "assertive" });
  file.addEventListener("change", async () => {
    if (file.files[0]) {
      data.value = await file.files[0].text();
      summarize();
    }
  });

  function summarize() {
    try {
      const samples = parseSamples(data.value);
      const chars = samples.reduce((n, s) => n + JSON.stringify(s).length, 0);
      summaryBox.textContent = samples.length ? `${samples.length} samples · ${sampleFormat(samples)} · ${chars} characters` : "no samples yet";
      summaryBox.className = "";
    } catch (e) {
      summaryBox.textContent = e.message;
      summaryBox.className = "error";
    }
  }
  data.addEventListener("input", summarize);

  const rows = Object.entries(parameters).map(([name, spec]) => {
    const type = spec.type ?? spec.anyOf?.find((t) => t.type !== "null")?.type;
    const choices = spec.enum ?? spec.anyOf?.find((t) => t.enum)?.enum;
    let input;
    if (choices) input = h("select", { id: `p-${name}`, name }, h("option", { value: "" }, `default (${spec.default ?? "none"})`), choices.map((c) => h("option", { value: c }, c)));
    else if (type === "boolean") input = h("select", { id: `p-${name}`, name }, h("option", { value: "" }, `default (${spec.default})`), h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
    else input = h("input", { id: `p-${name}`, name, type: "text", inputmode: type === "string" ? "text" : "decimal", placeholder: spec.default === undefined || spec.default === null ? "default" : String(spec.default) });
    const error = h("span", { class: "error field-error", id: `e-${name}` });
    input.setAttribute("aria-describedby", `d-${name} e-${name}`);
    fields.set(name, { input, error, type });
    return h("div", { class: "field" }, h("label", { for: `p-${name}` }, name), input, h("small", { id: `d-${name}`, class: "muted" }, spec.description ?? ""), error);
  });
  const dataError = h("span", { class: "error field-error", id: "e-training_data" });

  async function submit(event) {
    event.preventDefault();
    message.replaceChildren();
    for (const f of fields.values()) f.error.textContent = "";
    dataError.textContent = "";
    const body = { base_model: base.value, parameters: {} };
    try {
      body.training_data = parseSamples(data.value);
      if (validation.value.trim()) body.validation_data = parseSamples(validation.value);
    } catch (e) {
      dataError.textContent = e.message;
      return;
    }
    for (const [name, f] of fields) {
      const raw = f.input.value.trim();
      if (!raw) continue;
      body.parameters[name] = f.type === "boolean" ? raw === "true" : f.type === "string" || Number.isNaN(Number(raw)) ? raw : Number(raw);
    }
    try {
      const answer = await post("/lora-finetune", body);
      location.hash = `#/jobs/${answer.job_id}`;
    } catch (e) {
      const named = /`?parameters\.(\w+)`?/.exec(e.message)?.[1] ?? /\$\.parameters\.(\w+)/.exec(e.message)?.[1];
      if (named && fields.has(named)) {
        fields.get(named).error.textContent = e.message;
        fields.get(named).input.focus();
      } else if (/training_data|validation_data|sample/.test(e.message)) {
        dataError.textContent = e.message;
      } else {
        message.replaceChildren(problem(e));
      }
    }
  }

  show(
    h("h1", {}, "New fine-tune"),
    h(
      "form",
      { id: "new-finetune", onsubmit: submit, novalidate: true },
      h("div", { class: "field" }, h("label", { for: "base_model" }, "Base model"), base),
      h("div", { class: "field" }, h("label", { for: "training_data" }, "Training data"), data, h("label", { for: "training_file" }, "or upload a file "), file, dataError),
      summaryBox,
      h("div", { class: "field" }, h("label", { for: "validation_data" }, "Validation data"), validation),
      h("details", {}, h("summary", {}, "Parameters (each blank keeps its default)"), h("div", { class: "params" }, rows)),
      message,
      h("button", { type: "submit" }, "Start fine-tune"),
    ),
  );
  summarize();
}

// -- playground ------------------------------------------------------------------------------

async function playgroundView(params) {
  let models;
  try {
    models = (await get("/models")).models.filter((m) => m.status === "ready");
  } catch (e) {
    show(h("h1", {}, "Playground"), problem(e));
    return;
  }
  const wanted = params.get("model");
  const choices = (id, selected) =>
    h("select", { id }, [...new Set([...(wanted ? [wanted] : []), "default", ...models.map((m) => m.model_id)])].map((m) => h("option", { value: m, selected: m === selected }, m)));
  const left = choices("model-a", wanted ?? "default");
  const right = choices("model-b", models.find((m) => m.model_id === wanted)?.base_model ?? "default");
  const compare = h("input", { id: "compare", type: "checkbox" });
  const prompt = h("textarea", { id: "prompt", rows: 3, required: true });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 128 });
  const outputs = h("div", { class: "outputs" });
  const rightLabel = h("span", { class: "field", hidden: true }, h("label", { for: "model-b" }, "against "), right);
  compare.addEventListener("change", () => (rightLabel.hidden = !compare.checked));
  const history = [];

  async function ask(model, box, messages, signal) {
    const text = h("p", { class: "answer", "aria-busy": "true" });
    box.append(h("h3", {}, model), text);
    try {
      await stream(
        "/generate",
        ({ event, data }) => {
          if (event === "text") text.append(document.createTextNode(data.text));
          else if (event === "error") text.after(problem(data.message));
        },
        { method: "POST", body: { model, messages, max_tokens: Number(maxTokens.value) || 128, stream: true }, signal },
      );
    } catch (e) {
      if (!signal.aborted) text.after(problem(e));
    }
    text.setAttribute("aria-busy", "false");
    return text.textContent;
  }

  async function send(event) {
    event.preventDefault();
    if (!prompt.value.trim()) return;
    history.push({ role: "user", content: prompt.value });
    const turn = h("div", { class: "turn" }, h("p", { class: "user" }, prompt.value));
    outputs.append(turn);
    prompt.value = "";
    const signal = leaving.signal;
    const targets = compare.checked ? [left.value, right.value] : [left.value];
    const row = h("div", { class: compare.checked ? "side-by-side" : "" });
    turn.append(row);
    const answers = await Promise.all(targets.map((m) => ask(m, row.appendChild(h("div", { class: "column" })), [...history], signal)));
    history.push({ role: "assistant", content: answers[0] });
  }

  show(
    h("h1", {}, "Playground"),
    h(
      "form",
      { id: "playground", onsubmit: send },
      h("div", { class: "field" }, h("label", { for: "model-a" }, "Model "), left, " ", h("label", { for: "compare" }, compare, " side by side"), " ", rightLabel),
      outputs,
      h("div", { class: "field" }, h("label", { for: "prompt" }, "Message"), prompt),
      h("div", { class: "field" }, h("label", { for: "max-tokens" }, "Max tokens "), maxTokens, " ", h("button", { type: "submit" }, "Send")),
    ),
  );
}

// -- the API key, and routing ----------------------------------------------------------------

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
  leaving.abort();
  leaving = new AbortController();
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
