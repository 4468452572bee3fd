// Models as a lineage tree: base, adapters, fused and quantized models, with their actions.

import { del, get, post } from "../api.js";
import { h, num, problem, show, size, when } from "../dom.js";

export async function modelsView() {
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
      if (!answer?.job_id) modelsView(); // the tree without what was deleted
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
      // Older records (before fusing was checked layer by layer) name the difference max_abs_logit_diff.
      const { max_diff: diff = m.parity.max_abs_logit_diff, tolerance } = m.parity;
      facts.push(`parity: within ${Number(diff).toExponential(1)} of base + adapter (tolerance ${Number(tolerance).toExponential(1)})`);
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
