// The segserve page: pick or drop an image, choose options, POST /segment, then show the overlay
// (opacity adjustable, the class under the cursor named), the mask, a legend of the classes found
// and download links for every encoding. Images and downloads are fetched with the API key header
// and handed over through object URLs, so the page works when the server requires a key.
"use strict";

const $ = (id) => document.getElementById(id);
let chosenFile = null;
// The last result: its JSON, the options it was made with, and its label map (column-major,
// as COCO RLE stores it) for naming the class under the cursor; null while none is shown.
let shown = null;
// The Segment in flight and the opacity re-render in flight: aborted when they become stale, so
// a late response never replaces a newer one.
let segmenting = null;
let overlayRequest = null;
const EXTENSIONS = { png: "png", labels: "png", overlay: "png", rle: "json", polygons: "geojson", probabilities: "npy" };

function headers() {
  const key = $("apikey").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.message || body.error}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const response = await fetch("/models");
  if (!response.ok) {
    $("status").textContent = "models not ready: " + (await errorMessage(response));
    setTimeout(loadModels, 2000);
    return;
  }
  const models = await response.json();
  $("model").replaceChildren(
    ...models.map((m) => {
      const option = new Option(`${m.name} (${m.arch}, ${m.provider})`, m.name, m.default, m.default);
      option.dataset.trained = m.trained;
      return option;
    }),
  );
  $("status").textContent = `${models.length} model(s) ready`;
  updateButton();
}

// Results go as soon as they stop matching the form (a new file, a new Segment), so a failure
// that follows never leaves the previous result on screen.
function clearResults() {
  segmenting?.abort();
  segmenting = null;
  overlayRequest?.abort();
  shown = null;
  $("results").hidden = true;
  $("untrained").hidden = true;
  $("hover").textContent = "";
}

function choose(file) {
  if (!file) return;
  if (segmenting) $("status").textContent = "cancelled";
  clearResults();
  chosenFile = file;
  const preview = $("preview");
  URL.revokeObjectURL(preview.src);
  // Chromium and Firefox cannot draw HEIC or TIFF, which the server decodes: say so rather
  // than show a broken image.
  preview.onerror = () => {
    preview.hidden = true;
    $("no-preview").hidden = false;
  };
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("no-preview").hidden = true;
  updateButton();
}

function updateButton() {
  $("run").disabled = !(chosenFile && $("model").value) || segmenting !== null;
}

// Fetches and decodes an image off-screen; resolves to its object URL, or throws (an aborted
// request included, its URL released) so that only complete, current images are shown.
async function loadImage(url, signal) {
  const response = await fetch(url, { headers: headers(), signal });
  if (!response.ok) throw new Error(await errorMessage(response));
  const objectUrl = URL.createObjectURL(await response.blob());
  const probe = new Image();
  probe.src = objectUrl;
  try {
    await probe.decode().catch(() => Promise.reject(new Error(`could not show ${url}`)));
    signal.throwIfAborted();
  } catch (error) {
    URL.revokeObjectURL(objectUrl);
    throw error;
  }
  return objectUrl;
}

// All or nothing: if one image fails, the others' URLs are released too.
async function loadImages(urls, signal) {
  const settled = await Promise.allSettled(urls.map((url) => loadImage(url, signal)));
  const failed = settled.find((s) => s.status === "rejected");
  if (!failed) return settled.map((s) => s.value);
  for (const s of settled) if (s.status === "fulfilled") URL.revokeObjectURL(s.value);
  throw failed.reason;
}

function showImage(img, objectUrl) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = objectUrl;
}

