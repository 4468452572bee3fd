// A new fine-tune: samples pasted or uploaded, parameters described from the OpenAPI document.

import { get, post } from "../api.js";
import { h, problem, show } from "../dom.js";

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
  const form = (s) => {
    if (typeof s === "string" || s.text !== undefined) return "text";
    if (s.messages) return "chat";
    if (s.chosen !== undefined || s.input !== undefined) return "preference";
    return s.prompt !== undefined ? "prompt/completion" : "unknown";
  };
  const forms = new Set(samples.map(form));
  return [...forms].join(", ");
}

export async function newView() {
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
  const data = h("textarea", { id: "training_data", rows: 8, placeholder: '{"messages": [...]} or {"text": ...} per line, or one plain sentence per line; preference rows {"prompt", "chosen", "rejected"} train with method dpo or orpo' });
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
    // A number that may also be "auto" (learning_rate, epochs, batch_size) stays a text field.
    const choices = spec.enum ?? (["number", "integer"].includes(type) ? undefined : spec.anyOf?.find((t) => t.enum)?.enum);
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
