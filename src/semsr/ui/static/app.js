// semsr web demo: plain JavaScript, no external assets.
"use strict";
const $ = (id) => document.getElementById(id);
// suggested: field -> value last pre-filled from priors; priorsInPrompt: the prompts came from priors (maybe edited).
// images: the current batch of uploads (image = the first, used for priors); active: ids of running/queued jobs.
const state = { config: null, methods: [], image: null, images: [], job: null, active: new Set(), result: null,
  point: null, refs: {}, suggested: {}, priorsInPrompt: false, preset: "balanced", history: [] };

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
    input.innerHTML = (o.default === null || o.default === undefined ? '<option value="">automatic</option>' : "") +
      o.choices.map((c) => `<option>${c}</option>`).join("");
    input.value = o.default === null || o.default === undefined ? "" : String(o.default);
    input.dataset.default = input.value;  // left at its default, the option is not sent
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
    showDefault(input, o);
  }
  input.dataset.dest = o.dest; input.dataset.widget = o.widget; input.dataset.type = o.type;
  if (!label.contains(input)) {
    if (o.widget === "checkbox") label.append(input, o.label); else label.append(o.label, input);
  }
  return label;
}

// The field holds the option's real default as its value (left unchanged, it is not sent); an option
// without one (null: decided at run time, e.g. a tile side) shows what that means as a placeholder.
function showDefault(el, o) {
  const none = o.default === null || o.default === undefined;
  el.value = none ? "" : String(o.default);
  el.dataset.default = el.value;
  el.placeholder = none ? "auto" : "";
}

// Show the common fields the method has, with its bounds, choices and real default values.
function setupCommon(m) {
  const common = m.common || {};
  for (const k of COMMON) {
    const el = $(k), o = common[k];
    el.closest("label").hidden = !o;
    if (!o) continue;
    if (k === "colour_fix") {
      el.innerHTML = o.choices.map((c) => `<option>${c}</option>`).join("");
      el.value = o.default; el.dataset.default = o.default;
      continue;
    }
    if (k === "prompt" || k === "negative_prompt") {
      el.placeholder = "optional: " + o.help;  // what the prompt does for this method
      continue;
    }
    if (o.min !== null && o.min !== undefined) el.min = o.min; else el.removeAttribute("min");
    if (o.max !== null && o.max !== undefined) el.max = o.max; else el.removeAttribute("max");
    showDefault(el, o);
  }
  $("diffusion").hidden = Object.keys(common).length === 0;
  $("extract").hidden = !m.suggests_priors;
}

// The output scale: the method's own factor or a smaller one (the native result resized, as --outscale).
function setupOutscale(m) {
  const sel = $("outscale"), keep = sel.value;
  const factors = [1, 1.5, 2, 3, 4, 8].filter((f) => f < m.scale);
  sel.innerHTML = `<option value="">×${m.scale} (the method's own)</option>` +
    factors.map((f) => `<option value="${f}">×${f}</option>`).join("");
  sel.value = factors.map(String).includes(keep) ? keep : "";
}

// Presets: concrete values of the method's options (from the server), shown and written into the fields.
const NAMES = { steps: "steps", guidance_scale: "guidance", colour_fix: "colour fix" };
function describePreset(values) { return Object.entries(values).map(([k, v]) => `${NAMES[k] || k} ${v}`).join(" · "); }

function setupPresets(m) {
  const presets = m.presets || {};
  $("presets-box").hidden = Object.keys(presets).length === 0;
  for (const b of document.querySelectorAll(".preset")) b.title = presets[b.dataset.preset] ? describePreset(presets[b.dataset.preset]) : "";
  applyPreset(presets.balanced ? "balanced" : null);
}

function applyPreset(name) {
  const m = currentMethod(), values = name && m.presets ? m.presets[name] : null;
  state.preset = values ? name : null;
  if (values) for (const [k, v] of Object.entries(values)) $(k).value = String(v);
  for (const b of document.querySelectorAll(".preset")) b.classList.toggle("active", b.dataset.preset === state.preset);
  $("preset-values").textContent = values ? `${name}: ${describePreset(values)}` : "custom settings";
}