async function fetchJson(url, signal) {
  const response = await fetch(url, { headers: headers(), signal });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

function renderLegend(classes) {
  const rows = classes
    .slice()
    .sort((a, b) => b.fraction - a.fraction)
    .map((c) => {
      const row = document.createElement("tr");
      row.dataset.classId = c.id;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${c.color.join(",")})`;
      const cells = [swatch, c.name, String(c.id), `${(100 * c.fraction).toFixed(1)}%`];
      for (const content of cells) {
        const cell = document.createElement("td");
        cell.append(content);
        row.append(cell);
      }
      return row;
    });
  $("legend").tBodies[0].replaceChildren(...rows);
}

function segmentParams(output) {
  const params = new URLSearchParams({ model: $("model").value, output });
  for (const name of ["mode", "scales", "crop", "stride"]) {
    const value = $(name).value.trim();
    if (value) params.set(name, value);
  }
  if ($("flip").checked) params.set("flip", "true");
  return params;
}

function withOutput(params, output) {
  const copy = new URLSearchParams(params);
  copy.set("output", output);
  return copy;
}

function postImage(params, file, signal) {
  const form = new FormData();
  form.append("image", file);
  return fetch(`/segment?${params}`, { method: "POST", body: form, headers: headers(), signal });
}

// pycocotools' compressed RLE counts (rleFrString): 5-bit groups, low first, 0x20 = more follows,
// 0x10 in the last group = negative; from the third count on, a difference to the one two back.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let value = 0;
    let shift = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p++) - 48;
      value |= (c & 0x1f) << shift;
      shift += 5;
      more = (c & 0x20) !== 0;
      if (!more && (c & 0x10)) value |= -1 << shift;
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

function labelMap(rle) {
  const labels = new Uint16Array(rle.width * rle.height);
  for (const annotation of rle.annotations) {
    let position = 0;
    rleCounts(annotation.segmentation.counts).forEach((count, index) => {
      if (index % 2) labels.fill(annotation.category_id, position, position + count);
      position += count;
    });
  }
  return labels;
}

function overlayUrl(result) {
  return `${result.urls.overlay}?opacity=${$("opacity").value / 100}`;
}

async function refreshOverlay() {
  overlayRequest?.abort();
  const controller = (overlayRequest = new AbortController());
  try {
    showImage($("overlay"), await loadImage(overlayUrl(shown.result), controller.signal));
  } catch (error) {
    if (!controller.signal.aborted) showError(error.message);
  }
}

function markHovered(id) {
  for (const row of $("legend").tBodies[0].rows) row.classList.toggle("hovered", Number(row.dataset.classId) === id);
}

// The pixel under the cursor, from the shown box (fractional CSS pixels) rather than clientWidth
// (whole ones); clamped, since the cursor on the bottom/right edge lands one past the last pixel.
function showHover(event) {
  if (!shown?.labels) return;
  const { width, height } = shown.result;
  const box = $("overlay").getBoundingClientRect();
  const clamp = (value, size) => Math.min(Math.max(value, 0), size - 1);
  const x = clamp(Math.floor(((event.clientX - box.left) * width) / box.width), width);
  const y = clamp(Math.floor(((event.clientY - box.top) * height) / box.height), height);
  const id = shown.labels[x * height + y];
  const found = shown.result.classes.find((c) => c.id === id);
  $("hover").textContent = `${found ? found.name : "class"} (${id}) at ${x}, ${y}`;
  $("hover").dataset.classId = id;
  markHovered(id);
}

function clearHover() {
  if (!shown?.labels) return;  // keeps the note that the readout is unavailable
  $("hover").textContent = "";
  delete $("hover").dataset.classId;
  markHovered(null);
}

async function download(event) {
  event.preventDefault();
  const encoding = event.target.dataset.encoding;
  if (!shown) return;
  showError("");
  try {
    const response =
      encoding === "probabilities"
        ? await postImage(withOutput(shown.params, "probabilities"), shown.file)
        : await fetch(encoding === "overlay" ? overlayUrl(shown.result) : shown.result.urls[encoding], { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = `${shown.result.mask_id}-${encoding}.${EXTENSIONS[encoding]}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    showError(error.message);
  }
}

// The result is shown only once all of it has arrived; the RLE only feeds the hover readout, so
// its failure turns that readout off instead of failing the result.
async function segment(event) {
  event.preventDefault();
  clearResults();
  showError("");
  const controller = (segmenting = new AbortController());
  const { signal } = controller;
  updateButton();
  $("status").textContent = "segmenting…";
  const params = segmentParams("json");  // kept for the probabilities download
  const file = chosenFile;
  try {
    const response = await postImage(params, file, signal);
    if (!response.ok) throw new Error(await errorMessage(response));
    const result = await response.json();
    const rle = fetchJson(result.urls.rle, signal).then(labelMap).catch((error) => error);
    const [overlay, mask] = await loadImages([overlayUrl(result), result.urls.png], signal);
    const labels = await rle;
    if (signal.aborted) {
      URL.revokeObjectURL(overlay);
      URL.revokeObjectURL(mask);
      return;
    }
    const readable = !(labels instanceof Error);
    shown = { result, file, params, labels: readable ? labels : null };
    showImage($("overlay"), overlay);
    showImage($("mask"), mask);
    renderLegend(result.classes);
    $("hover").textContent = readable ? "" : `no class readout (${labels.message})`;
    $("untrained").hidden = result.trained;
    $("timing").textContent =
      `${result.width}×${result.height} px, ${result.num_inputs} model input(s), ` +
      `${(1000 * result.timings.total).toFixed(0)} ms on the server`;
    $("results").hidden = false;
    $("status").textContent = `done: mask ${result.mask_id}`;
  } catch (error) {
    if (signal.aborted) return;
    showError(error.message);
    $("status").textContent = "failed";
  } finally {
    if (segmenting === controller) segmenting = null;
    updateButton();
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => choose(e.target.files[0]));
$("model").addEventListener("change", updateButton);
$("form").addEventListener("submit", segment);
$("overlay").addEventListener("mousemove", showHover);
$("overlay").addEventListener("mouseleave", clearHover);
$("opacity").addEventListener("change", () => {
  if (shown) refreshOverlay();
});
for (const link of $("downloads").querySelectorAll("a")) link.addEventListener("click", download);
loadModels();
