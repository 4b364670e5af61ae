// The viewer page: asks the server for an image's features once, then for similarity maps on each click.
// The last answers are kept on window (lastFeatures, lastSimilarity, lastText) for the browser test.
"use strict";

const state = { info: null, panels: { a: null, b: null }, query: null, busy: false };
window.lastFeatures = {};
const $ = (id) => document.getElementById(id);
const other = (p) => (p === "a" ? "b" : "a");

function showError(message) {
  $("error").textContent = message || "";
}

async function api(path, body, raw) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": raw ? "application/octet-stream" : "application/json" },
    body: raw ? body : JSON.stringify(body),
  };
  const response = await fetch(path, options);
  let answer;
  try { answer = await response.json(); } catch (e) { answer = { error: `${response.status} ${response.statusText}` }; }
  if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
  return answer;
}

function settings() {
  return { layer: Number($("layer").value), resolution: Number($("resolution").value) };
}

function colour(v, lo, hi) {
  const map = state.info.colormap;
  const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
  return map[Math.max(0, Math.min(255, Math.round(t * 255)))];
}

function drawGrid(canvas, answer, lo, hi, marks) {
  const g = canvas.getContext("2d");
  const sx = canvas.width / answer.w, sy = canvas.height / answer.h;
  for (let r = 0; r < answer.h; r++) {
    for (let c = 0; c < answer.w; c++) {
      const [red, green, blue] = colour(answer.values[r * answer.w + c], lo, hi);
      g.fillStyle = `rgb(${red},${green},${blue})`;
      g.fillRect(Math.floor(c * sx), Math.floor(r * sy), Math.ceil(sx), Math.ceil(sy));
    }
  }
  for (const [r, c, stroke] of marks) {
    g.strokeStyle = stroke;
    g.lineWidth = 2;
    g.strokeRect(c * sx + 1, r * sy + 1, sx - 2, sy - 2);
  }
}

