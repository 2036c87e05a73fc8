// The search page: a plain client of the HTTP API (GET /v1/index, POST /v1/search, item thumbnails).
// No framework and no build step; every server string reaches the DOM through textContent, never as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "retrieval-engine.api-key";
  const CARD_PX = 160; // CSS width of a thumbnail; the request asks for device pixels
  const MAX_THUMB = 512; // the server's largest thumbnail size
  // Photos larger than this (long side, px) are scaled down in the browser before upload: the query encoder
  // sees a few hundred pixels, and a 12 MP JPEG's decode and resize on the server cost 75% of a query, a
  // 1024x768 one's resize 11%, an 800x600 one's decode and resize 7% each (benchmarks/bench_query_stages.py,
  // docs/query_path.md). Smaller images are sent untouched.
  const MAX_UPLOAD_SIDE = 800;

  const el = (id) => document.getElementById(id);
  const ui = {
    form: el("search-form"),
    drop: el("drop-zone"),
    input: el("image-input"),
    preview: el("query-preview"),
    queryName: el("query-name"),
    granularity: el("granularity"),
    k: el("k"),
    apiKey: el("api-key"),
    button: el("search-button"),
    info: el("index-info"),
    status: el("status"),
    error: el("error"),
    results: el("results"),
  };

  let queryFile = null;
  let searchSeq = 0; // only the answer to the latest search is shown
  let blobUrls = [];
  let thresholds = {};

  // --- small helpers ----------------------------------------------------------------------------

  function apiKey() {
    return ui.apiKey.value.trim();
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { "X-API-Key": key } : {};
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }

  // The API answers every error as {"detail": "..."}; validation errors carry a list of {loc, msg}.
  function describeError(body, status) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) {
      return body.detail
        .map((e) => {
          const where = (e.loc || []).filter((p) => p !== "body").join(".");
          return where ? `${where}: ${e.msg}` : e.msg;
        })
        .join("; ");
    }
    return `the server answered with status ${status}`;
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = !message;
  }

  function setStatus(message) {
    ui.status.textContent = message;
  }

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function baseName(path) {
    if (!path) return "";
    const parts = String(path).split(/[\\/]/);
    return parts[parts.length - 1] || String(path);
  }

  // --- the index: granularities and a one-line description ---------------------------------------

  async function loadIndex() {
    let response;
    try {
      response = await fetch("/v1/index", { headers: authHeaders() });
    } catch (err) {
      ui.info.textContent = `Cannot reach the server (${err.message}).`;
      return;
    }
    const body = await readJson(response);
    if (!response.ok) {
      const hint = response.status === 401 ? " Enter the API key below." : "";
      ui.info.textContent = `Index description unavailable: ${describeError(body, response.status)}.${hint}`;
      return;
    }
    thresholds = body.thresholds || {};
    fillGranularities(body.granularities || []);
    const parts = [`${body.count} items`, `${body.dim}-d`, body.index_type, `encoder ${body.encoder_id}`];
    if (body.query_encoder_id && body.query_encoder_id !== body.encoder_id) {
      parts.push(`queries by ${body.query_encoder_id}`);
    }
    ui.info.textContent = parts.join(" · ");
  }

  function fillGranularities(levels) {
    const chosen = ui.granularity.value;
    ui.granularity.replaceChildren();
    const any = make("option", "", levels.length ? "any (nearest neighbours)" : "any (index not calibrated)");
    any.value = "";
    ui.granularity.append(any);
    for (const level of levels) {
      const threshold = thresholds[level];
      const label = typeof threshold === "number" ? `${level} (score ≥ ${threshold.toFixed(3)})` : level;
      const option = make("option", "", label);
      option.value = level;
      ui.granularity.append(option);
    }
    ui.granularity.value = levels.includes(chosen) ? chosen : "";
  }

  // --- the query image ---------------------------------------------------------------------------

  function setQuery(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name} is not an image.`);
      return;
    }
    queryFile = file;
    if (ui.preview.src.startsWith("blob:")) URL.revokeObjectURL(ui.preview.src);
    ui.preview.src = URL.createObjectURL(file);
    ui.preview.alt = `Query photo ${file.name || ""}`.trim();
    ui.preview.hidden = false;
    ui.queryName.textContent = file.name || "pasted image";
    search();
  }

  // A copy of a large photo, at most MAX_UPLOAD_SIDE px on its long side, as a JPEG; the file itself when it is
  // small already or when the browser cannot decode it (the server then says what is wrong with it).
  async function scaledForUpload(file) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      return file;
    }
    const scale = MAX_UPLOAD_SIDE / Math.max(bitmap.width, bitmap.height);
    if (scale >= 1) {
      bitmap.close();
      return file;
    }
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const context = canvas.getContext("2d");
    context.imageSmoothingQuality = "high";
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
    return blob || file;
  }

  // --- search and results --------------------------------------------------------------------------

  async function search() {
    if (!queryFile) {
      showError("Choose or drop a photo first.");
      return;
    }
    const seq = ++searchSeq;
    const upload = await scaledForUpload(queryFile);
    if (seq !== searchSeq) return;
    const form = new FormData();
    form.append("image", upload, queryFile.name || "query");
    const k = ui.k.value.trim();
    if (k) form.append("k", k);
    if (ui.granularity.value) form.append("granularity", ui.granularity.value);

    showError("");
    setStatus("Searching…");
    ui.form.setAttribute("aria-busy", "true");
    ui.button.disabled = true;
    try {
      const response = await fetch("/v1/search", { method: "POST", body: form, headers: authHeaders() });
      const body = await readJson(response);
      if (seq !== searchSeq) return;
      if (!response.ok) {
        clearResults();
        setStatus("");
        const hint = response.status === 401 ? " Enter the API key above." : "";
        showError(describeError(body, response.status) + hint);
        return;
      }
      render(body);
    } catch (err) {
      if (seq !== searchSeq) return;
      clearResults();
      setStatus("");
      showError(`Cannot reach the server (${err.message}).`);
    } finally {
      if (seq === searchSeq) {
        ui.form.removeAttribute("aria-busy");
        ui.button.disabled = false;
      }
    }
  }

  function clearResults() {
    for (const url of blobUrls) URL.revokeObjectURL(url);
    blobUrls = [];
    ui.results.replaceChildren();
  }

  function render(body) {
    clearResults();
    const hits = body.hits || [];
    const summary = [`${hits.length} ${hits.length === 1 ? "hit" : "hits"}`, `${body.took_ms.toFixed(1)} ms`];
    if (body.granularity) summary.push(`granularity ${body.granularity}`);
    summary.push(`query encoder ${body.query_encoder_id}`);
    setStatus(summary.join(" · "));
    if (!hits.length) {
      const why = body.granularity
        ? `No gallery item reaches the ${body.granularity} threshold; try a coarser granularity.`
        : "No hits.";
      ui.results.append(make("li", "empty", why));
      return;
    }
    hits.forEach((hit, rank) => ui.results.append(card(hit, rank + 1)));
  }

  function card(hit, rank) {
    const item = make("li", "card");
    item.dataset.id = String(hit.id);
    const figure = make("figure");
    const frame = make("div", "thumb");
    const img = make("img");
    const name = baseName(hit.path);
    img.alt = name ? `Gallery item ${hit.id}: ${name}` : `Gallery item ${hit.id}`;
    img.decoding = "async";
    frame.append(img);
    loadThumbnail(img, frame, hit.thumbnail_url);

    const caption = make("figcaption");
    const head = make("div", "card-head");
    const score = make("span", "score", hit.score.toFixed(3));
    score.title = "cosine similarity to the query";
    head.append(make("span", "rank", `#${rank}`), score);
    const level = make("span", hit.level ? "level" : "level none", hit.level || "—");
    level.title = hit.level ? `matches at the ${hit.level} level` : "below every calibrated threshold";
    head.append(level);
    caption.append(head);

    const labels = Object.entries(hit.labels || {});
    if (labels.length) {
      const list = make("dl", "labels");
      for (const [lvl, value] of labels) list.append(make("dt", "", lvl), make("dd", "", value));
      caption.append(list);
    }
    if (name) {
      const path = make("p", "path", name);
      path.title = String(hit.path);
      caption.append(path);
    }
    figure.append(frame, caption);
    item.append(figure);
    return item;
  }

  function loadThumbnail(img, frame, url) {
    const size = Math.min(MAX_THUMB, Math.round(CARD_PX * (window.devicePixelRatio || 1)));
    const src = `${url}?size=${size}`;
    img.addEventListener("error", () => frame.classList.add("missing"), { once: true });
    const key = apiKey();
    if (!key) {
      img.src = src;
      return;
    }
    // An <img> cannot send a header: fetch the thumbnail with the key and show it through a blob URL.
    fetch(src, { headers: { "X-API-Key": key } })
      .then((response) => (response.ok ? response.blob() : Promise.reject(new Error(String(response.status)))))
      .then((blob) => {
        const objectUrl = URL.createObjectURL(blob);
        blobUrls.push(objectUrl);
        img.src = objectUrl;
      })
      .catch(() => frame.classList.add("missing"));
  }

  // --- wiring ---------------------------------------------------------------------------------------

  function wire() {
    ui.preview.addEventListener("error", () => {
      ui.preview.hidden = true; // not an image the browser can show; the server's answer says why
    });
    ui.input.addEventListener("change", () => setQuery(ui.input.files[0]));
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      search();
    });
    ui.granularity.addEventListener("change", () => queryFile && search());
    ui.k.addEventListener("change", () => queryFile && search());

    for (const type of ["dragenter", "dragover"]) {
      ui.drop.addEventListener(type, (event) => {
        event.preventDefault();
        ui.drop.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      ui.drop.addEventListener(type, () => ui.drop.classList.remove("dragging"));
    }
    ui.drop.addEventListener("drop", (event) => {
      event.preventDefault();
      const file = event.dataTransfer && event.dataTransfer.files[0];
      if (file) setQuery(file);
    });
    window.addEventListener("paste", (event) => {
      const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
      if (file) setQuery(file);
    });

    try {
      ui.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      // storage blocked (private mode): the key field still works for this visit
    }
    ui.apiKey.addEventListener("change", () => {
      try {
        if (apiKey()) localStorage.setItem(KEY_STORAGE, apiKey());
        else localStorage.removeItem(KEY_STORAGE);
      } catch {
        // see above
      }
      loadIndex();
    });
  }

  wire();
  loadIndex();
})();
