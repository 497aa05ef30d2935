// The fine-tuning dashboard: sign in with an API key, then jobs, their curves, events, checkpoints, eval
// headline and report, a try-it chat, uploads and a form that starts a job. It calls only this server's
// OpenAI-compatible /v1 API (routes and shapes in gemcut/service/dashboard.py and docs/service.md).
// Plain browser JavaScript on purpose (no build step). Every text from the server goes in through
// textContent, never innerHTML: job names, file names and validation errors are user input.
"use strict";

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const KEY = "gemcut-api-key";  // sessionStorage only: gone when the tab closes, never sent but as a header
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;          // a running job's status, events and curve
const IDLE_POLL_MS = 10000;    // a finished job (its eval headline and report may still be coming)
const JOBS_POLL_MS = 3000;     // the jobs list

const state = {
  jobs: new Map(), jobOrder: [], jobsHasMore: false, olderLoaded: false,
  selected: null, job: null, events: [], eventIds: new Set(), chart: null,
  pollTimer: null, pollToken: 0, jobsTimer: null,
  chat: { tuned: [], base: [] }, files: [],
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function apiKey() { return sessionStorage.getItem(KEY) || ""; }

// An error body in OpenAI's shape ({"error": {message, param, code}}) or FastAPI's ({"detail"}) as one line.
function errorText(status, data, fallback) {
  const e = data && data.error;
  if (e && typeof e === "object") {
    const where = [e.param && `param: ${e.param}`, e.code && `code: ${e.code}`].filter(Boolean).join(", ");
    return (e.message || fallback) + (where ? ` (${where})` : "");
  }
  if (data && data.detail) return typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
  return `${status} ${fallback}`;
}

async function request(method, path, body) {
  const headers = { Authorization: "Bearer " + apiKey() };
  let payload;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const res = await fetch(path, { method, headers, body: payload, cache: "no-store", credentials: "omit" });
  if (res.ok) return res;
  const text = await res.text();
  let data = null;
  try { data = JSON.parse(text); } catch { /* not JSON: the status line says enough */ }
  const err = new ApiError(res.status, errorText(res.status, data, res.statusText || "request failed"));
  if (res.status === 401) signOut("This key was refused (401): " + err.message);
  throw err;
}

async function api(method, path, body) {
  return (await request(method, path, body)).json();
}

function say(text) { $("status").textContent = text || ""; }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const c of children) if (c !== null && c !== undefined) node.append(c);  // strings become text nodes
  return node;
}

function when(seconds) { return seconds ? new Date(seconds * 1000).toLocaleString() : "—"; }

function num(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return x === null || x === undefined ? "—" : String(x);
  return Number.isInteger(x) ? String(x) : x.toPrecision(4);
}

function show(part) {
  $("sign-in").hidden = part !== "sign-in";
  $("app").hidden = part !== "app";
  $("who").hidden = part !== "app";
}

function showView(view) {
  for (const v of ["job", "new-job", "files"]) $("view-" + v).hidden = v !== view;
  if (view !== "job") { stopJobPoll(); state.selected = null; renderJobs(); }
}

// ---- signing in and out ----

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  $("sign-in-error").textContent = "";
  try {
    await api("GET", "/v1/models");
  } catch (e) {
    if (e.status !== 401) { sessionStorage.removeItem(KEY); show("sign-in"); $("sign-in-error").textContent = e.message; }
    return;  // a 401 has signed out already, saying why
  }
  $("who-key").textContent = "signed in · key " + key.slice(0, 6) + "…";
  show("app");
  await loadJobs();
  clearInterval(state.jobsTimer);
  state.jobsTimer = setInterval(() => loadJobs().catch((e) => say(e.message)), JOBS_POLL_MS);
  if (state.jobOrder.length) selectJob(state.jobOrder[0]); else openFiles();
}

function signOut(reason) {
  sessionStorage.removeItem(KEY);
  clearInterval(state.jobsTimer);
  stopJobPoll();
  Object.assign(state, { jobs: new Map(), jobOrder: [], jobsHasMore: false, olderLoaded: false, selected: null, job: null });
  $("jobs").replaceChildren();
  $("api-key").value = "";
  $("sign-in-error").textContent = reason || "";
  show("sign-in");
}

// ---- the jobs list ----

