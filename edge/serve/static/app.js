// The page of `edge serve`: one form, one job at a time, a gallery. Plain JS, no build step, no network
// beyond the server that served it (a board on a home network has no internet).
// API: /api/info, /api/jobs (+ /events as server-sent events, /cancel), /api/gallery. See edge/serve/.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "edge-serve-token";
const ONE_COLUMN = matchMedia("(max-width: 700px)");  // as style.css: the result is below the form

const state = {
  info: null,       // GET /api/info
  job: null,        // {id, source: EventSource|null, poll: timer|null, finished: bool}
  lastSeed: null,   // the seed the server used for the last job (for "Reuse last")
  source: null,     // the uploaded start image (HTMLImageElement), null when none
  maskPainted: false,
  galleryShown: 0,
};

// ------------------------------------------------------------------ access token and requests

// The page is opened as /?token=T on a non-loopback bind: keep T, take it out of the address bar.
function readToken() {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    localStorage.setItem(TOKEN_KEY, fromUrl);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return localStorage.getItem(TOKEN_KEY);
}
const token = readToken();

// EventSource and <img> cannot send headers: the token goes in the query string there.
function withToken(path, extra = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(extra)) url.searchParams.set(k, v);
  if (token) url.searchParams.set("token", token);
  return url.pathname + url.search;
}

class ApiError extends Error {
  constructor(message, status, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function api(path, body) {
  const init = { headers: {} };
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    let message = data.error || `${response.status} ${response.statusText}`;
    if (response.status === 401) {
      localStorage.removeItem(TOKEN_KEY);
      message = "Access token needed: open the address the server printed at start (…/?token=…).";
    }
    throw new ApiError(message, response.status, response.headers.get("Retry-After"));
  }
  return data;
}

// ------------------------------------------------------------------ status line

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  const el = $("error");
  el.textContent = text;
  el.hidden = !text;
}

