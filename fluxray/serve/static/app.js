// The fluxray page: upload + train, watch a job, generate. Plain JS over the /v1 API.
"use strict";

const BASE = new URL(".", location.href);
const $ = (id) => document.getElementById(id);
const FINAL = ["SUCCEEDED", "FAILED", "STOPPED"];
const SIMPLE = ["steps", "learning_rate", "rank", "batch_size", "sample_every"];
const state = { job: null, dataset: null, timer: null, blobs: new Map(), defaults: null };

// -- HTTP -------------------------------------------------------------------------------
function headers() {
  const t = localStorage.getItem("fluxray.token");
  return t ? { Authorization: "Bearer " + t } : {};
}

async function api(path, options = {}) {
  const res = await fetch(new URL(path, BASE), { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try {
      const body = await res.json();
      msg = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      if (body.report) msg += "\n" + problems(body.report);
    } catch (_) { /* not JSON */ }
    if (res.status === 401) msg = "This service needs an API token: enter it at the top right. (" + msg + ")";
    throw new Error(msg);
  }
  return res;
}
const getJSON = async (path) => (await api(path)).json();

// Images behind the token can't be <img src>: fetch them once and keep a blob URL per path.
async function imageURL(path) {
  if (!state.blobs.has(path)) {
    state.blobs.set(path, api(path).then((r) => r.blob()).then((b) => URL.createObjectURL(b)));
  }
  return state.blobs.get(path);
}

function showError(e) {
  const el = $("error");
  el.textContent = e ? String(e.message || e) : "";
  el.hidden = !e;
}

function problems(report) {
  return (report.problems || []).filter((p) => p.severity !== "info").map((p) => `${p.severity}: ${p.message}`).join("\n");
}

// -- defaults and training ----------------------------------------------------------------
async function loadDefaults() {
  const d = await getJSON("v1/defaults");
  state.defaults = d;
  for (const k of SIMPLE) $(k).value = d.simple[k];
  $("ema").checked = d.simple.ema;
  $("sample_prompts").value = d.simple.sample_prompts.map((p) => (typeof p === "string" ? p : p.prompt)).join("\n");
  $("config_yaml").value = d.config_yaml;
  const g = d.generate;
  $("seed").value = g.seed; $("gen_steps").value = g.steps; $("guidance").value = g.guidance;
  $("width").value = g.width; $("height").value = g.height; $("lora_scale").value = g.lora_scale;
}

function jobBody(datasetId) {
  if ($("expert").checked) return { dataset_id: datasetId, config_yaml: $("config_yaml").value };
  const body = { dataset_id: datasetId, ema: $("ema").checked };
  for (const k of SIMPLE) body[k] = Number($(k).value);
  body.sample_prompts = $("sample_prompts").value.split("\n").map((s) => s.trim()).filter(Boolean);
  return body;
}

async function uploadDataset() {
  const files = $("images").files;
  if (!files.length) throw new Error("Choose the images (or one zip) first.");
  const form = new FormData();
  for (const f of files) form.append("images", f, f.name);
  if ($("captions").files.length) form.append("captions", $("captions").files[0]);
  form.append("trigger_word", $("trigger").value);
  const res = await (await api("v1/datasets", { method: "POST", body: form })).json();
  const r = res.report;
  $("dataset-report").textContent = `Dataset ${res.dataset_id}: ${r.images.length} images, trigger word "${r.trigger_word}".`
    + (problems(r) ? "\n" + problems(r) : "");
  return res.dataset_id;
}

async function startTraining() {
  showError(null);
  $("start").disabled = true;
  try {
    // One dataset per chosen set of files: a second job on the same upload reuses it.
    const key = [...$("images").files].map((f) => f.name + f.size).join("|") + $("trigger").value;
    if (!state.dataset || state.dataset.key !== key) {
      state.dataset = { key, id: await uploadDataset() };
      advise();  // now with the image count
    }
    const res = await (await api("v1/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(jobBody(state.dataset.id)),
    })).json();
    await refreshJobs();
    selectJob(res.job_id);
  } catch (e) {
    showError(e);
  } finally {
    $("start").disabled = false;
  }
}