async function loadJobs() {
  const page = await api("GET", "/v1/fine_tuning/jobs?limit=20");
  const first = page.data.map((j) => j.id);
  for (const j of page.data) state.jobs.set(j.id, j);
  // The first page is the newest; jobs seen before (older pages) keep their order after it.
  state.jobOrder = first.concat(state.jobOrder.filter((id) => !first.includes(id)));
  if (!state.olderLoaded) state.jobsHasMore = page.has_more;
  renderJobs();
}

async function loadOlderJobs() {
  const last = state.jobOrder[state.jobOrder.length - 1];
  const page = await api("GET", `/v1/fine_tuning/jobs?limit=20&after=${enc(last)}`);
  for (const j of page.data) {
    state.jobs.set(j.id, j);
    if (!state.jobOrder.includes(j.id)) state.jobOrder.push(j.id);
  }
  state.olderLoaded = true;
  state.jobsHasMore = page.has_more;
  renderJobs();
}

function jobTitle(job) {
  return job.fine_tuned_model || (job.user_provided_suffix ? `${job.user_provided_suffix} · ${job.model}` : `${job.model} · ${job.id}`);
}

function progressOf(job) {
  const p = job.gemcut && job.gemcut.progress;
  return p && p.total_steps ? { step: p.step || 0, total: p.total_steps } : null;
}

function badge(status) { return el("span", { className: "badge status-" + status, textContent: status }); }

function renderJobs() {
  const list = $("jobs");
  list.replaceChildren();
  for (const id of state.jobOrder) {
    const job = state.jobs.get(id);
    const button = el("button", { type: "button", className: "job-item" + (id === state.selected ? " selected" : "") });
    button.dataset.jobId = id;
    button.dataset.status = job.status;
    button.append(el("span", { className: "job-name", textContent: jobTitle(job) }), badge(job.status));
    const p = progressOf(job);
    const meta = el("span", { className: "job-meta" });
    if (job.status === "queued" && job.gemcut && job.gemcut.queue_position !== null && job.gemcut.queue_position !== undefined) {
      meta.textContent = `queued · position ${job.gemcut.queue_position}`;
    } else if (p && !TERMINAL.has(job.status)) {
      meta.textContent = `step ${p.step} of ${p.total}`;
    } else {
      meta.textContent = `${job.model} · ${when(job.created_at)}`;
    }
    button.append(meta);
    if (p && !TERMINAL.has(job.status)) {
      const fill = el("div", { className: "fill" });
      fill.style.width = (100 * Math.min(1, p.step / p.total)).toFixed(1) + "%";
      button.append(el("div", { className: "bar mini" }, fill));
    }
    button.addEventListener("click", () => selectJob(id));
    list.append(el("li", {}, button));
  }
  $("jobs-empty").hidden = state.jobOrder.length > 0;
  $("jobs-more").hidden = !state.jobsHasMore;
}

// ---- one job ----

function stopJobPoll() {
  clearTimeout(state.pollTimer);
  state.pollToken += 1;  // a poll still in flight sees the token changed and drops its answer
}

function selectJob(id) {
  showView("job");
  state.selected = id;
  state.job = null;
  state.events = [];
  state.eventIds = new Set();
  state.chat = { tuned: [], base: [] };
  for (const side of ["tuned", "base"]) document.querySelector(`#chat-${side} .chat-log`).replaceChildren();
  $("report-frame").hidden = true;
  $("report-frame").removeAttribute("srcdoc");
  $("report-open").textContent = "Show the eval report";
  $("events").replaceChildren();
  $("job-action-error").textContent = "";
  drawCurves();
  renderJobs();
  pollJob();
}

async function pollJob() {
  stopJobPoll();
  const token = state.pollToken, id = state.selected;
  let job = null;
  try {
    job = await api("GET", `/v1/fine_tuning/jobs/${enc(id)}`);
    if (token !== state.pollToken) return;
    state.job = job;
    state.jobs.set(id, job);
    renderJobs();
    renderJob(job);
    const [events, checkpoints] = await Promise.all([newEvents(id), api("GET", `/v1/fine_tuning/jobs/${enc(id)}/checkpoints?limit=100`)]);
    if (token !== state.pollToken) return;
    addEvents(events);
    renderCheckpoints(checkpoints.data);
    say("");
  } catch (e) {
    if (token !== state.pollToken) return;
    say(e.message);
  }
  if (token === state.pollToken) {
    state.pollTimer = setTimeout(pollJob, job && TERMINAL.has(job.status) ? IDLE_POLL_MS : POLL_MS);
  }
}