function onMethodChange() {
  const m = currentMethod();
  if (!m) return;
  $("method-info").textContent = m.summary +
    (m.missing_paths && m.missing_paths.length ? ` (not configured: ${m.missing_paths.map((p) => "--" + p).join(", ")})` : "");
  setupCommon(m);
  setupOutscale(m);
  setupPresets(m);
  const fields = $("mo-fields"), adv = $("adv-fields");
  fields.innerHTML = ""; adv.innerHTML = ""; state.refs = {};
  for (const o of m.options) (o.advanced ? adv : fields).appendChild(optionField(o));  // research switches: Advanced
  $("mo-name").textContent = m.name;
  $("method-options").hidden = !m.options.some((o) => !o.advanced);
  updateRun();
  if (state.image && m.suggests_priors && !state.job) extractPriors(true);
}

function updateRun() {
  $("run").disabled = !state.image || !currentMethod() || !!state.job;
  $("run").textContent = state.images.length > 1 ? `Upscale ${state.images.length} images` : "Upscale";
}

function collect(image) {
  const m = currentMethod();
  const body = { kind: "upscale", image: image.id, method: m.name, tile: $("tile").value, outscale: $("outscale").value };
  for (const k of Object.keys(m.common || {})) body[k] = $(k).value;
  if (state.priorsInPrompt && m.priors_in_prompt) body.priors_in_prompt = true;
  const options = {};
  for (const el of document.querySelectorAll("#mo-fields [data-dest], #adv-fields [data-dest]")) {
    const d = el.dataset.dest;
    if (el.dataset.widget === "checkbox") { if (String(el.checked) !== el.dataset.default) options[d] = el.checked; }
    else if (el.dataset.widget === "image") { if (state.refs[d]) options[d] = state.refs[d]; }
    else if (el.value !== el.dataset.default) options[d] = el.value;
  }
  body.options = options;
  return body;
}

function setProgress(st, prefix) {
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
  $("progress-text").textContent = (prefix || "") + text;
}

async function submitJob(body) {
  const sub = await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  state.active.add(sub.id);
  return sub.id;
}

// Poll a job until it ends: its final status, or an error (err.cancelled when it was cancelled).
async function waitJob(id, prefix) {
  for (;;) {
    const st = await api(`/api/jobs/${id}`);
    setProgress(st, prefix);
    $("status").textContent = st.state === "queued" ? `queue position ${st.position}` : st.state;
    if (st.state !== "queued" && st.state !== "running") state.active.delete(id);
    if (st.state === "done") return st;
    if (st.state === "cancelled") { const err = new Error(st.message || "cancelled"); err.cancelled = true; throw err; }
    if (st.state === "error") throw new Error(st.message || st.state);
    await new Promise((r) => setTimeout(r, 400));
  }
}

// While jobs run: the Cancel button drops the queued ones and stops the running one after its current step.
async function withJobs(work) {
  state.job = true; updateRun();
  const cancel = $("cancel");
  cancel.hidden = false; cancel.disabled = false;
  state.cancelled = false;
  cancel.onclick = () => {
    cancel.disabled = true; state.cancelled = true;  // and submit no more of the batch
    for (const id of [...state.active].reverse())  // queued ones first, so none starts meanwhile
      api(`/api/jobs/${id}`, { method: "DELETE" }).catch(() => {});
  };
  try { return await work(); }
  finally { state.job = null; state.active.clear(); cancel.hidden = true; cancel.onclick = null; updateRun(); }
}

async function runJob(body) { return withJobs(async () => waitJob(await submitJob(body))); }

