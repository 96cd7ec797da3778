// The vlfm page: three tabs over the server's own /v1 API. No framework, no build step, nothing from a CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { auth: false };

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Every call: the server's {"error": {"message"}} shown in words; the page stays usable.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(options.headers) });
  } catch (e) {
    throw new Error(`the server cannot be reached (${e.message})`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.error && body.error.message) message = `${body.error.message} (${response.status})`;
    } catch (e) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return response;
}

async function run(button, task) {
  clearError();
  button.disabled = true;
  $("status").textContent = "working...";
  try {
    await task();
    if ($("status").textContent === "working...") $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("the file cannot be read"));
    reader.readAsDataURL(blob);
  });
}

// --- tabs --------------------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll("[role=tab]")) {
      other.setAttribute("aria-selected", String(other === tab));
      $(`tab-${other.dataset.tab}`).hidden = other !== tab;
    }
    clearError();
  });
}

// --- search ------------------------------------------------------------------------------------------------
async function search(body) {
  const response = await api("/v1/search", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, k: Number($("search-k").value) || 12 }),
  });
  const hits = (await response.json()).data;
  const grid = $("results");
  grid.replaceChildren();
  const loads = hits.map(async (hit) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = hit.caption || hit.name;
    img.title = hit.caption || hit.name;
    const caption = document.createElement("figcaption");
    caption.textContent = `${hit.score.toFixed(3)} ${hit.name}`;
    figure.append(img, caption);
    grid.append(figure);
    // fetched (not an <img src>) so the API key travels with it
    const blob = await (await api(hit.url)).blob();
    img.src = URL.createObjectURL(blob);
    figure.addEventListener("click", () =>
      run($("search-go"), async () => search({ image: await readAsDataURL(blob) })));
  });
  await Promise.all(loads);
  if (!hits.length) $("status").textContent = "no results";
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run($("search-go"), () => search({ query: $("search-query").value }));
});

// --- drop zones ------------------------------------------------------------------------------------------
function dropZone(input, preview) {
  const zone = input.closest(".drop");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    input.files = e.dataTransfer.files;
    input.dispatchEvent(new Event("change"));
  });
  input.addEventListener("change", () => {
    const file = input.files[0];
    preview.hidden = !file;
    if (file) preview.src = URL.createObjectURL(file);
  });
}
dropZone($("classify-file"), $("classify-preview"));
dropZone($("chat-file"), $("chat-preview"));

// --- classify ----------------------------------------------------------------------------------------------
$("classify-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run($("classify-go"), async () => {
    const file = $("classify-file").files[0];
    if (!file) throw new Error("choose an image first");
    const form = new FormData();
    form.append("image", file);
    for (const label of $("classify-labels").value.split(",")) {
      if (label.trim()) form.append("labels", label.trim());
    }
    const response = await api("/v1/classify", { method: "POST", body: form });
    const ranked = (await response.json()).data[0].labels;
    const bars = $("bars");
    bars.replaceChildren();
    for (const { label, probability } of ranked) {
      const row = document.createElement("div");
      row.className = "bar-row";
      const name = document.createElement("span");
      name.textContent = label;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * probability).toFixed(1)}%`;
      const value = document.createElement("span");
      value.textContent = probability.toFixed(3);
      row.append(name, bar, value);
      bars.append(row);
    }
  });
});

// --- chat: the answer streams in (server-sent events over fetch) ---------------------------------------------
$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run($("chat-go"), async () => {
    const file = $("chat-file").files[0];
    if (!file) throw new Error("choose an image first");
    const content = [{ type: "text", text: $("chat-question").value },
      { type: "image_url", image_url: { url: await readAsDataURL(file) } }];
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: [{ role: "user", content }], stream: true }),
    });
    const answer = $("answer");
    answer.textContent = "";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        answer.textContent += chunk.choices[0].delta.content || "";
      }
    }
  });
});

// --- what this server offers ----------------------------------------------------------------------------------
$("api-key").value = sessionStorage.getItem("vlfm-key") || "";
$("api-key").addEventListener("change", () => sessionStorage.setItem("vlfm-key", $("api-key").value));
fetch("/healthz").then((r) => r.json()).then((health) => {
  $("key-box").hidden = !health.auth;
  $("status").textContent = `model ${health.model}` + (health.search ? "" : " (no index: search is off)") +
    (health.chat ? "" : " (no assistant: chat is off)");
}).catch(() => showError("the server cannot be reached"));