function renderJob(job) {
  $("job-title").textContent = jobTitle(job);
  $("job-id").textContent = job.id;
  const status = $("job-status");
  status.textContent = job.status;
  status.className = "badge status-" + job.status;

  const p = progressOf(job);
  $("job-progress").hidden = !p;
  if (p) {
    $("job-progress-fill").style.width = (100 * Math.min(1, p.step / p.total)).toFixed(1) + "%";
    $("job-progress-text").textContent = `step ${p.step} of ${p.total}`;
  }
  const position = job.gemcut && job.gemcut.queue_position;
  $("job-queue").hidden = !(job.status === "queued" && position !== null && position !== undefined);
  $("job-queue").textContent = `Queued: position ${position} in the queue.`;

  const errorBox = $("job-error");
  errorBox.hidden = !job.error;
  if (job.error) {
    const where = [job.error.param && `param: ${job.error.param}`, job.error.code && `code: ${job.error.code}`].filter(Boolean).join(" · ");
    errorBox.replaceChildren(el("b", { textContent: "Failed: " }), job.error.message || "", where ? el("div", { className: "muted", textContent: where }) : null);
  }

  $("job-cancel").hidden = TERMINAL.has(job.status);
  $("job-pause").hidden = !["running", "queued", "validating_files"].includes(job.status);
  $("job-resume").hidden = job.status !== "paused";

  const method = job.method || { type: "supervised" };
  const hp = (method[method.type] && method[method.type].hyperparameters) || job.hyperparameters || {};
  const facts = [
    ["base model", job.model], ["fine-tuned model", job.fine_tuned_model], ["training file", job.training_file],
    ["validation file", job.validation_file], ["method", method.type],
    ["hyperparameters", Object.entries(hp).map(([k, v]) => `${k}=${v}`).join(", ")], ["seed", job.seed],
    ["created", when(job.created_at)], ["estimated finish", job.estimated_finish ? when(job.estimated_finish) : null],
    ["finished", job.finished_at ? when(job.finished_at) : null], ["trained tokens", job.trained_tokens],
    ["result files", (job.result_files || []).join(", ")],
  ];
  renderFacts($("job-facts"), facts.filter(([, v]) => v !== null && v !== undefined && v !== ""));

  const headline = job.gemcut && job.gemcut.headline;
  $("headline-box").hidden = !headline;
  if (headline) {
    // Rendered generically: whatever fields the eval headline has, with its one-line `text` (when it has one) on top.
    $("headline-text").textContent = typeof headline.text === "string" ? headline.text : "";
    const fields = Object.entries(headline).filter(([k]) => k !== "text" && k !== "report");
    renderFacts($("headline"), fields.map(([k, v]) => [k.replace(/_/g, " "), headlineValue(v)]));
  }
  $("report-box").hidden = !(job.gemcut && job.gemcut.report);

  const chatty = job.status === "succeeded" && Boolean(job.fine_tuned_model);
  $("chat-box").hidden = !chatty;
  $("chat-tuned-name").textContent = job.fine_tuned_model || "";
  $("chat-base-name").textContent = job.model;
}

function headlineValue(v) {
  if (Array.isArray(v)) return "[" + v.map(num).join(", ") + "]";
  if (v && typeof v === "object") return Object.entries(v).map(([k, x]) => `${k}: ${headlineValue(x)}`).join(", ");
  return num(v);
}

const ID_FACTS = new Set(["fine-tuned model", "training file", "validation file", "result files"]);

function renderFacts(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v] of pairs) {
    dl.append(el("dt", { textContent: k }), el("dd", { textContent: String(v), className: ID_FACTS.has(k) ? "mono" : "" }));
  }
}

