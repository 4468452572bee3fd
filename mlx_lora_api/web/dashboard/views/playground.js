// The playground: chat with a model, streaming, or two side by side.

import { get, stream } from "../api.js";
import { h, problem, show, viewSignal } from "../dom.js";

export async function playgroundView(params) {
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
    const signal = viewSignal();
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
