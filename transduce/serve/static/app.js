// The page of `transduce serve`: lines in, outputs out, and a heatmap of an output's cross-attention.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let results = [];

function current() { return models.find((m) => m.name === $("model").value); }

// The endpoint a model's page uses: what it translates or labels.
function endpointOf(m) {
  for (const e of ["translate", "classify", "tag"]) if (m.endpoints.includes(e)) return e;
  return m.endpoints[0];
}

async function loadModels() {
  const r = await fetch("/v1/models");
  models = (await r.json()).models;
  const select = $("model");
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (${m.family})`;
    select.appendChild(o);
  }
  select.addEventListener("change", modelChanged);
  modelChanged();
  $("status").textContent = `${models.length} model${models.length === 1 ? "" : "s"}`;
}

function modelChanged() {
  const m = current();
  $("beam-label").hidden = !m || endpointOf(m) !== "translate";
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function run(event) {
  event.preventDefault();
  const m = current();
  if (!m) return;
  const inputs = $("inputs").value.split("\n").map((s) => s.replace(/\r$/, ""));
  while (inputs.length > 1 && inputs[inputs.length - 1] === "") inputs.pop();
  const endpoint = endpointOf(m);
  const body = { model: m.name, inputs };
  if (endpoint === "translate") {
    if ($("beam").value) body.beam = Number($("beam").value);
    body.attention = m.attention;
  }
  $("submit").disabled = true;
  showError("");
  try {
    const r = await fetch(`/v1/${endpoint}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await r.json();
    if (!r.ok) { showError(`${r.status}: ${data.error}`); return; }
    results = data.outputs.map((o, i) => ({ source: inputs[i], output: o }));
    render(endpoint);
  } catch (e) {
    showError(String(e));
  } finally {
    $("submit").disabled = false;
  }
}

function textOf(output) {
  if (typeof output === "string") return output;
  if (Array.isArray(output)) return output.join(" ");
  if (output && typeof output === "object" && "text" in output) return output.text;
  return output === null ? "" : String(output);
}

function render(endpoint) {
  const list = $("outputs");
  list.replaceChildren();
  $("attention-section").hidden = true;
  results.forEach((r, i) => {
    const li = document.createElement("li");
    const src = document.createElement("span");
    src.className = "source";
    src.textContent = r.source + " → ";
    const out = document.createElement("span");
    out.className = "output";
    out.textContent = textOf(r.output);
    li.append(src, out);
    if (endpoint === "translate" && r.output.hypotheses) {
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = r.output.hypotheses[0].score.toFixed(3);
      li.append(score);
    }
    if (r.output && r.output.attention && r.output.attention.weights.length) {
      li.classList.add("selectable");
      li.addEventListener("click", () => select(i));
    }
    list.appendChild(li);
  });
  const first = results.findIndex((r) => r.output && r.output.attention && r.output.attention.weights.length);
  if (first >= 0) select(first);
}

function select(i) {
  [...$("outputs").children].forEach((li, k) => li.classList.toggle("selected", k === i));
  const r = results[i];
  $("attention-section").hidden = false;
  $("attention-title").textContent = `of “${r.source}” → “${r.output.text}”`;
  drawHeatmap(r.output.attention);
}

// Source tokens across, output tokens down; darker = more attention.
function drawHeatmap(att) {
  const canvas = $("heatmap");
  const ctx = canvas.getContext("2d");
  const S = att.source_tokens.length, T = att.output_tokens.length;
  const left = 70, top = 50, cell = Math.max(14, Math.min(40, Math.floor(560 / Math.max(S, T))));
  canvas.width = left + S * cell + 10;
  canvas.height = top + T * cell + 10;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "12px ui-monospace, monospace";
  ctx.fillStyle = "#1d232a";
  ctx.textAlign = "center";
  att.source_tokens.forEach((tok, s) => {
    ctx.save();
    ctx.translate(left + s * cell + cell / 2, top - 6);
    ctx.rotate(-Math.PI / 4);
    ctx.textAlign = "left";
    ctx.fillText(tok, 0, 0);
    ctx.restore();
  });
  ctx.textAlign = "right";
  att.output_tokens.forEach((tok, t) => ctx.fillText(tok, left - 6, top + t * cell + cell / 2 + 4));
  att.weights.forEach((row, t) => row.forEach((w, s) => {
    const shade = Math.round(255 * (1 - w));
    ctx.fillStyle = `rgb(${shade}, ${Math.round(shade * 0.9 + 25)}, 255)`;
    ctx.fillRect(left + s * cell, top + t * cell, cell - 1, cell - 1);
  }));
}

$("form").addEventListener("submit", run);
loadModels().catch((e) => showError(String(e)));