// Events come newest first, a page at a time (`after` pages back to older ones). Fetch pages until one
// holds an event already seen, so a poll costs one request and a first look reads the whole history.
async function newEvents(id) {
  const fresh = [];
  let after = null;
  for (let pages = 0; pages < 200; pages++) {
    const page = await api("GET", `/v1/fine_tuning/jobs/${enc(id)}/events?limit=100` + (after ? `&after=${enc(after)}` : ""));
    let overlap = false;
    for (const ev of page.data) {
      if (state.eventIds.has(ev.id)) overlap = true;
      else fresh.push(ev);
    }
    if (overlap || !page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return fresh;
}

function addEvents(fresh) {
  if (!fresh.length) return;
  for (const ev of fresh) state.eventIds.add(ev.id);
  state.events = fresh.concat(state.events);  // both newest first; everything fresh is newer
  const list = $("events");
  list.prepend(...fresh.map((ev) => {
    const li = el("li", { className: "event level-" + ev.level });
    li.dataset.type = ev.type;
    li.append(el("time", { textContent: when(ev.created_at) }), el("span", { className: "event-message", textContent: ev.message }));
    return li;
  }));
  drawCurves();
}

// ---- the loss curves ----

function curves() {
  // Oldest first; a step seen twice (a job resumed after its worker died) keeps its latest value.
  const train = new Map(), valid = new Map();
  let latest = null;
  for (let i = state.events.length - 1; i >= 0; i--) {
    const ev = state.events[i];
    if (ev.type !== "metrics" || !ev.data || typeof ev.data.step !== "number") continue;
    const d = ev.data;
    if (Number.isFinite(d.train_loss)) train.set(d.step, d.train_loss);
    if (Number.isFinite(d.valid_loss)) valid.set(d.step, d.valid_loss);
    latest = d;
  }
  const points = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]).map(([x, y]) => ({ x, y }));
  return { train: points(train), valid: points(valid), latest };
}

function ensureChart() {
  if (state.chart || !window.Chart) return state.chart;
  const line = (label, color, radius) => ({ label, data: [], borderColor: color, backgroundColor: color, borderWidth: 2,
                                             pointRadius: radius, tension: 0 });
  state.chart = new window.Chart($("loss-chart"), {
    type: "line",
    data: { datasets: [line("training loss", "#2563eb", 1.5), line("validation loss", "#ea580c", 3)] },
    options: {
      animation: false, maintainAspectRatio: false, parsing: false, normalized: true,
      interaction: { mode: "nearest", intersect: false },
      scales: { x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
                y: { title: { display: true, text: "loss" } } },
      plugins: { legend: { position: "bottom" } },
    },
  });
  return state.chart;
}

function drawCurves() {
  const { train, valid, latest } = curves();
  const canvas = $("loss-chart");
  canvas.dataset.trainPoints = String(train.length);  // read by tests and scripts
  canvas.dataset.validPoints = String(valid.length);
  const chart = ensureChart();
  if (!chart) { say("The chart library did not load (/dashboard/static/vendor/chart.umd.min.js)."); return; }
  chart.data.datasets[0].data = train;
  chart.data.datasets[1].data = valid;
  chart.update("none");
  const parts = [];
  if (latest) {
    parts.push(`step ${latest.step}` + (latest.total_steps ? ` of ${latest.total_steps}` : ""));
    for (const [k, label] of [["train_loss", "training loss"], ["valid_loss", "validation loss"],
                              ["train_mean_token_accuracy", "training token accuracy"], ["valid_mean_token_accuracy", "validation token accuracy"]]) {
      if (Number.isFinite(latest[k])) parts.push(`${label} ${num(latest[k])}`);
    }
  }
  $("latest-metrics").textContent = parts.length ? "Latest: " + parts.join(" · ") : "No metrics yet.";
}

function renderCheckpoints(rows) {
  const body = document.querySelector("#checkpoints tbody");
  body.replaceChildren();
  for (const c of [...rows].sort((a, b) => a.step_number - b.step_number)) {
    const m = c.metrics || {};
    body.append(el("tr", {}, el("td", { textContent: String(c.step_number) }),
                   el("td", { className: "mono", textContent: c.fine_tuned_model_checkpoint }),
                   el("td", { textContent: num(m.train_loss) }), el("td", { textContent: num(m.valid_loss) })));
  }
  $("checkpoints").hidden = !rows.length;
  $("checkpoints-empty").hidden = rows.length > 0;
}

async function jobAction(action) {
  const id = state.selected;
  $("job-action-error").textContent = "";
  try {
    const job = await api("POST", `/v1/fine_tuning/jobs/${enc(id)}/${action}`);
    if (id === state.selected) { state.jobs.set(id, job); renderJob(job); renderJobs(); }
    pollJob();
  } catch (e) {
    $("job-action-error").textContent = `${action}: ${e.message}`;
  }
}

