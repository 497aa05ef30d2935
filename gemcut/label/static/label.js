// The ranking page: fetch the prompt leased to this labeler, let them order its completions, send it back.
// Plain browser JavaScript on purpose (no build step); the API is documented in gemcut/label/app.py.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { task: null, ranked: [], busy: false, keysRequired: false };

function identity() {
  return { name: localStorage.getItem("gemcut-labeler") || "", key: localStorage.getItem("gemcut-labeler-key") || "" };
}

async function api(path, body) {
  const who = identity();
  const headers = { "Content-Type": "application/json" };
  if (who.name) headers["X-Labeler"] = who.name;
  if (who.key) headers["X-Labeler-Key"] = who.key;
  const res = await fetch("/label/api/" + path, body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(data.detail || res.statusText);
    err.status = res.status;
    throw err;
  }
  return data;
}

function say(text) { $("status").textContent = text || ""; }

function show(section) {
  for (const id of ["login", "work", "done"]) $(id).hidden = id !== section;
  const who = identity();
  $("who-name").textContent = section === "login" ? "" : "labeling as " + (who.name || "key holder");
  $("logout").hidden = section === "login";
}

function card(c, tag) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.id = c.id;
  li.innerHTML = '<span class="tag"></span><span class="text"></span>';
  li.querySelector(".tag").textContent = tag;
  li.querySelector(".text").textContent = c.text;  // never innerHTML: completions are model output
  return li;
}

// A chat prompt as role-labelled blocks (role, then the text); a plain prompt as its text. Everything from the
// server goes in through textContent, never innerHTML: prompts are user data.
function showPrompt(t) {
  const box = $("prompt");
  box.replaceChildren();
  box.classList.toggle("chat", Boolean(t.messages));
  if (!t.messages) { box.textContent = t.prompt; return; }
  for (const m of t.messages) {
    const block = document.createElement("div");
    block.className = "message";
    block.dataset.role = m.role;
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = m.name ? `${m.role} (${m.name})` : m.role;
    const content = document.createElement("div");
    content.className = "content";
    const calls = (m.tool_calls || []).map((c) => `→ ${c.function.name}(${c.function.arguments})`);
    content.textContent = [m.content, ...calls].filter(Boolean).join("\n");
    block.append(role, content);
    box.appendChild(block);
  }
}

function render() {
  const t = state.task;
  showPrompt(t);
  const ranked = $("ranked"), pool = $("pool");
  ranked.replaceChildren();
  pool.replaceChildren();
  const byId = new Map(t.completions.map((c, i) => [c.id, { c, n: i + 1 }]));
  state.ranked.forEach((id, r) => {
    const li = card(byId.get(id).c, "#" + (r + 1));
    li.draggable = true;
    li.addEventListener("click", () => { state.ranked = state.ranked.filter((x) => x !== id); render(); });
    li.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/plain", String(id)); li.classList.add("dragging"); });
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (e) => e.preventDefault());
    li.addEventListener("drop", (e) => { e.preventDefault(); e.stopPropagation(); moveTo(Number(e.dataTransfer.getData("text/plain")), r); });
    ranked.appendChild(li);
  });
  t.completions.forEach((c, i) => {
    if (state.ranked.includes(c.id)) return;
    const li = card(c, String(i + 1));
    li.draggable = true;
    li.addEventListener("click", () => pick(c.id));
    li.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", String(c.id)));
    pool.appendChild(li);
  });
  $("submit").disabled = t.completions.length - state.ranked.length > 1;
}

function pick(id) {
  if (!state.ranked.includes(id)) state.ranked.push(id);
  render();
}

function moveTo(id, index) {
  state.ranked = state.ranked.filter((x) => x !== id);
  state.ranked.splice(index, 0, id);
  render();
}

function setProgress(p) {
  const frac = p.prompts ? p.ranked / p.prompts : 0;
  $("progress-fill").style.width = (100 * frac).toFixed(1) + "%";
  $("progress-text").textContent = `${p.ranked} of ${p.prompts} prompts ranked · ${p.remaining} left · ${p.mine} by you`;
}

async function loadNext() {
  state.busy = true;
  try {
    const [t, p] = [await api("next"), await api("progress")];
    setProgress(p);
    if (t.done) { state.task = null; show("done"); return; }
    state.task = t;
    state.ranked = [];
    $("flag-note").value = "";
    show("work");
    render();
    say("");
  } catch (e) {
    if (e.status === 401 || e.status === 400) { show("login"); }
    say(e.message);
  } finally {
    state.busy = false;
  }
}

async function act(path, body) {
  if (state.busy || !state.task) return;
  state.busy = true;
  try {
    await api(path, Object.assign({ prompt_id: state.task.prompt_id }, body));
    state.busy = false;
    await loadNext();
  } catch (e) {
    say(e.message);
    state.busy = false;
    if (e.status === 409) await loadNext();  // lease lost: take what the queue gives now
  }
}

function submit() {
  if (!state.task || $("submit").disabled) return;
  // The one left in the pool is the worst: no need to click it.
  const rest = state.task.completions.map((c) => c.id).filter((id) => !state.ranked.includes(id));
  act("rank", { order: state.ranked.concat(rest) });
}

$("submit").addEventListener("click", submit);
$("undo").addEventListener("click", () => { state.ranked.pop(); render(); });
$("skip").addEventListener("click", () => act("skip", {}));
$("flag").addEventListener("click", () => act("flag", { note: $("flag-note").value || null }));
$("reload").addEventListener("click", loadNext);
$("ranked").addEventListener("dragover", (e) => e.preventDefault());
$("ranked").addEventListener("drop", (e) => { e.preventDefault(); moveTo(Number(e.dataTransfer.getData("text/plain")), state.ranked.length); });
$("logout").addEventListener("click", () => { localStorage.removeItem("gemcut-labeler"); localStorage.removeItem("gemcut-labeler-key"); show("login"); });
$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem("gemcut-labeler", $("name").value.trim());
  localStorage.setItem("gemcut-labeler-key", $("key").value.trim());
  loadNext();
});

document.addEventListener("keydown", (e) => {
  if (!state.task || $("work").hidden || e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key >= "1" && e.key <= "9") {
    const c = state.task.completions[Number(e.key) - 1];
    if (c) pick(c.id);
  } else if (e.key === "Enter") { e.preventDefault(); submit(); }
  else if (e.key === "Backspace") { e.preventDefault(); state.ranked.pop(); render(); }
  else if (e.key === "s") act("skip", {});
  else if (e.key === "f") act("flag", { note: $("flag-note").value || null });
});

(async function start() {
  state.keysRequired = (await api("config")).keys_required;
  $("key-row").hidden = !state.keysRequired;
  $("name").closest("label").hidden = state.keysRequired;
  const who = identity();
  if (who.name || who.key) loadNext(); else show("login");
})();