// Upscale every image of the batch: queued as jobs (the server runs one at a time; at most its max_jobs
// are queued at once, the next one each time one ends), each finished one shown and added to the
// session's results.
async function runBatch() {
  const images = state.images.slice(), ids = [];
  const submitUpTo = async (n) => {
    while (ids.length < Math.min(n, images.length) && !state.cancelled) ids.push(await submitJob(collect(images[ids.length])));
  };
  return withJobs(async () => {
    await submitUpTo(state.config.max_jobs);
    let cancelled = 0;
    for (let i = 0; i < images.length; i++) {
      if (i >= ids.length) { cancelled += 1; continue; }  // cancelled before it was submitted
      const id = ids[i];
      try {
        const st = await waitJob(id, images.length > 1 ? `image ${i + 1}/${images.length}: ` : "");
        showResult(st, images[i]);
        addHistory(st, images[i]);
      } catch (err) {
        if (!err.cancelled) throw err;
        cancelled += 1;
      }
      await submitUpTo(i + 1 + state.config.max_jobs);
    }
    if (cancelled) {
      const err = new Error(images.length === 1 ? "cancelled while running" : `${cancelled} of ${images.length} images cancelled`);
      err.cancelled = true; throw err;
    }
  });
}

function addHistory(st, image) {
  const out = st.output;
  state.history.unshift({ id: st.id, image, output: out });
  const li = document.createElement("li");
  li.dataset.job = st.id;
  const img = document.createElement("img"); img.src = `/api/jobs/${st.id}/result`; img.alt = out.filename;
  const a = document.createElement("a"); a.href = `/api/jobs/${st.id}/result?download=1`; a.download = out.filename;
  a.textContent = out.filename;
  const info = document.createElement("span"); info.className = "small muted";
  info.textContent = `${image.width}×${image.height} → ${out.width}×${out.height} · ${out.method} · ${st.elapsed.toFixed(1)} s`;
  const show = document.createElement("button"); show.type = "button"; show.className = "secondary"; show.textContent = "Show";
  show.onclick = () => showResult(st, image);
  li.append(img, a, info, show);
  $("history-list").prepend(li);
  $("history").hidden = false;
}

