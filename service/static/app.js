// The segserve page: pick or drop an image, choose options, POST /segment, then show the overlay,
// the mask and a legend of the classes found. Images are fetched with the API key header and
// shown through object URLs, so the page works when the server requires a key.
"use strict";

const $ = (id) => document.getElementById(id);
let chosenFile = null;
const objectUrls = [];

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

async function segment(event) {
  event.preventDefault();
  showError("");
  $("run").disabled = true;
  $("status").textContent = "segmenting…";
  const params = new URLSearchParams({ model: $("model").value, output: "json" });
  for (const name of ["mode", "scales", "crop", "stride"]) {
    const value = $(name).value.trim();
    if (value) params.set(name, value);
  }
  if ($("flip").checked) params.set("flip", "true");
  const form = new FormData();
  form.append("image", chosenFile);
  try {
    const response = await fetch(`/segment?${params}`, { method: "POST", body: form, headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const result = await response.json();
    while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
    await Promise.all([fetchImage(result.urls.overlay, $("overlay")), fetchImage(result.urls.png, $("mask"))]);
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
loadModels();
