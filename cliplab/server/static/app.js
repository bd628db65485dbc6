// The cliplab search page: plain JavaScript, no framework, no network beyond this server.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { query: "", selected: null };

function setMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").className = "message" + (isError ? " error" : "");
}

async function fetchJSON(url, options) {
  const res = await fetch(url, options);
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error((body && body.detail) || `${res.status} ${res.statusText}`);
  return body;
}

function renderHits(data, label) {
  const list = $("results");
  list.replaceChildren();
  closeExplain();
  const warn = (data.warnings || []).join("; ");
  setMessage(`${data.hits.length} results for ${label} in ${data.took_ms} ms` + (warn ? ` — note: ${warn}` : ""));
  for (const hit of data.hits) {
    const li = document.createElement("li");
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "hit";
    btn.dataset.id = hit.id;
    btn.setAttribute("aria-pressed", "false");
    const name = hit.caption || hit.id;
    btn.setAttribute("aria-label", `Result ${hit.rank}, score ${hit.score.toFixed(3)}: ${name}` +
                     (state.query ? ". Press to see why." : ""));
    if (hit.thumb) {
      const img = document.createElement("img");
      img.src = hit.thumb; img.alt = name; img.loading = "lazy";
      btn.append(img);
    } else {
      const box = document.createElement("div");
      box.className = "noimg"; box.textContent = hit.caption || hit.id;
      btn.append(box);
    }
    const info = document.createElement("div");
    info.className = "info";
    const score = document.createElement("span");
    score.className = "score"; score.textContent = hit.score.toFixed(3);
    const cap = document.createElement("div");
    cap.className = "cap"; cap.textContent = hit.caption || hit.id;
    info.append(score, cap);
    btn.append(info);
    btn.addEventListener("click", () => explain(hit, btn));
    li.append(btn);
    list.append(li);
  }
}

async function searchText(q) {
  state.query = q;
  setMessage("searching…");
  try {
    const k = $("k").value;
    const data = await fetchJSON(`/api/search?q=${encodeURIComponent(q)}&k=${k}`);
    renderHits(data, `“${q}”`);
    history.replaceState(null, "", `?q=${encodeURIComponent(q)}`);
  } catch (e) { setMessage(e.message, true); }
}

async function searchImage(file) {
  state.query = "";
  setMessage("searching by image…");
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value);
  form.append("exclude_self", $("exclude-self").checked ? "true" : "false");
  try {
    const data = await fetchJSON("/api/search", { method: "POST", body: form });
    renderHits(data, `the image ${file.name || ""}`.trim());
    const drop = $("drop"); drop.querySelector("img")?.remove();
    const preview = document.createElement("img");
    preview.src = URL.createObjectURL(file); preview.alt = "query image";
    drop.prepend(preview);
  } catch (e) { setMessage(e.message, true); }
}

function closeExplain() {
  $("explain").hidden = true;
  if (state.selected) state.selected.setAttribute("aria-pressed", "false");
  state.selected = null;
}

async function explain(hit, btn) {
  if (!state.query) { setMessage("Explanations are for text queries: type a query to see its words weighed."); return; }
  if (state.selected) state.selected.setAttribute("aria-pressed", "false");
  state.selected = btn; btn.setAttribute("aria-pressed", "true");
  const box = $("explain"), words = $("explain-words");
  words.textContent = "weighing the words…";
  $("explain-meta").textContent = "";
  $("explain-thumb").src = hit.thumb || "";
  $("explain-thumb").hidden = !hit.thumb;
  box.hidden = false;
  try {
    const data = await fetchJSON(`/api/explain?q=${encodeURIComponent(state.query)}&id=${encodeURIComponent(hit.id)}`);
    words.replaceChildren();
    const top = Math.max(1e-12, ...data.words.map((w) => Math.abs(w.score)));
    for (const w of data.words) {
      const span = document.createElement("span");
      const a = Math.min(1, Math.abs(w.score) / top);
      span.className = "w" + (w.score < 0 ? " neg" : " pos");
      span.style.background = `rgba(var(--${w.score < 0 ? "neg" : "pos"}), ${(0.12 + 0.6 * a).toFixed(2)})`;
      span.textContent = w.word;
      span.title = `${w.word}: ${w.score.toExponential(2)}`;
      span.setAttribute("aria-label", `${w.word} ${w.score < 0 ? "against" : "for"} (${w.score.toExponential(1)})`);
      words.append(span, " ");
    }
    $("explain-meta").textContent = `result ${hit.rank} · ${hit.id} · cosine ${data.cosine.toFixed(3)}`;
    box.scrollIntoView({ block: "nearest", behavior: "smooth" });
  } catch (e) { words.textContent = e.message; }
}

function setup() {
  $("search").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("q").value.trim();
    if (q) searchText(q); else setMessage("Type something to search for.", true);
  });
  const drop = $("drop"), file = $("file");
  drop.addEventListener("click", (ev) => { if (!ev.target.closest(".exclude")) file.click(); });
  drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); file.click(); }
  });
  file.addEventListener("change", () => { if (file.files[0]) searchImage(file.files[0]); });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (ev) => { ev.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (ev) => { const f = ev.dataTransfer.files[0]; if (f) searchImage(f); });
  $("explain-close").addEventListener("click", closeExplain);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") closeExplain();
    if (ev.key === "/" && document.activeElement !== $("q")) { ev.preventDefault(); $("q").focus(); }
  });
  fetchJSON("/health").then((h) => {
    $("status").textContent = `${h.n.toLocaleString()} ${h.field === "text" ? "captions" : "images"} · ${h.model}` +
                              ` · ${h.precision}`;
  }).catch(() => { $("status").textContent = "server unreachable"; });
  const q = new URLSearchParams(location.search).get("q");
  if (q) { $("q").value = q; searchText(q); }
}

setup();