function showResult(st, image) {
  const out = st.output;
  image = image || state.image;
  state.result = { id: st.id, input: image, ...out };
  const after = $("after"), before = $("before");
  after.onload = () => {
    // Show small results enlarged (at least 512 px wide) and big ones fitted to the view.
    const room = $("view").clientWidth, tall = window.innerHeight * 0.7;
    const fit = Math.min(room / after.naturalWidth, tall / after.naturalHeight);
    const want = Math.max(1, Math.min(512 / after.naturalWidth, 3));
    after.style.width = Math.round(after.naturalWidth * Math.min(want, fit)) + "px";
    drawCrops();
  };
  before.src = `/api/images/${image.id}`;
  after.src = `/api/jobs/${st.id}/result`;
  $("placeholder").hidden = true; $("preview-box").hidden = true; $("compare").hidden = false;
  $("result-bar").hidden = false; $("crops").hidden = false;
  const dl = $("download");
  dl.href = `/api/jobs/${st.id}/result?download=1`; dl.download = out.filename;
  const t = out.timings;
  $("result-info").textContent = `${out.method}: ${image.width}×${image.height} → ${out.width}×${out.height} · ` +
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
  const s = r.width / r.input.width;
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

// New input images (uploads or an example): preview them; several make a batch.
async function setImages(load, label) {
  showError("");
  state.image = null; state.images = []; updateRun();
  $("drop").classList.remove("has-file");
  $("drop-text").textContent = `uploading ${label}…`;
  try {
    state.images = await load();
    state.image = state.images[0];
    $("drop-text").textContent = state.images.length === 1 ? `${state.image.name} · ${state.image.width}×${state.image.height}`
      : `${state.images.length} images: ${state.images.map((i) => i.name).join(", ")}`;
    $("drop").classList.add("has-file");
    showPreview();
    forgetSuggestions();
    if (currentMethod() && currentMethod().suggests_priors) extractPriors(true);
  } catch (err) {
    $("drop-text").textContent = "Drop images here or choose files (several = a batch)";
    showError(err.message);
  }
  updateRun();
}

async function onFiles(files) {
  files = [...(files || [])];
  if (!files.length) return;
  const images = [];
  await setImages(async () => { for (const f of files) images.push(await uploadFile(f)); return images; },
    files.length === 1 ? files[0].name : `${files.length} files`);
}

function useExample(name) {
  return setImages(async () => [await api(`/api/examples/${name}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" })], name);
}

// The uploaded images, shown at once (before any run).
function showPreview() {
  const box = $("previews"); box.innerHTML = "";
  for (const im of state.images) {
    const fig = document.createElement("figure");
    const img = document.createElement("img"); img.src = `/api/images/${im.id}`; img.alt = im.name;
    const cap = document.createElement("figcaption"); cap.textContent = `${im.name} · ${im.width}×${im.height}`;
    fig.append(img, cap); box.appendChild(fig);
  }
  $("preview-count").textContent = state.images.length > 1 ? ` (a batch of ${state.images.length})` : "";
  $("placeholder").hidden = true; $("compare").hidden = true; $("result-bar").hidden = true; $("crops").hidden = true;
  $("preview-box").hidden = false;
}

function setupExamples() {
  const box = $("examples");
  for (const ex of state.config.examples || []) {
    const b = document.createElement("button"); b.type = "button"; b.className = "secondary example"; b.dataset.example = ex.name;
    const img = document.createElement("img"); img.src = `/api/examples/${ex.name}`; img.alt = "";
    b.append(img, `${ex.name} (${ex.width}×${ex.height})`);
    b.addEventListener("click", () => useExample(ex.name));
    box.appendChild(b);
  }
  box.hidden = !(state.config.examples || []).length;
}

async function main() {
  try {
    [state.config, state.methods] = await Promise.all([api("/api/config"), api("/api/methods")]);
  } catch (err) { showError("cannot reach the server: " + err.message); return; }
  $("limits").textContent = `up to ${mb(state.config.max_upload_bytes)}, ${(state.config.max_pixels / 1e6).toFixed(1)} MP`;
  $("status").textContent = `semsr ${state.config.version}`;
  renderMethods();
  setupCompare();
  setupExamples();
  $("method").addEventListener("change", onMethodChange);
  $("file").addEventListener("change", () => onFiles($("file").files));
  for (const b of document.querySelectorAll(".preset")) b.addEventListener("click", () => applyPreset(b.dataset.preset));
  for (const k of ["steps", "guidance_scale", "colour_fix"])
    $(k).addEventListener("input", () => { if (state.preset) applyPreset(null); });  // edited by hand: custom
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); onFiles(e.dataTransfer.files); });
  $("run").addEventListener("click", async () => {
    showError(""); showNote("");
    try { await runBatch(); }
    catch (err) { if (err.cancelled) showNote(err.message); else showError(err.message); $("progress-box").hidden = true; }
  });
  $("extract").addEventListener("click", () => extractPriors(false));
}

// The fields a suggestion may pre-fill: the prompts and the method's text options, by name.
function prefillFields() {
  const common = (currentMethod() || {}).common || {}, fields = {};
  for (const k of ["prompt", "negative_prompt"]) if (common[k]) fields[k] = $(k);  // the method's own only
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
    // A suggested prompt that is only the degradation description (the default model's IRPAD text) is not
    // written into the prompt after an upload: the method adds it by itself, and the prompt box stays the
    // user's (the Extract button still fills it on request).
    const degradationOnly = auto && typeof p.prompt === "string" && p.prompt === p.degradation;
    for (const [k, el] of Object.entries(fields)) {
      if (typeof p[k] !== "string" || (degradationOnly && k === "prompt")) continue;
      el.value = p[k]; state.suggested[k] = p[k];
    }
    if (typeof p.prompt === "string" && !degradationOnly) state.priorsInPrompt = true;
    renderPriors(p);
    showNote(degradationOnly ? `${currentMethod().name} adds the degradation it sees (${p.degradation}) to its text by itself; the prompt is optional`
      : Object.keys(p).length ? "priors extracted: edit the prompts if you like, then Upscale"
      : `${currentMethod().name} suggests no priors for this image; the prompt is optional`);
  } catch (err) { if (err.cancelled) showNote(err.message); else showError(err.message); }
}
main();