function formatBytes(n) {
  if (n === null || n === undefined) return null;
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GB`;
  return `${(n / 2 ** 20).toFixed(0)} MB`;
}

// ------------------------------------------------------------------ device, bundles, sizes

async function loadInfo() {
  const info = await api("/api/info");
  state.info = info;
  $("device-threads").textContent = info.threads ?? "default";
  $("device-budget").textContent = formatBytes(info.memory_budget) ?? "none";
  $("device-peak").textContent = formatBytes(info.plan_peak_bytes)
    ?? (info.memory_budget === null ? "no budget: all resident" : "not planned yet");
  $("device-cpu").textContent = info.cpu || "unknown";

  const bundle = $("bundle");
  if (bundle.options.length === 0) {
    for (const b of info.bundles) bundle.add(new Option(`${b.name} (${b.precision})`, b.name));
    bundle.value = info.loaded ?? info.current;  // the one in memory: choosing another reloads
    $("bundle-field").hidden = info.bundles.length < 2;
    fillSchedulers(info.schedulers);
    if (info.limits && info.limits.max_steps) $("steps").max = info.limits.max_steps;
    fillSizes();
    fillDefaults();
  }
  showBundle();
  return info;
}

function currentBundle() {
  const name = $("bundle").value;
  return state.info.bundles.find((b) => b.name === name) || state.info.bundles[0];
}

// The bundle in memory ("loaded"; none yet: the one requests get by default, "current").
function showBundle() {
  const info = state.info;
  const running = info.bundles.find((b) => b.name === (info.loaded ?? info.current)) || currentBundle();
  $("device-bundle").textContent = running.name;
  $("device-precision").textContent = running.precision;
  $("device-backend").textContent = running.backend ?? info.backend;
}

// The chosen bundle's own steps, guidance and scheduler (a few-step model's: SD-Turbo 1 step, no guidance).
function fillDefaults() {
  const d = currentBundle().defaults;
  if (!d) return;
  $("steps").value = d.steps;
  $("guidance").value = d.guidance;
  if ([...$("scheduler").options].some((o) => o.value === d.scheduler)) $("scheduler").value = d.scheduler;
}

function fillSchedulers(names) {
  const select = $("scheduler");
  for (const name of names) select.add(new Option(name, name));
  select.value = names.includes("euler") ? "euler" : names[0];
}

const sizeValue = (height, width) => `${width}x${height}`;

function readSize() {
  const [width, height] = $("size").value.split("x").map(Number);
  return { width, height };
}

// The presets the chosen bundle accepts, within the server's pixel limit; its default size selected.
function fillSizes() {
  const bundle = currentBundle();
  const maxPixels = state.info.limits && state.info.limits.max_pixels;
  const select = $("size");
  const previous = select.value;
  select.replaceChildren();
  for (const [h, w] of bundle.sizes) {
    if (maxPixels && h * w > maxPixels) continue;
    select.add(new Option(`${w} × ${h}`, sizeValue(h, w)));
  }
  const [dh, dw] = bundle.default_size;
  setSize(previous && [...select.options].some((o) => o.value === previous) ? previous : sizeValue(dh, dw));
}

function setSize(value) {
  const select = $("size");
  if (![...select.options].some((o) => o.value === value)) {  // e.g. an image made by another bundle
    const [w, h] = value.split("x");
    select.add(new Option(`${w} × ${h}`, value));
  }
  select.value = value;
}

// ------------------------------------------------------------------ the start image and its mask

function onImageChosen(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      state.source = img;
      setSize(nearestSize(img.naturalWidth, img.naturalHeight));
      drawStartImage();
      $("init-tools").hidden = false;
    };
    img.onerror = () => showError(`${file.name} is not an image this browser can read.`);
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

// The preset of the same size, else the one closest in aspect ratio (then the largest).
function nearestSize(width, height) {
  const options = [...$("size").options].map((o) => o.value);
  if (options.includes(sizeValue(height, width))) return sizeValue(height, width);
  const score = (v) => {
    const [w, h] = v.split("x").map(Number);
    return [Math.abs(Math.log((w / h) / (width / height))), -w * h];
  };
  return options.reduce((best, v) => {
    const [a, b] = [score(v), score(best)];
    return a[0] < b[0] - 1e-9 || (Math.abs(a[0] - b[0]) <= 1e-9 && a[1] < b[1]) ? v : best;
  });
}

// The start image, centre-cropped to the chosen size: what is sent is exactly what is shown.
function drawStartImage() {
  const img = state.source;
  if (!img) return;
  const { width, height } = readSize();
  const canvas = $("init-canvas");
  const mask = $("mask-canvas");
  for (const c of [canvas, mask]) {
    c.width = width;
    c.height = height;
  }
  const scale = Math.max(width / img.naturalWidth, height / img.naturalHeight);
  const sw = width / scale, sh = height / scale;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, (img.naturalWidth - sw) / 2, (img.naturalHeight - sh) / 2, sw, sh, 0, 0, width, height);
  $("paint").style.aspectRatio = `${width} / ${height}`;
  const brush = $("brush-size");
  brush.max = Math.max(8, Math.round(Math.min(width, height) / 2));
  brush.value = Math.max(1, Math.round(Math.min(width, height) / 8));
  clearMask();
}

function clearMask() {
  const mask = $("mask-canvas");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  state.maskPainted = false;
}

function removeImage() {
  state.source = null;
  clearMask();
  $("init-image").value = "";
  $("init-tools").hidden = true;
}

// Pointer events: one code path for mouse, pen and touch.
function setUpPainting() {
  const mask = $("mask-canvas");
  let last = null;
  const point = (e) => {
    const r = mask.getBoundingClientRect();
    return [(e.clientX - r.left) * mask.width / r.width, (e.clientY - r.top) * mask.height / r.height];
  };
  const stroke = (from, to) => {
    const ctx = mask.getContext("2d");
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = Number($("brush-size").value);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (from[0] === to[0] && from[1] === to[1]) {  // a tap: a dot (browsers differ on zero-length round caps)
      ctx.arc(from[0], from[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(...from);
      ctx.lineTo(...to);
      ctx.stroke();
    }
    state.maskPainted = true;
  };
  mask.addEventListener("pointerdown", (e) => {
    e.preventDefault();
    mask.setPointerCapture(e.pointerId);
    last = point(e);
    stroke(last, last);
  });
  mask.addEventListener("pointermove", (e) => {
    if (last === null) return;
    const p = point(e);
    stroke(last, p);
    last = p;
  });
  for (const type of ["pointerup", "pointercancel"]) mask.addEventListener(type, () => { last = null; });
}

// The mask as the server wants it: a PNG at the image's size, white = repaint, black = keep.
function maskDataUrl() {
  const mask = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(mask, 0, 0);
  return out.toDataURL("image/png");
}

// ------------------------------------------------------------------ the form

function readNumber(id, label, integer) {
  const text = $(id).value.trim();
  const n = Number(text);
  if (text === "" || !Number.isFinite(n) || (integer && !Number.isInteger(n))) {
    throw new Error(`${label} must be ${integer ? "a whole number" : "a number"}, not "${text}".`);
  }
  return n;
}

function readForm() {
  const { width, height } = readSize();
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    steps: readNumber("steps", "Steps", true),
    scheduler: $("scheduler").value,
    guidance: readNumber("guidance", "Guidance", false),
    seed: readNumber("seed", "Seed", true),
    width,
    height,
    prompt_syntax: $("prompt-syntax").value,
  };
  if (state.info.bundles.length > 1) body.bundle = $("bundle").value;
  if (state.source) {
    body.image = $("init-canvas").toDataURL("image/png");
    body.strength = Number($("strength").value);
    if (state.maskPainted) {
      body.mask = maskDataUrl();
      body.mask_blur = readNumber("mask-blur", "Mask blur", true);
    }
  }
  return body;
}

// "Use these settings again": the form as it was for that image.
function useSettings(params) {
  const selected = currentBundle();  // by name as the server records it; else the same weights (bundle_id)
  const sameWeights = (b) => b.bundle_id === params.bundle_id;
  const bundle = state.info.bundles.find((b) => b.name === params.bundle)
    ?? (sameWeights(selected) ? selected : state.info.bundles.find(sameWeights));
  if (bundle && bundle.name !== selected.name) {
    $("bundle").value = bundle.name;
    fillSizes();
  }
  $("prompt").value = params.prompt ?? "";
  $("negative-prompt").value = params.negative_prompt ?? "";
  if (params.steps !== undefined) $("steps").value = params.steps;
  if ([...$("scheduler").options].some((o) => o.value === params.scheduler)) $("scheduler").value = params.scheduler;
  if (params.guidance !== undefined) $("guidance").value = params.guidance;
  if (params.seed !== undefined) $("seed").value = params.seed;
  if (params.height && params.width) setSize(sizeValue(params.height, params.width));
  $("prompt-syntax").value = params.prompt_syntax ?? "auto";
  if (params.strength !== undefined) setStrength(params.strength);
  if (params.mask_blur !== undefined) $("mask-blur").value = params.mask_blur;
  drawStartImage();
  $("gen-form").scrollIntoView({ behavior: "smooth", block: "start" });
  $("prompt").focus({ preventScroll: true });
  const again = params.strength !== undefined ? " (choose the start image again)" : "";
  setStatus(`Settings of seed ${params.seed} loaded${again}.`);
}

function setStrength(value) {
  $("strength").value = value;
  $("strength-value").textContent = Number(value).toFixed(2);
}

// ------------------------------------------------------------------ a job: submit, watch, cancel

async function generate(event) {
  event.preventDefault();
  if (state.job && !state.job.finished) return;
  showError("");
  let body;
  try {
    body = readForm();
  } catch (e) {
    showError(e.message);
    return;
  }
  setBusy(true);
  setProgress(0, body.steps);
  try {
    const job = await api("/api/jobs", body);
    state.lastSeed = job.seed;
    $("seed-reuse").disabled = false;
    state.job = { id: job.id, source: null, poll: null, finished: false };
    showQueued(job.position);
    watch(state.job);
    if (ONE_COLUMN.matches) $("output-title").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (e) {
    setBusy(false);
    setStatus("Ready.");
    showError(e.status === 429 && e.retryAfter ? `${e.message} Try again in ${e.retryAfter} s.` : e.message);
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

function setProgress(step, steps) {
  const bar = $("progress");
  bar.max = Math.max(steps, 1);
  bar.value = step;
  $("progress-text").textContent = steps ? `${step} / ${steps}` : "";
}

function showQueued(position) {
  // position: how many jobs are ahead of this one (0: it runs next, or now)
  const ahead = `${position} job${position === 1 ? "" : "s"} ahead`;
  setStatus(position > 0 ? `Queued: position ${position} (${ahead}).` : "Starting…");
}

// Server-sent events; if the stream drops before the job ends, poll the job instead.
function watch(job) {
  const source = new EventSource(withToken(`/api/jobs/${job.id}/events`));
  job.source = source;
  const on = (name, handle) => source.addEventListener(name, (e) => {
    if (state.job === job) handle(JSON.parse(e.data));
  });
  on("queued", (d) => showQueued(d.position));
  on("progress", (d) => {
    setProgress(d.step, d.steps);
    setStatus(`Step ${d.step} of ${d.steps}.`);
    if (d.preview) showImage(d.preview, `Preview, step ${d.step} of ${d.steps}`);
  });
  on("done", (d) => finish(job, "done", d));
  on("failed", (d) => finish(job, "failed", d));
  on("cancelled", (d) => finish(job, "cancelled", d));
  source.onerror = () => {
    source.close();
    if (!job.finished) poll(job);
  };
}

function poll(job) {
  job.poll = setTimeout(async () => {
    if (job.finished) return;
    try {
      const s = await api(`/api/jobs/${job.id}`);
      if (["done", "failed", "cancelled"].includes(s.state)) return finish(job, s.state, s);
      if (s.state === "queued") showQueued(s.position);
      else if (s.steps) setProgress(s.step, s.steps);
    } catch (e) {
      showError(e.message);
    }
    poll(job);
  }, 500);
}

function finish(job, outcome, data) {
  if (job.finished) return;
  job.finished = true;
  if (job.source) job.source.close();
  clearTimeout(job.poll);
  setBusy(false);
  if (outcome === "done") {
    const image = data.image;
    setProgress($("progress").max, $("progress").max);
    showImage(withToken(image.url), describe(image.params), image);
    setStatus(`Done: seed ${image.params.seed}.`);
    loadGallery();
  } else if (outcome === "failed") {
    setStatus("Failed.");
    showError(data.error || "The job failed.");
  } else {
    setStatus("Cancelled.");
  }
  loadInfo().catch(() => {});  // the bundle and its planned peak may have changed
}

async function cancel() {
  const job = state.job;
  if (!job || job.finished) return;
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  try {
    const r = await api(`/api/jobs/${job.id}/cancel`, {});
    if (r.state === "cancelled") finish(job, "cancelled", {});
  } catch (e) {
    showError(e.message);
  }
}

function showImage(src, caption, image) {
  const img = $("output");
  img.src = src;
  img.alt = caption;
  img.hidden = false;
  $("output-caption").textContent = caption;
  const link = $("output-download");
  link.hidden = !image;
  if (image) {
    link.href = withToken(image.url, { download: "1" });
    link.download = image.name;
  }
}

function describe(p) {
  const parts = [`seed ${p.seed}`, `${p.steps} steps`, p.scheduler, `guidance ${p.guidance}`,
    `${p.width}×${p.height}`];
  if (p.strength !== undefined) parts.push(`strength ${p.strength}`);
  if (p.mask) parts.push("inpainted");
  return parts.join(" · ");
}

// ------------------------------------------------------------------ the gallery

const GALLERY_PAGE = 24;

async function loadGallery(more = false) {
  const offset = more ? state.galleryShown : 0;
  let data;
  try {
    data = await api(`/api/gallery?offset=${offset}&limit=${GALLERY_PAGE}`);
  } catch (e) {
    showError(e.message);
    return;
  }
  const list = $("gallery");
  if (!more) list.replaceChildren();
  for (const image of data.images) list.append(galleryCard(image));
  state.galleryShown = offset + data.images.length;
  $("gallery-count").textContent = `${data.total} image${data.total === 1 ? "" : "s"}`;
  $("gallery-more").hidden = state.galleryShown >= data.total;
}

function galleryCard(image) {
  const p = image.params;  // null: a PNG in the outputs folder that edge did not write
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.name = image.name;

  const img = document.createElement("img");
  img.src = withToken(image.url);
  img.alt = (p && p.prompt) || image.name;
  img.loading = "lazy";

  const prompt = document.createElement("p");
  prompt.className = "card-prompt";
  prompt.textContent = p ? p.prompt || "(no prompt)" : image.name;
  const details = document.createElement("p");
  details.className = "card-params";
  details.textContent = !p ? "no parameters recorded"
    : describe(p) + (p.negative_prompt ? ` · not: ${p.negative_prompt}` : "");

  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "Use these settings again";
  reuse.disabled = !p;
  reuse.addEventListener("click", () => useSettings(p));
  const download = document.createElement("a");
  download.href = withToken(image.url, { download: "1" });
  download.download = image.name;
  download.textContent = "Download";

  const actions = document.createElement("div");
  actions.className = "inline";
  actions.append(reuse, download);
  li.append(img, prompt, details, actions);
  return li;
}

// ------------------------------------------------------------------ start

function start() {
  $("gen-form").addEventListener("submit", generate);
  for (const id of ["prompt", "negative-prompt"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("gen-form").requestSubmit();
    });
  }
  $("cancel").addEventListener("click", cancel);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("bundle").addEventListener("change", () => { fillSizes(); fillDefaults(); drawStartImage(); });
  $("size").addEventListener("change", drawStartImage);
  $("init-image").addEventListener("change", (e) => onImageChosen(e.target.files[0]));
  $("mask-clear").addEventListener("click", clearMask);
  $("image-remove").addEventListener("click", removeImage);
  $("strength").addEventListener("input", (e) => setStrength(e.target.value));
  $("gallery-refresh").addEventListener("click", () => loadGallery());
  $("gallery-more").addEventListener("click", () => loadGallery(true));
  setUpPainting();
  loadInfo()
    .then(() => loadGallery())
    .catch((e) => showError(`Cannot reach the server: ${e.message}`));
}

start();