async function advise() {
  // What the user's guide would change in these settings; it never blocks a job.
  if (!state.defaults) return;
  try {
    const body = jobBody(state.dataset ? state.dataset.id : null);
    const items = await (await api("v1/advise", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).json();
    // The memory plan says what fluxray chose (its `fix` is the choice); the others what to change.
    $("advice").textContent = items.map((a) => a.id === "memory.peak" ? `${a.message}\n    ${a.fix}`
      : `${a.severity}: ${a.message}\n    fix: ${a.fix}`).join("\n");
    $("advice").hidden = !items.length;
  } catch (e) {
    $("advice").textContent = String(e.message || e);
    $("advice").hidden = false;
  }
}

// -- jobs ------------------------------------------------------------------------------------
async function refreshJobs() {
  const jobs = await getJSON("v1/jobs");
  const body = $("job-list").tBodies[0];
  body.replaceChildren(...jobs.map((j) => {
    const tr = document.createElement("tr");
    tr.dataset.job = j.job_id;
    tr.className = j.job_id === state.job ? "selected" : "";
    tr.innerHTML = `<td></td><td class="status"></td><td>${Math.round(100 * j.progress)}% (${j.step}/${j.total})</td>`;
    tr.cells[0].textContent = j.job_id;
    tr.cells[1].textContent = j.status + (j.queue_position ? ` #${j.queue_position}` : "");
    tr.cells[1].title = j.status === "PENDING" ? j.message || "" : "";
    tr.onclick = () => selectJob(j.job_id);
    return tr;
  }));
  await refreshLoras();
}

function selectJob(id) {
  state.job = id;
  for (const tr of $("job-list").tBodies[0].rows) tr.className = tr.dataset.job === id ? "selected" : "";
  $("logs").hidden = true;
  $("job").hidden = false;
  state.prefilled = false;
  pollJob();
}

async function pollJob() {
  clearTimeout(state.timer);
  const id = state.job;
  if (!id) return;
  let job;
  try {
    job = await getJSON(`v1/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    showError(e);
    state.timer = setTimeout(pollJob, 5000);
    return;
  }
  if (id !== state.job) return;
  renderJob(job);
  if (!FINAL.includes(job.status)) state.timer = setTimeout(pollJob, 2000);
  else refreshJobs().catch(showError);
}

function renderJob(job) {
  $("job-id").textContent = job.job_id;
  $("job-status").textContent = job.status;
  $("job-status").dataset.status = job.status;
  const pct = Math.round(100 * job.progress);
  const bar = $("progress");
  bar.setAttribute("aria-valuenow", String(pct));
  bar.querySelector(".bar").style.width = pct + "%";
  bar.querySelector(".label").textContent = pct + "%";
  $("job-step").textContent = `step ${job.step} / ${job.total}`;
  $("job-eta").textContent = job.eta_seconds == null ? "–" : duration(job.eta_seconds);
  $("job-loss").textContent = job.loss == null ? "–" : job.loss.toFixed(4);
  $("job-sampling").textContent = job.sample_seconds == null ? "–" : duration(job.sample_seconds);
  $("job-convergence").textContent = job.convergence
    ? job.convergence + (job.best_step != null ? ` · best checkpoint: step ${job.best_step}` : "")
      + (job.similarity ? ` · ${job.similarity}` : "") : "";
  // Why a job waits (and its place in the cluster's queue), or why it failed.
  const place = job.queue_position ? `#${job.queue_position} in the queue: ` : "";
  $("job-message").textContent = ["PENDING", "FAILED", "UNKNOWN"].includes(job.status) ? place + (job.message || "") : "";
  const ml = job.mlflow;
  $("job-mlflow").innerHTML = "";
  if (ml && ml.run_id) {
    const a = document.createElement(ml.url ? "a" : "span");
    if (ml.url) { a.href = ml.url; a.target = "_blank"; }
    a.textContent = ` · MLflow run ${ml.run_id.slice(0, 8)}`;
    a.title = ml.tracking_uri;
    $("job-mlflow").append(a);
  }
  drawLoss(job.losses, job.val_losses);
  drawLikeness(job.likeness || []);
  renderGallery(job.samples);
  updateLoraPicker(job);
  if (!state.prefilled && job.sample_prompts.length) {
    // Generate with the first preview's settings, so a preview and its regeneration compare 1:1.
    const p = job.sample_prompts[0];
    $("prompt").value = p.prompt; $("seed").value = p.seed; $("gen_steps").value = p.steps;
    $("guidance").value = p.guidance; $("width").value = p.width; $("height").value = p.height;
    $("lora_scale").value = p.lora_scale;
    state.prefilled = true;
  }
}

function duration(s) {
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.round((s % 3600) / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

function drawLoss(losses, valLosses) {
  drawLines($("loss-chart"), [{ points: losses, cls: "loss", key: "loss" }, { points: valLosses, cls: "val-loss", key: "val loss" }],
    "no loss yet");
}

function drawLikeness(likeness) {
  // The previews' likeness to the training images (`sample_similarity`), beside the loss; only where scored.
  $("likeness-chart").hidden = !likeness.length;
  if (likeness.length) drawLines($("likeness-chart"), [{ points: likeness, cls: "likeness", key: "likeness" }], "");
}

function drawLines(svg, series, empty) {
  const W = 600, H = 200, P = 28;
  const all = series.flatMap((s) => s.points);
  if (!all.length) { svg.innerHTML = `<text x="${W / 2}" y="${H / 2}" text-anchor="middle" class="axis">${empty}</text>`; return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = (x) => P + ((x - x0) / (x1 - x0)) * (W - 2 * P);
  const Y = (y) => H - P - ((y - y0) / (y1 - y0)) * (H - 2 * P);
  const line = (pts) => pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
  const drawn = series.filter((s) => s.points.length);
  svg.innerHTML =
    `<line x1="${P}" y1="${H - P}" x2="${W - P}" y2="${H - P}" class="axis-line"/>` +
    `<line x1="${P}" y1="${P}" x2="${P}" y2="${H - P}" class="axis-line"/>` +
    `<text x="${P}" y="${P - 8}" class="axis">${y1.toPrecision(3)}</text>` +
    `<text x="${P}" y="${H - 8}" class="axis">${y0.toPrecision(3)} · step ${x0}</text>` +
    `<text x="${W - P}" y="${H - 8}" text-anchor="end" class="axis">step ${x1}</text>` +
    drawn.map((s) => `<path d="${line(s.points)}" class="${s.cls}"/>`).join("") +
    `<text x="${W - P}" y="${P - 8}" text-anchor="end" class="axis">` +
    series.map((s) => `<tspan class="${s.cls}-key">— ${s.key}</tspan>`).join(" ") + `</text>`;
}

function renderGallery(samples) {
  const gallery = $("gallery");
  for (const s of samples) {
    let row = gallery.querySelector(`[data-step="${s.step}"]`);
    if (!row) {
      row = document.createElement("div");
      row.className = "step";
      row.dataset.step = s.step;
      row.innerHTML = `<div class="step-label">step ${s.step}</div><div class="thumbs"></div>`;
      gallery.prepend(row);  // newest first
    }
    const thumbs = row.querySelector(".thumbs");
    for (const url of s.images) {
      if (thumbs.querySelector(`[data-src="${CSS.escape(url)}"]`)) continue;
      const img = document.createElement("img");
      img.dataset.src = url;
      img.alt = `preview at step ${s.step}`;
      thumbs.append(img);
      imageURL(url).then((u) => { img.src = u; }).catch(showError);
    }
  }
  for (const row of [...gallery.children]) if (!samples.some((s) => String(s.step) === row.dataset.step)) row.remove();
}

// -- generate --------------------------------------------------------------------------------
async function refreshLoras() {
  const loras = await getJSON("v1/loras");
  const group = ensureGroup("final", "Trained LoRAs");
  fillGroup(group, loras.filter((l) => !l.error).map((l) => [l.id, `${l.id} (trigger ${l.trigger_word}, ${l.steps} steps)`]));
}

function updateLoraPicker(job) {
  const group = ensureGroup("steps", `Steps of ${job.job_id}`);
  fillGroup(group, job.step_loras.map((id) => [id, id]));
  if (job.lora && !$("lora").querySelector(`option[value="${CSS.escape(job.lora)}"]`)) refreshLoras().catch(showError);
}

function ensureGroup(key, label) {
  let g = $("lora").querySelector(`optgroup[data-key="${key}"]`);
  if (!g) { g = document.createElement("optgroup"); g.dataset.key = key; $("lora").append(g); }
  g.label = label;
  return g;
}

function fillGroup(group, items) {
  const chosen = $("lora").value;
  group.replaceChildren(...items.map(([value, text]) => new Option(text, value)));
  if ([...$("lora").options].some((o) => o.value === chosen)) $("lora").value = chosen;
}

async function generate() {
  showError(null);
  $("generate-btn").disabled = true;
  try {
    const body = {
      prompt: $("prompt").value, lora: $("lora").value || null, seed: Number($("seed").value),
      steps: Number($("gen_steps").value), guidance: Number($("guidance").value), width: Number($("width").value),
      height: Number($("height").value), lora_scale: Number($("lora_scale").value),
    };
    const blob = await (await api("v1/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).blob();
    const img = $("result-img");
    if (img.src) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    $("result-caption").textContent = `${body.lora || "base model"} · seed ${body.seed} · ${body.width}×${body.height}`;
    $("result").hidden = false;
  } catch (e) {
    showError(e);
  } finally {
    $("generate-btn").disabled = false;
  }
}

// -- wiring ------------------------------------------------------------------------------------
function wire() {
  $("token").value = localStorage.getItem("fluxray.token") || "";
  $("token").onchange = () => { localStorage.setItem("fluxray.token", $("token").value.trim()); state.blobs.clear(); load(); };
  $("expert").onchange = () => { $("config_yaml").hidden = !$("expert").checked; $("simple").hidden = $("expert").checked; };
  $("start").onclick = startTraining;
  $("generate-btn").onclick = generate;
  $("stop").onclick = async () => {
    try { await api(`v1/jobs/${encodeURIComponent(state.job)}/stop`, { method: "POST" }); pollJob(); } catch (e) { showError(e); }
  };
  $("show-logs").onclick = async () => {
    try {
      $("logs").textContent = await (await api(`v1/jobs/${encodeURIComponent(state.job)}/logs?tail=200`)).text();
      $("logs").hidden = false;
    } catch (e) { showError(e); }
  };
  let typing;  // advice follows the settings as they are typed, a moment after the last key
  for (const k of SIMPLE.concat(["sample_prompts", "ema", "expert", "config_yaml"])) {
    $(k).addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(advise, 400); });
  }
}

async function load() {
  try {
    showError(null);
    await loadDefaults();
    await refreshJobs();
    advise();
  } catch (e) {
    showError(e);
  }
}

wire();
load();
