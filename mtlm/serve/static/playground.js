// mtlm playground: reads /v1/tasks, shows the fields the model's tasks need, sends one /v1/predict request
// per group of tasks that read the same fields, and draws every task's result (no library, no network
// beyond this server).
"use strict";
const $ = (id) => document.getElementById(id);
let TASKS = [];

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["authorization"] = "Bearer " + key;
  return h;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

async function loadTasks() {
  const r = await fetch("v1/tasks", { headers: headers() });
  if (r.status === 401) { $("status").textContent = "this server needs an API key: enter it above"; return false; }
  if (r.status === 503) { $("status").textContent = "the model is loading..."; setTimeout(loadTasks, 1000); return false; }
  if (!r.ok) { $("status").textContent = "GET /v1/tasks: " + r.status; return false; }
  const body = await r.json();
  TASKS = body.tasks;
  $("model").textContent = body.model + " (" + TASKS.length + " tasks)";
  const fields = new Set(TASKS.flatMap((t) => t.input_fields));
  $("fields-text").hidden = !fields.has("text");
  $("pair-label").hidden = !fields.has("text_pair");
  $("fields-qa").hidden = !fields.has("question");
  $("fields-choices").hidden = !fields.has("choices");
  $("status").textContent = "";
  return true;
}

function inputFor(fields) {
  const item = {};
  for (const f of fields) {
    if (f === "choices") {
      item.choices = $("choices").value.split("\n").map((s) => s.trim()).filter((s) => s);
      if (item.choices.length < 2) return null;
    } else {
      const v = $(f).value;
      if (!v.trim()) return null;
      item[f] = v;
    }
  }
  return item;
}

function bars(scores, chosen) {
  const box = el("div", {});
  const entries = Array.isArray(scores) ? scores.map((p, i) => [String(i), p]) : Object.entries(scores);
  entries.sort((a, b) => b[1] - a[1]);
  for (const [name, p] of entries) {
    const row = el("div", { class: "bar" + (chosen.includes(name) ? " chosen" : ""), "data-label": name },
      el("span", { class: "name", title: name }, name),
      el("span", { class: "track" }, el("span", { class: "fill", style: "display:block;width:" + (100 * p).toFixed(1) + "%" })),
      el("span", { class: "p" }, p.toFixed(3)));
    box.append(row);
  }
  return box;
}

function highlighted(text, spans) {
  // spans: [{start, end, tag}] in characters, not overlapping; text nodes only (no HTML from the model)
  const out = el("p", { class: "highlighted" });
  let at = 0;
  for (const s of [...spans].sort((a, b) => a.start - b.start)) {
    out.append(text.slice(at, s.start));
    const m = el("mark", { "data-start": s.start, "data-end": s.end }, text.slice(s.start, s.end));
    if (s.tag) m.append(el("sub", {}, s.tag));
    out.append(m);
    at = s.end;
  }
  out.append(text.slice(at));
  return out;
}

function render(task, result, input) {
  const box = el("div", { class: "task", id: "result-" + task.name, "data-type": task.type },
    el("h2", {}, task.name + " ", el("span", {}, task.type)));
  if (task.type === "classification") {
    box.append(bars(result.scores, [result.label]));
  } else if (task.type === "multilabel") {
    box.append(el("p", {}, "labels: " + (result.labels.join(", ") || "(none)")), bars(result.scores, result.labels));
  } else if (task.type === "regression") {
    box.append(el("p", { class: "value" }, "value: " + result.value.toFixed(4)));
  } else if (task.type === "token_classification") {
    box.append(highlighted(input.text, result.entities.map((e) => ({ start: e.start, end: e.end, tag: e.entity || "" }))));
    if (!result.entities.length) box.append(el("p", {}, "(no entities)"));
  } else if (task.type === "extractive_qa") {
    if (result.no_answer || result.start === null) box.append(el("p", {}, "no answer in the context"));
    else box.append(el("p", {}, "answer: ", el("b", {}, result.answer), " (" + result.score.toFixed(3) + ")"),
                    highlighted(input.context, [{ start: result.start, end: result.end, tag: "" }]));
  } else if (task.type === "multiple_choice") {
    const scores = {};
    input.choices.forEach((c, i) => { scores[c] = result.scores[i]; });
    box.append(el("p", {}, "chosen: ", el("b", { class: "chosen-choice" }, result.label)), bars(scores, [result.label]));
  } else {
    box.append(el("pre", {}, JSON.stringify(result, null, 1)));
  }
  return box;
}

async function predict(ev) {
  ev.preventDefault();
  if (!TASKS.length && !(await loadTasks())) return;
  $("results").replaceChildren();
  const groups = new Map();
  for (const t of TASKS) {
    const k = t.input_fields.join(",");
    if (!groups.has(k)) groups.set(k, []);
    groups.get(k).push(t);
  }
  const asked = [...groups.values()].map((tasks) => ({ tasks, input: inputFor(tasks[0].input_fields) }))
    .filter((g) => g.input !== null);
  if (!asked.length) { $("status").textContent = "fill in the fields of at least one task"; return; }
  $("status").textContent = "predicting...";
  try {
    const answers = await Promise.all(asked.map(async (g) => {
      const r = await fetch("v1/predict", { method: "POST", headers: headers(),
        body: JSON.stringify({ inputs: [g.input], tasks: g.tasks.map((t) => t.name) }) });
      const body = await r.json();
      if (!r.ok) throw new Error(r.status + ": " + (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)));
      return { g, prediction: body.predictions[0] };
    }));
    for (const { g, prediction } of answers)
      for (const t of g.tasks) $("results").append(render(t, prediction[t.name], g.input));
    $("status").textContent = "done";
  } catch (e) {
    $("status").replaceChildren(el("span", { class: "error" }, String(e.message)));
  }
}

async function start() {
  // config.json is open (no key): whether /v1 needs one. Without a key, wait for it rather than ask /v1 and
  // get a 401.
  const cfg = await (await fetch("playground/config.json")).json();
  $("key-box").hidden = !cfg.api_key_required;
  if (cfg.api_key_required) $("status").textContent = "this server needs an API key: enter it above";
  else await loadTasks();
}

$("form").addEventListener("submit", predict);
$("key").addEventListener("change", loadTasks);
start();