async function toggleReport() {
  const frame = $("report-frame");
  if (!frame.hidden) { frame.hidden = true; $("report-open").textContent = "Show the eval report"; return; }
  try {
    // The report needs the bearer key, so it is fetched here and shown in a sandboxed frame (no scripts run).
    const html = await (await request("GET", `/v1/fine_tuning/jobs/${enc(state.selected)}/report`)).text();
    frame.srcdoc = html;
    frame.hidden = false;
    $("report-open").textContent = "Hide the eval report";
  } catch (e) {
    say("report: " + e.message);
  }
}

// ---- try it: the tuned model beside its base ----

function bubble(side, role, text) {
  const node = el("div", { className: "bubble", textContent: text });
  node.dataset.role = role;
  document.querySelector(`#chat-${side} .chat-log`).append(node);
  return node;
}

async function sendChat(text) {
  const job = state.job;
  const maxTokens = Math.max(1, Number($("chat-max-tokens").value) || 64);
  const models = { tuned: job.fine_tuned_model, base: job.model };
  $("chat-send").disabled = true;
  await Promise.all(Object.entries(models).map(async ([side, model]) => {
    const history = state.chat[side];
    history.push({ role: "user", content: text });
    bubble(side, "user", text);
    const reply = bubble(side, "assistant", "…");
    reply.classList.add("pending");
    try {
      const out = await api("POST", "/v1/chat/completions", { model, messages: history, max_tokens: maxTokens });
      const content = (out.choices[0].message && out.choices[0].message.content) || "";
      reply.textContent = content || "(an empty reply)";
      history.push({ role: "assistant", content });
    } catch (e) {
      reply.textContent = e.message;
      reply.classList.add("error");
      history.pop();  // keep the conversation alternating: the failed turn is not part of it
    }
    reply.classList.remove("pending");
  }));
  $("chat-send").disabled = false;
}

// ---- files ----

async function loadFiles() {
  const page = await api("GET", "/v1/files?purpose=fine-tune&limit=100");
  state.files = page.data;
  return page.data;
}

function renderFiles() {
  const body = document.querySelector("#files tbody");
  body.replaceChildren();
  for (const f of state.files) {
    const row = el("tr", {}, el("td", { textContent: f.filename }), el("td", { className: "mono", textContent: f.id }),
                   el("td", { textContent: String(f.bytes) }), el("td", {}, badge(f.status)));
    row.dataset.fileId = f.id;
    body.append(row);
    if (f.status === "error" && f.status_details) {
      body.append(el("tr", { className: "details" }, el("td", { colSpan: 4, className: "error-text", textContent: f.status_details })));
    }
  }
  $("files-empty").hidden = state.files.length > 0;
}

async function openFiles() {
  showView("files");
  try { await loadFiles(); renderFiles(); } catch (e) { say(e.message); }
}

async function upload(file) {
  const result = $("upload-result"), error = $("upload-error");
  result.hidden = error.hidden = true;
  $("upload-button").disabled = true;
  try {
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    let f = await api("POST", "/v1/files", form);
    // A server that validates in the background answers "uploaded" first: wait for its verdict.
    for (let i = 0; i < 120 && f.status === "uploaded"; i++) {
      await new Promise((r) => setTimeout(r, 1000));
      f = await api("GET", `/v1/files/${enc(f.id)}`);
    }
    if (f.status === "error") {
      error.replaceChildren(el("b", { textContent: `${f.filename} was refused:` }), el("pre", { textContent: f.status_details || "(no details)" }));
      error.hidden = false;
    } else {
      result.textContent = `${f.filename} is ${f.status}: ${f.id} (${f.bytes} bytes)`;
      result.hidden = false;
    }
    $("upload-form").reset();
  } catch (e) {
    error.replaceChildren(el("b", { textContent: `${file.name} was not uploaded: ` }), e.message);
    error.hidden = false;
  } finally {
    $("upload-button").disabled = false;
  }
  try { await loadFiles(); renderFiles(); } catch (e) { say(e.message); }
}

// ---- a new job ----

async function openNewJob() {
  showView("new-job");
  $("f-error").hidden = true;
  try {
    const [models, files] = await Promise.all([api("GET", "/v1/models"), loadFiles()]);
    fillSelect($("f-model"), models.data.map((m) => [m.id, m.id]));
    const ready = files.filter((f) => f.status === "processed").map((f) => [f.id, `${f.filename} · ${f.id}`]);
    fillSelect($("f-training-file"), ready);
    fillSelect($("f-validation-file"), [["", "(none)"], ...ready]);
    $("f-submit").disabled = !ready.length;
    $("f-hint").textContent = ready.length ? "" : "Upload a training file first (Files).";
  } catch (e) {
    say(e.message);
  }
}