function clearCanvas(p) {
  const canvas = $(`sim-${p}`);
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

async function loadImage(p, image) {
  showError("");
  const started = performance.now();
  $("status").textContent = `computing the features of ${image}…`;
  try {
    const answer = await api("/api/features", { image, ...settings() });
    $(`image-${p}`).src = answer.picture;
    $(`pca-${p}`).src = answer.pca;
    state.panels[p] = { image, h: answer.h, w: answer.w };
    window.lastFeatures[p] = { image, h: answer.h, w: answer.w };
    clearCanvas(p);
    $("status").textContent = `${image}: ${answer.h} x ${answer.w} patches in ${Math.round(performance.now() - started)} ms`;
    const q = state.query;
    if (q && state.panels[q.panel] && q.row < state.panels[q.panel].h && q.col < state.panels[q.panel].w) {
      await query(q.panel, q.row, q.col);
    } else {
      state.query = null; // the grid changed under the query patch
    }
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

async function upload(p, file) {
  if (!file) return;
  showError("");
  if (file.size > state.info.max_upload_mb * 1048576) { // the server refuses it too; say so before sending
    showError(`${file.name}: ${(file.size / 1048576).toFixed(1)} MB is more than the viewer's ${state.info.max_upload_mb} MB`);
    return;
  }
  $("status").textContent = `uploading ${file.name}…`;
  try {
    const answer = await api("/api/upload", file, true);
    await loadImage(p, answer.image);
  } catch (e) {
    $("status").textContent = "";
    showError(`${file.name}: ${e.message}`);
  }
}

async function query(p, row, col) {
  const here = state.panels[p];
  if (!here) return;
  const there = state.panels[other(p)];
  state.query = { panel: p, row, col };
  const started = performance.now();
  try {
    const answer = await api("/api/similarity", {
      image: here.image, row, col, other: there ? there.image : null, ...settings(),
    });
    drawGrid($(`sim-${p}`), answer, -1, 1, [[row, col, "lime"]]);
    $(`caption-${p}`).textContent = `cosine similarity to the green patch (row ${row}, col ${col})`;
    if (answer.other) {
      const [br, bc] = answer.other.best;
      drawGrid($(`sim-${other(p)}`), answer.other, -1, 1, [[br, bc, "cyan"]]);
      $(`caption-${other(p)}`).textContent =
        `similarity to image ${p.toUpperCase()}'s patch (${row}, ${col}); cyan: best match (${br}, ${bc})`;
    }
    window.lastSimilarity = { panel: p, image: here.image, ...answer };
    $("status").textContent = `similarity answered in ${Math.round(performance.now() - started)} ms`;
    showError("");
  } catch (e) {
    showError(e.message);
  }
}

async function compareText() {
  const text = $("text").value;
  showError("");
  window.lastText = {};
  for (const p of ["a", "b"]) {
    if (!state.panels[p]) continue;
    try {
      const answer = await api("/api/text", { image: state.panels[p].image, text, resolution: settings().resolution });
      const lo = Math.min(...answer.values), hi = Math.max(...answer.values);
      drawGrid($(`sim-${p}`), answer, lo, hi, []);
      $(`caption-${p}`).textContent = `similarity to "${answer.text}" (${lo.toFixed(3)} … ${hi.toFixed(3)}, stretched)`;
      window.lastText[p] = answer;
    } catch (e) {
      showError(e.message);
      return;
    }
  }
}

function patchAt(p, event) {
  const box = event.target.getBoundingClientRect();
  const here = state.panels[p];
  const row = Math.min(here.h - 1, Math.floor(((event.clientY - box.top) / box.height) * here.h));
  const col = Math.min(here.w - 1, Math.floor(((event.clientX - box.left) / box.width) * here.w));
  return [row, col];
}

function wirePanel(p) {
  for (const id of [`image-${p}`, `pca-${p}`, `sim-${p}`]) {
    $(id).addEventListener("click", (event) => {
      if (state.panels[p]) query(p, ...patchAt(p, event));
    });
    $(id).addEventListener("mousemove", async (event) => {
      if (!$("hover").checked || !state.panels[p] || state.busy) return;
      const [row, col] = patchAt(p, event);
      const q = state.query;
      if (q && q.panel === p && q.row === row && q.col === col) return;
      state.busy = true; // one request in flight: a fast mouse must not queue hundreds
      await query(p, row, col);
      state.busy = false;
    });
  }
  $(`file-${p}`).addEventListener("change", (event) => upload(p, event.target.files[0]));
  $(`pick-${p}`).addEventListener("change", (event) => event.target.value && loadImage(p, event.target.value));
  const panel = $(`panel-${p}`);
  panel.addEventListener("dragover", (event) => { event.preventDefault(); panel.classList.add("drag"); });
  panel.addEventListener("dragleave", () => panel.classList.remove("drag"));
  panel.addEventListener("drop", (event) => {
    event.preventDefault();
    panel.classList.remove("drag");
    upload(p, event.dataTransfer.files[0]);
  });
}

function drawLegend() {
  const canvas = $("legend"), g = canvas.getContext("2d");
  for (let x = 0; x < canvas.width; x++) {
    const [r, gr, b] = colour(x / (canvas.width - 1), 0, 1);
    g.fillStyle = `rgb(${r},${gr},${b})`;
    g.fillRect(x, 0, 1, canvas.height);
  }
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    showError(`the server did not answer: ${e.message}`);
    return;
  }
  const info = state.info;
  $("model").textContent = info.model;
  info.layers.forEach((name, i) => $("layer").add(new Option(name, i, i === info.layer, i === info.layer)));
  Object.assign($("resolution"), { value: info.resolution, step: info.stride, min: info.stride, max: info.max_resolution });
  for (const p of ["a", "b"]) {
    $(`pick-${p}`).add(new Option(info.images.length ? "— pick from the folder —" : "(no --images folder)", ""));
    info.images.forEach((name) => $(`pick-${p}`).add(new Option(name, name)));
    wirePanel(p);
  }
  if (info.images.length) {
    $("gallery-box").hidden = false;
    for (const name of info.images.slice(0, 48)) {
      const thumb = new Image();
      thumb.src = `/api/images/${encodeURIComponent(name).replace(/%2F/g, "/")}`;
      thumb.title = name;
      thumb.alt = name;
      thumb.addEventListener("click", (event) => loadImage(event.shiftKey ? "b" : "a", name));
      $("gallery").append(thumb);
    }
  }
  if (info.text) {
    $("text-box").hidden = false;
    $("text-go").addEventListener("click", compareText);
    $("text").addEventListener("keydown", (event) => event.key === "Enter" && compareText());
  }
  const reload = () => ["a", "b"].forEach((p) => state.panels[p] && loadImage(p, state.panels[p].image));
  $("layer").addEventListener("change", reload);
  $("resolution").addEventListener("change", reload);
  drawLegend();
  document.body.dataset.ready = "1";
}

start();
