// The segserve page: pick or drop an image, choose options, POST /segment, then show the overlay
// (opacity adjustable, the class under the cursor named), the mask, a legend of the classes found
// and download links for every encoding. Images and downloads are fetched with the API key header
// and handed over through object URLs, so the page works when the server requires a key.
"use strict";

const $ = (id) => document.getElementById(id);
let chosenFile = null;
const objectUrls = [];
// The last result: its JSON, the options it was made with, and its label map (column-major,
// as COCO RLE stores it) for naming the class under the cursor.
let shown = null;
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

function choose(file) {
  if (!file) return;
  chosenFile = file;
  const preview = $("preview");
  URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  updateButton();
}

function updateButton() {
  $("run").disabled = !(chosenFile && $("model").value);
}

async function fetchImage(url, img) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw new Error(await errorMessage(response));
  const objectUrl = URL.createObjectURL(await response.blob());
  objectUrls.push(objectUrl);
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error(`could not show ${url}`));
    img.src = objectUrl;
  });
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

function postImage(params, file) {
  const form = new FormData();
  form.append("image", file);
  return fetch(`/segment?${params}`, { method: "POST", body: form, headers: headers() });
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

function overlayUrl() {
  return `${shown.result.urls.overlay}?opacity=${$("opacity").value / 100}`;
}

function showHover(event) {
  const img = $("overlay");
  if (!shown || !shown.labels || !img.naturalWidth) return;
  const x = Math.floor((event.offsetX * img.naturalWidth) / img.clientWidth);
  const y = Math.floor((event.offsetY * img.naturalHeight) / img.clientHeight);
  const { width, height } = shown.result;
  if (x < 0 || y < 0 || x >= width || y >= height) return;
  const id = shown.labels[x * height + y];
  const found = shown.result.classes.find((c) => c.id === id);
  $("hover").textContent = `${found ? found.name : "class"} (${id}) at ${x}, ${y}`;
  $("hover").dataset.classId = id;
  for (const row of $("legend").tBodies[0].rows) row.classList.toggle("hovered", Number(row.dataset.classId) === id);
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
        : await fetch(encoding === "overlay" ? overlayUrl() : shown.result.urls[encoding], { headers: headers() });
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

async function segment(event) {
  event.preventDefault();
  showError("");
  $("run").disabled = true;
  $("status").textContent = "segmenting…";
  const params = segmentParams("json");  // kept for the probabilities download
  const file = chosenFile;
  try {
    const response = await postImage(params, file);
    if (!response.ok) throw new Error(await errorMessage(response));
    const result = await response.json();
    while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
    shown = { result, file, params, labels: null };
    $("hover").textContent = "";
    const rle = fetch(result.urls.rle, { headers: headers() }).then(async (r) => {
      if (!r.ok) throw new Error(await errorMessage(r));
      return r.json();
    });
    await Promise.all([
      fetchImage(overlayUrl(), $("overlay")),
      fetchImage(result.urls.png, $("mask")),
      rle.then((body) => (shown.labels = labelMap(body))),
    ]);
    renderLegend(result.classes);
    $("untrained").hidden = result.trained;
    $("timing").textContent =
      `${result.width}×${result.height} px, ${result.num_inputs} model input(s), ` +
      `${(1000 * result.timings.total).toFixed(0)} ms on the server`;
    $("results").hidden = false;
    $("status").textContent = `done: mask ${result.mask_id}`;
  } catch (error) {
    showError(error.message);
    $("status").textContent = "failed";
  } finally {
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
$("opacity").addEventListener("change", () => {
  if (shown) fetchImage(overlayUrl(), $("overlay")).catch((error) => showError(error.message));
});
for (const link of $("downloads").querySelectorAll("a")) link.addEventListener("click", download);
loadModels();