function fillSelect(select, options) {
  const keep = select.value;
  select.replaceChildren(...options.map(([value, text]) => el("option", { value, textContent: text })));
  if (options.some(([value]) => value === keep)) select.value = keep;
}

class FormError extends Error {}

// "auto", blank (left out) or a number; anything else names the field.
function hyper(input, label, integer) {
  const raw = input.value.trim();
  if (!raw) return undefined;
  if (raw === "auto") return "auto";
  const x = Number(raw);
  if (!Number.isFinite(x) || x <= 0 || (integer && !Number.isInteger(x))) {
    throw new FormError(`${label}: "${raw}" is not ${integer ? "a positive whole number" : "a positive number"} or "auto"`);
  }
  return x;
}

function jobBody() {
  const type = $("f-method").value;
  const hp = { n_epochs: hyper($("f-n-epochs"), "Epochs", true), batch_size: hyper($("f-batch-size"), "Batch size", true),
               learning_rate_multiplier: hyper($("f-lr-multiplier"), "Learning-rate multiplier", false) };
  if (type === "dpo") hp.beta = hyper($("f-beta"), "DPO beta", false);
  for (const k of Object.keys(hp)) if (hp[k] === undefined) delete hp[k];
  const body = { model: $("f-model").value, training_file: $("f-training-file").value,
                 method: { type, [type]: { hyperparameters: hp } } };
  if ($("f-validation-file").value) body.validation_file = $("f-validation-file").value;
  if ($("f-suffix").value.trim()) body.suffix = $("f-suffix").value.trim();
  const seed = $("f-seed").value.trim();
  if (seed) {
    if (!/^\d+$/.test(seed)) throw new FormError(`Seed: "${seed}" is not a whole number`);
    body.seed = Number(seed);
  }
  const overrides = $("f-gemcut").value.trim();
  if (overrides) {
    let parsed;
    try { parsed = JSON.parse(overrides); } catch (e) { throw new FormError(`gemcut overrides: not valid JSON: ${e.message}`); }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      throw new FormError('gemcut overrides: expected a JSON object such as {"adapter": {"r": 8}}');
    }
    body.gemcut = parsed;
  }
  return body;
}

async function createJob() {
  const box = $("f-error");
  box.hidden = true;
  $("f-submit").disabled = true;
  try {
    const job = await api("POST", "/v1/fine_tuning/jobs", jobBody());
    state.jobs.set(job.id, job);
    state.jobOrder = [job.id, ...state.jobOrder.filter((id) => id !== job.id)];
    selectJob(job.id);
  } catch (e) {
    if (e instanceof FormError) box.textContent = e.message;  // found here: nothing was sent
    else box.replaceChildren(el("b", { textContent: "The job was not created: " }), e.message);
    box.hidden = false;
  } finally {
    $("f-submit").disabled = false;
  }
}

// ---- wiring ----

$("sign-in-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (key) signIn(key);
});
$("sign-out").addEventListener("click", () => signOut(""));
$("show-new-job").addEventListener("click", openNewJob);
$("show-files").addEventListener("click", openFiles);
$("jobs-more").addEventListener("click", () => loadOlderJobs().catch((e) => say(e.message)));
$("job-cancel").addEventListener("click", () => jobAction("cancel"));
$("job-pause").addEventListener("click", () => jobAction("pause"));
$("job-resume").addEventListener("click", () => jobAction("resume"));
$("report-open").addEventListener("click", toggleReport);
$("f-method").addEventListener("change", () => { $("f-beta-row").hidden = $("f-method").value !== "dpo"; });
$("job-form").addEventListener("submit", (e) => { e.preventDefault(); createJob(); });
$("upload-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const file = $("upload-file").files[0];
  if (file) upload(file);
});
$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || !state.job) return;
  $("chat-input").value = "";
  sendChat(text);
});
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-clear").addEventListener("click", () => {
  state.chat = { tuned: [], base: [] };
  for (const side of ["tuned", "base"]) document.querySelector(`#chat-${side} .chat-log`).replaceChildren();
});

if (apiKey()) signIn(apiKey()); else show("sign-in");
