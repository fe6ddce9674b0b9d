// clipforge search page: talks to this server's own API only (no external assets).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { modality: "image", last: null };
const MAX_UPLOAD_BYTES = 10 * 1024 * 1024 - 64 * 1024;  // the server's body limit, less the form's framing  // last: {kind: "text"|"image"|"similar", value}

function params(extra) {
  const query = new URLSearchParams({
    indice: $("collection").value, modality: state.modality, k: $("k").value,
    dedup: $("dedup").checked ? "1" : "0", ...extra,
  });
  return query.toString();
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function fetchJson(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function card(result) {
  const item = document.createElement("article");
  item.className = "card" + (state.modality === "text" ? " text-result" : "");
  item.dataset.id = result.id;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  if (result.thumb) {
    const img = document.createElement("img");
    img.src = result.thumb;
    img.alt = result.caption || `image ${result.id}`;
    img.loading = "lazy";
    thumb.appendChild(img);
  } else {
    const none = document.createElement("span");
    none.className = "none";
    none.textContent = "no image";
    thumb.appendChild(none);
  }
  thumb.title = "more like this";
  thumb.addEventListener("click", () => similar(result.id));
  const body = document.createElement("div");
  body.className = "body";
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = result.caption || "";
  body.appendChild(caption);
  if (result.folded && result.folded.length) {
    const folded = document.createElement("div");
    folded.className = "folded";
    folded.textContent = `+${result.folded.length} near-duplicate${result.folded.length > 1 ? "s" : ""} folded`;
    folded.title = "ids " + result.folded.map((other) => other.id).join(", ");
    body.appendChild(folded);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `#${result.id} · ${result.similarity.toFixed(3)}`;
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more-like-this";
  more.textContent = "more like this";
  more.addEventListener("click", () => similar(result.id));
  meta.append(score, more);
  body.appendChild(meta);
  item.append(thumb, body);
  return item;
}

function show(answer, label, started) {
  const grid = $("results");
  grid.replaceChildren(...answer.results.map(card));
  const kind = answer.modality === "image" ? "images" : "captions";
  const ms = Math.round(performance.now() - started);
  setStatus(`${answer.results.length} ${kind} for ${label} in ${answer.indice} (${ms} ms)`);
}

function preview(file) {
  const box = $("query-preview");
  if (!file) { box.hidden = true; box.replaceChildren(); return; }
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file);
  img.alt = "query image";
  const text = document.createElement("span");
  text.textContent = `searching by image: ${file.name}`;
  box.replaceChildren(img, text);
  box.hidden = false;
}

async function run(query) {
  state.last = query;
  const started = performance.now();
  setStatus("searching...");
  try {
    let answer, label;
    if (query.kind === "text") {
      preview(null);
      answer = await fetchJson(`/search?${params({ q: query.value })}`);
      label = `"${query.value}"`;
    } else if (query.kind === "image") {
      preview(query.value);
      const form = new FormData();
      form.append("image", query.value, query.value.name || "upload");
      answer = await fetchJson(`/search?${params({})}`, { method: "POST", body: form });
      label = `image ${query.value.name || ""}`.trim();
    } else {
      preview(null);
      answer = await fetchJson(`/similar/${query.value}?${params({})}`);
      label = `more like #${query.value}`;
    }
    show(answer, label, started);
  } catch (error) {
    $("results").replaceChildren();
    setStatus(`error: ${error.message}`, true);
  }
}

function similar(id) { window.scrollTo({ top: 0 }); run({ kind: "similar", value: id }); }

function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) { setStatus(`${file.name} is not an image`, true); return; }
  if (file.size > MAX_UPLOAD_BYTES) { setStatus(`${file.name} is over the server's 10 MiB upload limit`, true); return; }
  run({ kind: "image", value: file });
}

async function loadCollections() {
  try {
    const collections = await fetchJson("/collections");
    $("collection").replaceChildren(...collections.map((collection) => {
      const option = document.createElement("option");
      option.value = collection.name;
      option.textContent = `${collection.name} (${collection.count})`;
      option.dataset.modalities = collection.modalities.join(",");
      return option;
    }));
    updateModes();
  } catch (error) { setStatus(`error: ${error.message}`, true); }
}

function updateModes() {
  const option = $("collection").selectedOptions[0];
  const modalities = option ? option.dataset.modalities.split(",") : ["image"];
  for (const button of document.querySelectorAll(".switch button")) {
    button.disabled = !modalities.includes(button.dataset.modality);
  }
  if (!modalities.includes(state.modality)) setModality(modalities[0]);
}

function setModality(modality) {
  state.modality = modality;
  for (const button of document.querySelectorAll(".switch button")) {
    button.classList.toggle("active", button.dataset.modality === modality);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (text) run({ kind: "text", value: text });
  });
  $("upload").addEventListener("change", (event) => { searchFile(event.target.files[0]); event.target.value = ""; });
  for (const button of document.querySelectorAll(".switch button")) {
    button.addEventListener("click", () => { setModality(button.dataset.modality); if (state.last) run(state.last); });
  }
  for (const id of ["k", "dedup"]) $(id).addEventListener("change", () => { if (state.last) run(state.last); });
  $("collection").addEventListener("change", () => { updateModes(); if (state.last && state.last.kind !== "similar") run(state.last); });
  let depth = 0;
  window.addEventListener("dragenter", (event) => { event.preventDefault(); depth += 1; $("drop-overlay").hidden = false; });
  window.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) $("drop-overlay").hidden = true; });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("drop-overlay").hidden = true;
    searchFile(event.dataTransfer.files[0]);
  });
  loadCollections();
});
