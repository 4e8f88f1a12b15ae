// semsr web demo: plain JavaScript, no external assets.
"use strict";
const $ = (id) => document.getElementById(id);
// suggested: field -> value last pre-filled from priors; priorsInPrompt: the prompts came from priors (maybe edited).
const state = { config: null, methods: [], image: null, job: null, result: null, point: null, refs: {},
  suggested: {}, priorsInPrompt: false };

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; if (msg) showNote(""); }
function showNote(msg) { const e = $("note"); e.textContent = msg; e.hidden = !msg; }
function mb(n) { return n >= 1048576 ? (n / 1048576).toFixed(1) + " MB" : Math.round(n / 1024) + " KB"; }

async function api(path, opts) {
  const res = await fetch(path, opts);
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || ("HTTP " + res.status));
  return body;
}

async function uploadFile(file) {
  if (file.size > state.config.max_upload_bytes)
    throw new Error(`${file.name}: the file is ${mb(file.size)}, above the upload limit of ${mb(state.config.max_upload_bytes)}`);
  return api("/api/images", { method: "POST", body: file,
    headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name).slice(0, 200) } });
}

function currentMethod() { return state.methods.find((m) => m.name === $("method").value); }

function renderMethods() {
  const sel = $("method");
  sel.innerHTML = "";
  for (const m of state.methods) {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (×${m.scale})` + (m.available ? "" : " — unavailable");
    o.disabled = !m.available;
    o.title = m.available ? m.summary : m.reason;
    sel.appendChild(o);
  }
  const def = state.methods.find((m) => m.name === state.config.default_method && m.available) || state.methods.find((m) => m.available);
  if (def) sel.value = def.name;
  onMethodChange();
}

// Common fields with a fixed place on the page (shown when the method has the option).
const COMMON = ["prompt", "negative_prompt", "steps", "guidance_scale", "seed", "colour_fix"];

function optionField(o) {
  const label = document.createElement("label");
  label.className = "field" + (o.widget === "checkbox" ? " check" : "");
  label.title = o.help;
  let input;
  if (o.widget === "select") {
    input = document.createElement("select");
    input.innerHTML = '<option value="">default</option>' + o.choices.map((c) => `<option>${c}</option>`).join("");
  } else if (o.widget === "checkbox") {
    input = document.createElement("input"); input.type = "checkbox"; input.checked = o.default === true;
    input.dataset.default = String(o.default === true);  // sent only when changed
  } else if (o.widget === "image") {
    input = document.createElement("input"); input.type = "file"; input.accept = "image/*";
    input.addEventListener("change", async () => {
      showError("");
      delete state.refs[o.dest];
      if (!input.files[0]) return;
      try { state.refs[o.dest] = (await uploadFile(input.files[0])).id; }
      catch (err) { input.value = ""; showError(err.message); }
    });
  } else if (o.widget === "slider") {
    input = document.createElement("input"); input.type = "range";
    input.min = o.min ?? 0; input.max = o.max ?? 1; input.step = o.step ?? 0.01; input.value = o.default ?? input.min;
    input.dataset.default = input.value;  // left at its default, the option is not sent (the method's default applies)
    const out = document.createElement("span"); out.className = "small slider-value"; out.textContent = input.value;
    input.addEventListener("input", () => { out.textContent = input.value; });
    label.append(o.label, input, out);
  } else {
    input = document.createElement("input");
    input.type = o.widget === "number" ? "number" : "text";
    if (o.type === "float") input.step = o.step ?? "any";
    if (o.min !== null && o.min !== undefined) input.min = o.min;
    if (o.max !== null && o.max !== undefined) input.max = o.max;
    input.placeholder = o.default === null || o.default === undefined || o.default === "" ? "default" : String(o.default);
  }
  input.dataset.dest = o.dest; input.dataset.widget = o.widget; input.dataset.type = o.type;
  if (!label.contains(input)) {
    if (o.widget === "checkbox") label.append(input, o.label); else label.append(o.label, input);
  }
  return label;
}

// Show the common fields the method has, with its bounds, choices and defaults as placeholders.
function setupCommon(m) {
  const common = m.common || {};
  for (const k of COMMON) {
    const el = $(k), o = common[k];
    el.closest("label").hidden = !o;
    if (!o) continue;
    if (k === "colour_fix") {
      el.innerHTML = '<option value="">default</option>' + o.choices.map((c) => `<option>${c}</option>`).join("");
      continue;
    }
    if (o.min !== null && o.min !== undefined) el.min = o.min; else el.removeAttribute("min");
    if (o.max !== null && o.max !== undefined) el.max = o.max; else el.removeAttribute("max");
    el.placeholder = o.default === null || o.default === undefined || o.default === "" ? "default" : String(o.default);
  }
  $("diffusion").hidden = Object.keys(common).length === 0;
  $("extract").hidden = !m.suggests_priors;
}

function onMethodChange() {
  const m = currentMethod();
  if (!m) return;
  $("method-info").textContent = m.summary +
    (m.missing_paths && m.missing_paths.length ? ` (not configured: ${m.missing_paths.map((p) => "--" + p).join(", ")})` : "");
  setupCommon(m);
  const fields = $("mo-fields");
  fields.innerHTML = ""; state.refs = {};
  for (const o of m.options) fields.appendChild(optionField(o));
  $("mo-name").textContent = m.name;
  $("method-options").hidden = m.options.length === 0;
  updateRun();
  if (state.image && m.suggests_priors && !state.job) extractPriors(true);
}

function updateRun() { $("run").disabled = !state.image || !currentMethod() || !!state.job; }

function collect() {
  const m = currentMethod();
  const body = { kind: "upscale", image: state.image.id, method: m.name, tile: $("tile").value };
  for (const k of Object.keys(m.common || {})) body[k] = $(k).value;
  if (state.priorsInPrompt && m.priors_in_prompt) body.priors_in_prompt = true;
  const options = {};
  for (const el of $("mo-fields").querySelectorAll("[data-dest]")) {
    const d = el.dataset.dest;
    if (el.dataset.widget === "checkbox") { if (String(el.checked) !== el.dataset.default) options[d] = el.checked; }
    else if (el.dataset.widget === "image") { if (state.refs[d]) options[d] = state.refs[d]; }
    else if (el.dataset.widget === "slider") { if (el.value !== el.dataset.default) options[d] = el.value; }
    else if (el.value !== "") options[d] = el.value;
  }
  body.options = options;
  return body;
}

function setProgress(st) {
  $("progress-box").hidden = false;
  const bar = $("bar");
  let text;
  if (st.state === "queued") {
    text = `waiting in queue: ${st.position} job${st.position === 1 ? "" : "s"} ahead`;
    bar.className = ""; bar.style.width = "0";
  } else if (st.state === "running") {
    const frac = st.total ? st.done / st.total : 0;
    text = st.total ? `${st.stage}: ${st.done}/${st.total}` : `${st.stage || "starting"}…`;
    text += ` (${st.elapsed.toFixed(1)} s)`;
    if (st.total) { bar.className = ""; bar.style.width = (100 * frac).toFixed(1) + "%"; } else { bar.className = "indeterminate"; bar.style.width = ""; }
  } else if (st.state === "done") { text = `done in ${st.elapsed.toFixed(1)} s`; bar.className = ""; bar.style.width = "100%"; }
  else { text = st.state; bar.className = ""; }
  $("progress-text").textContent = text;
}

async function runJob(body) {
  const sub = await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  state.job = sub.id; updateRun();
  // Cancel: a queued job is dropped, a running one stops after its current step.
  const cancel = $("cancel");
  cancel.hidden = false; cancel.disabled = false;
  cancel.onclick = () => {
    cancel.disabled = true;
    api(`/api/jobs/${sub.id}`, { method: "DELETE" }).catch((err) => showError(err.message));
  };
  try {
    for (;;) {
      const st = await api(`/api/jobs/${sub.id}`);
      setProgress(st);
      $("status").textContent = st.state === "queued" ? `queue position ${st.position}` : st.state;
      if (st.state === "done") return st;
      if (st.state === "cancelled") { const err = new Error(st.message || "cancelled"); err.cancelled = true; throw err; }
      if (st.state === "error") throw new Error(st.message || st.state);
      await new Promise((r) => setTimeout(r, 400));
    }
  } finally { state.job = null; cancel.hidden = true; cancel.onclick = null; updateRun(); }
}

function showResult(st) {
  const out = st.output;
  state.result = { id: st.id, ...out };
  const after = $("after"), before = $("before");
  after.onload = () => {
    // Show small results enlarged (at least 512 px wide) and big ones fitted to the view.
    const room = $("view").clientWidth, tall = window.innerHeight * 0.7;
    const fit = Math.min(room / after.naturalWidth, tall / after.naturalHeight);
    const want = Math.max(1, Math.min(512 / after.naturalWidth, 3));
    after.style.width = Math.round(after.naturalWidth * Math.min(want, fit)) + "px";
    drawCrops();
  };
  before.src = `/api/images/${state.image.id}`;
  after.src = `/api/jobs/${st.id}/result`;
  $("placeholder").hidden = true; $("compare").hidden = false;
  $("result-bar").hidden = false; $("crops").hidden = false;
  const dl = $("download");
  dl.href = `/api/jobs/${st.id}/result?download=1`; dl.download = out.filename;
  const t = out.timings;
  $("result-info").textContent = `${out.method}: ${state.image.width}×${state.image.height} → ${out.width}×${out.height} · ` +
    `upscale ${t.upscale.toFixed(2)} s` + (t.load > 0.01 ? ` · load ${t.load.toFixed(2)} s` : "");
  renderPriors(out.priors);
}

function renderPriors(priors) {
  const list = $("priors-list"); list.innerHTML = "";
  const keys = Object.keys(priors || {});
  $("priors").hidden = keys.length === 0;
  for (const k of keys) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); const v = priors[k];
    if (v && typeof v === "object" && v.image) { const img = document.createElement("img"); img.src = v.image; img.alt = k; dd.appendChild(img); }
    else dd.textContent = Array.isArray(v) ? v.join(", ") : (typeof v === "object" ? JSON.stringify(v) : String(v));
    list.append(dt, dd);
  }
}

function drawCrops() {
  const r = state.result; if (!r) return;
  const after = $("after"), before = $("before");
  if (!after.complete || !before.complete || !after.naturalWidth) return;
  const s = r.width / state.image.width;
  const p = state.point || { x: 0.5, y: 0.5 };
  const size = 128, view = 256;  // 128 output pixels shown 2x
  let ax = Math.round(p.x * r.width - size / 2), ay = Math.round(p.y * r.height - size / 2);
  ax = Math.max(0, Math.min(ax, r.width - size)); ay = Math.max(0, Math.min(ay, r.height - size));
  for (const [id, img, scale] of [["crop-after", after, 1], ["crop-before", before, 1 / s]]) {
    const c = $(id).getContext("2d");
    c.imageSmoothingEnabled = false;
    c.clearRect(0, 0, view, view);
    c.drawImage(img, ax * scale, ay * scale, size * scale, size * scale, 0, 0, view, view);
  }
}

function setupCompare() {
  const slider = $("slider");
  const move = () => {
    const v = slider.value;
    $("before-clip").style.clipPath = `inset(0 ${100 - v}% 0 0)`;
    $("handle").style.left = v + "%";
  };
  slider.addEventListener("input", move);
  slider.addEventListener("click", (ev) => {
    const rect = slider.getBoundingClientRect();
    state.point = { x: (ev.clientX - rect.left) / rect.width, y: (ev.clientY - rect.top) / rect.height };
    drawCrops();
  });
  move();
}

async function onFile(file) {
  showError("");
  state.image = null; updateRun();
  $("drop").classList.remove("has-file");
  if (!file) return;
  $("drop-text").textContent = `uploading ${file.name}…`;
  try {
    state.image = await uploadFile(file);
    $("drop-text").textContent = `${state.image.name} · ${state.image.width}×${state.image.height}`;
    $("drop").classList.add("has-file");
    $("before").src = `/api/images/${state.image.id}`;
    forgetSuggestions();
    if (currentMethod() && currentMethod().suggests_priors) extractPriors(true);
  } catch (err) {
    $("drop-text").textContent = "Drop an image here or choose a file";
    showError(err.message);
  }
  updateRun();
}

async function main() {
  try {
    [state.config, state.methods] = await Promise.all([api("/api/config"), api("/api/methods")]);
  } catch (err) { showError("cannot reach the server: " + err.message); return; }
  $("limits").textContent = `up to ${mb(state.config.max_upload_bytes)}, ${(state.config.max_pixels / 1e6).toFixed(1)} MP`;
  $("status").textContent = `semsr ${state.config.version}`;
  renderMethods();
  setupCompare();
  $("method").addEventListener("change", onMethodChange);
  $("file").addEventListener("change", () => onFile($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); onFile(e.dataTransfer.files[0]); });
  $("run").addEventListener("click", async () => {
    showError(""); showNote("");
    try { showResult(await runJob(collect())); }
    catch (err) { if (err.cancelled) showNote(err.message); else showError(err.message); $("progress-box").hidden = true; }
  });
  $("extract").addEventListener("click", () => extractPriors(false));
}

// The fields a suggestion may pre-fill: the prompts and the method's text options, by name.
function prefillFields() {
  const fields = { prompt: $("prompt"), negative_prompt: $("negative_prompt") };
  for (const el of $("mo-fields").querySelectorAll("[data-dest]"))
    if (el.dataset.widget === "text") fields[el.dataset.dest] = el;
  return fields;
}

// A new image: empty the fields that still hold the previous image's suggestion (edited ones stay).
function forgetSuggestions() {
  for (const [k, el] of Object.entries(prefillFields()))
    if (k in state.suggested && el.value === state.suggested[k]) el.value = "";
  if ($("prompt").value === "") state.priorsInPrompt = false;
  state.suggested = {};
}

// Run the method's prior extraction and pre-fill the prompts. auto (after an upload or a method change):
// quietly, and only when the user has not typed into the fields (empty or still the last suggestion).
async function extractPriors(auto) {
  showError("");
  if (!state.image) { showError("upload an image first"); return; }
  const fields = prefillFields();
  if (auto && Object.entries(fields).some(([k, el]) => el.value !== "" && el.value !== state.suggested[k])) return;
  try {
    const st = await runJob({ kind: "priors", image: state.image.id, method: currentMethod().name });
    const p = st.output.priors || {};
    state.suggested = {};
    for (const [k, el] of Object.entries(fields)) {
      if (typeof p[k] !== "string") continue;
      el.value = p[k]; state.suggested[k] = p[k];
    }
    if (typeof p.prompt === "string") state.priorsInPrompt = true;
    renderPriors(p);
    showNote(Object.keys(p).length ? "priors extracted: edit the prompts if you like, then Upscale"
      : `${currentMethod().name} extracts no priors before running; write the prompts yourself`);
  } catch (err) { if (err.cancelled) showNote(err.message); else showError(err.message); }
}
main();
