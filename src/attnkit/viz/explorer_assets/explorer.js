// attnkit attention explorer: vanilla JS, no network. Tokens are inserted with textContent only.
// Data: examples[e].kinds[k].layers[l].heads[h] = {ptr, cols, vals}: CSR rows, weight = val / 10**decimals.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("attnkit-data").textContent);
  const SCALE = Math.pow(10, DATA.decimals);
  const ROW_H = 18;
  const ALL_LINES_MAX = 4000; // draw every line of the view when there are at most this many
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];
  const SVGNS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const state = { ex: 0, kind: 0, layer: 0, head: 0, active: [], view: "head", query: 0 };
  const colCache = new Map();

  const example = () => DATA.examples[state.ex];
  const kind = () => example().kinds[state.kind];
  const layer = () => kind().layers[state.layer];
  const rowTokens = () => example().tokens[kind().rows];
  const colTokens = () => example().tokens[kind().cols];
  const colour = (h) => PALETTE[h % PALETTE.length];
  const fmt = (w) => w.toFixed(DATA.decimals);

  function el(tag, attrs, text) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  // the kept weights of row t of head h: [[col, weight], ...]
  function row(h, t) {
    const hd = layer().heads[h], out = [];
    for (let i = hd.ptr[t]; i < hd.ptr[t + 1]; i++) out.push([hd.cols[i], hd.vals[i] / SCALE]);
    return out;
  }
  // column j of head h: [[row, weight], ...] (a CSC index built once per head)
  function column(h, j) {
    const key = state.ex + "/" + state.kind + "/" + state.layer + "/" + h;
    let csc = colCache.get(key);
    if (!csc) {
      const hd = layer().heads[h], S = layer().S, T = layer().T, n = hd.cols.length;
      const ptr = new Int32Array(S + 1), rows = new Int32Array(n), vals = new Float64Array(n);
      for (let i = 0; i < n; i++) ptr[hd.cols[i] + 1]++;
      for (let j2 = 0; j2 < S; j2++) ptr[j2 + 1] += ptr[j2];
      const fill = ptr.slice(0, S);
      for (let t = 0; t < T; t++) {
        for (let i = hd.ptr[t]; i < hd.ptr[t + 1]; i++) {
          const p = fill[hd.cols[i]]++;
          rows[p] = t; vals[p] = hd.vals[i] / SCALE;
        }
      }
      csc = { ptr, rows, vals };
      colCache.set(key, csc);
    }
    const out = [];
    for (let i = csc.ptr[j]; i < csc.ptr[j + 1]; i++) out.push([csc.rows[i], csc.vals[i]]);
    return out;
  }
  function weightAt(h, t, j) {
    const hd = layer().heads[h];
    for (let i = hd.ptr[t]; i < hd.ptr[t + 1]; i++) if (hd.cols[i] === j) return hd.vals[i] / SCALE;
    return 0;
  }
  function keptInView() {
    let n = 0;
    for (const h of state.active) n += layer().heads[h].cols.length;
    return n;
  }

  // ---- controls ----
  function fillSelect(sel, labels, value) {
    clear(sel);
    labels.forEach((label, i) => sel.appendChild(el("option", { value: String(i) }, label)));
    sel.value = String(value);
  }
  function setupControls() {
    fillSelect($("example"), DATA.examples.map((e) => e.name), state.ex);
    fillSelect($("kind"), example().kinds.map((k) => k.name), state.kind);
    fillSelect($("layer"), kind().layers.map((_, i) => "layer " + i), state.layer);
    const H = layer().heads.length;
    fillSelect($("mx-head"), Array.from({ length: H }, (_, h) => "head " + h), state.head);
    const heads = $("heads");
    clear(heads);
    for (let h = 0; h < H; h++) {
      const b = el("button", { type: "button", "data-head": String(h), class: "head-toggle",
        "aria-pressed": String(state.active.includes(h)), title: "show or hide head " + h });
      const sw = el("span", { class: "sw" });
      sw.style.background = colour(h);
      b.appendChild(sw);
      b.appendChild(document.createTextNode("head " + h));
      heads.appendChild(b);
    }
    const ex = example(), th = ex.thinning;
    const short = (toks) => toks.length <= 60 ? toks.join(" ") : toks.slice(0, 60).join(" ") + " … (" + toks.length + " tokens)";
    const src = short(ex.tokens.source), tgt = ex.tokens.target;
    $("sentence").textContent = tgt ? "source: " + src + "  →  target: " + short(tgt) : "tokens: " + src;
    let note = "";
    if (th.top_k !== null) note += "Long input: each query shows its top " + th.top_k + " keys";
    else note += "Each query shows every key";
    note += " with weight ≥ " + th.threshold + " (" + th.kept.toLocaleString("en") + " of " +
      th.stored.toLocaleString("en") + " stored weights kept, holding " +
      (100 * th.mass_kept).toFixed(1) + "% of the attention mass in the layer that keeps least). Weights rounded to " +
      DATA.decimals + " decimals.";
    $("notice").textContent = note;
    $("tab-image").hidden = !ex.image;
    $("tab-graph").hidden = !ex.graph;
    if ((state.view === "image" && !ex.image) || (state.view === "graph" && !ex.graph)) state.view = "head";
  }
  function resetHeads() { state.active = layer().heads.map((_, h) => h); state.head = 0; }

  // ---- head view ----
  function renderHead() {
    const rows = rowTokens(), cols = colTokens(), L = layer();
    const left = $("hv-rows"), right = $("hv-cols"), svg = $("hv-svg");
    clear(left); clear(right); clear(svg);
    rows.forEach((t, i) => left.appendChild(el("span", { class: "tok q", "data-i": String(i), tabindex: "0" }, t)));
    cols.forEach((t, j) => right.appendChild(el("span", { class: "tok k", "data-j": String(j), tabindex: "0" }, t)));
    const height = ROW_H * Math.max(rows.length, cols.length);
    svg.setAttribute("height", String(height));
    svg.setAttribute("viewBox", "0 0 220 " + height);
    allLines();
  }
  function allLines() { // every kept line of the active heads, when there are few enough to draw
    const svg = $("hv-svg"), L = layer(), all = keptInView() <= ALL_LINES_MAX;
    clear(svg);
    svg.setAttribute("data-all-lines", String(all));
    if (all) {
      for (const h of state.active) for (let t = 0; t < L.T; t++) for (const [j, w] of row(h, t)) line(svg, h, t, j, w);
    }
  }
  function line(svg, h, t, j, w) {
    svg.appendChild(el("svg:line", { x1: "0", y1: String(ROW_H * t + ROW_H / 2), x2: "220",
      y2: String(ROW_H * j + ROW_H / 2), stroke: colour(h), "stroke-width": "2",
      "stroke-opacity": String(Math.min(1, w)), "data-head": String(h) }));
  }
  function headFocus(side, index) {
    const svg = $("hv-svg"), H = layer().heads.length;
    clear(svg);
    const mine = side === "q" ? $("hv-rows") : $("hv-cols"), other = side === "q" ? $("hv-cols") : $("hv-rows");
    for (const s of mine.children) s.classList.toggle("focus", Number(s.dataset[side === "q" ? "i" : "j"]) === index);
    const per = Array.from({ length: other.children.length }, () => new Array(H).fill(0));
    for (let h = 0; h < H; h++) {
      const entries = side === "q" ? row(h, index) : column(h, index);
      for (const [o, w] of entries) {
        per[o][h] = w;
        if (state.active.includes(h)) {
          if (side === "q") line(svg, h, index, o, w); else line(svg, h, o, index, w);
        }
      }
    }
    per.forEach((ws, o) => {
      const s = other.children[o];
      const m = Math.max(0, ...state.active.map((h) => ws[h]));
      s.dataset.w = ws.map(fmt).join(" ");
      s.title = ws.map((w, h) => "head " + h + ": " + fmt(w)).join("\n");
      s.classList.toggle("hl", m > 0);
      s.style.background = m > 0 ? "rgba(42, 93, 176, " + (0.15 + 0.6 * m).toFixed(3) + ")" : "";
    });
  }
  function headUnfocus() {
    for (const s of document.querySelectorAll("#hv .tok")) {
      s.classList.remove("focus", "hl"); s.style.background = ""; delete s.dataset.w; s.removeAttribute("title");
    }
    allLines();
  }

  // ---- matrix view ----
  function heat(w) { // white -> dark blue
    return [Math.round(255 - 225 * w), Math.round(255 - 180 * w), Math.round(255 - 90 * w)];
  }
  function paint(canvas, h, T, S, size) {
    const hd = layer().heads[h], W = Math.min(S, size), Hh = Math.min(T, size);
    canvas.width = W; canvas.height = Hh;
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(W, Hh), px = img.data, best = new Float32Array(W * Hh);
    for (let t = 0; t < T; t++) {
      const y = Math.floor(t * Hh / T);
      for (let i = hd.ptr[t]; i < hd.ptr[t + 1]; i++) {
        const p = y * W + Math.floor(hd.cols[i] * W / S), w = hd.vals[i] / SCALE;
        if (w > best[p]) best[p] = w;
      }
    }
    for (let p = 0; p < W * Hh; p++) {
      const c = heat(best[p]);
      px[4 * p] = c[0]; px[4 * p + 1] = c[1]; px[4 * p + 2] = c[2]; px[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }
  function renderMatrix() {
    const L = layer(), rows = rowTokens(), cols = colTokens(), canvas = $("mx-canvas");
    const cell = Math.max(1, Math.min(28, Math.floor(640 / Math.max(L.T, L.S))));
    paint(canvas, state.head, L.T, L.S, Math.max(L.T, L.S));
    canvas.style.width = cell * L.S + "px"; canvas.style.height = cell * L.T + "px";
    canvas.dataset.cell = String(cell);
    const rl = $("mx-rowlabels"), cl = $("mx-collabels");
    clear(rl); clear(cl);
    if (cell >= 10) {
      let widest = 0;
      rows.forEach((t) => { widest = Math.max(widest, t.length); });
      rl.style.width = Math.min(16, widest + 1) + "ch";
      rows.forEach((t) => { const s = el("span", {}, t); s.style.height = s.style.lineHeight = cell + "px"; rl.appendChild(s); });
      cl.style.paddingLeft = rl.style.width;
      cols.forEach((t) => { const s = el("span", {}, t); s.style.width = cell + "px"; cl.appendChild(s); });
    }
    $("mx-readout").textContent = "layer " + state.layer + ", head " + state.head + ": hover a cell";
  }
  function matrixHover(ev) {
    const canvas = $("mx-canvas"), L = layer(), r = canvas.getBoundingClientRect();
    const t = Math.floor((ev.clientY - r.top) / r.height * L.T), j = Math.floor((ev.clientX - r.left) / r.width * L.S);
    if (t < 0 || j < 0 || t >= L.T || j >= L.S) return;
    const w = weightAt(state.head, t, j), out = $("mx-readout");
    out.textContent = "layer " + state.layer + ", head " + state.head + ": query " + t + " “" + rowTokens()[t] +
      "” → key " + j + " “" + colTokens()[j] + "”: " + fmt(w);
    out.dataset.i = String(t); out.dataset.j = String(j); out.dataset.w = fmt(w);
  }

  // ---- model view ----
  function renderModel() {
    const grid = $("mv"), K = kind(), H = Math.max(...K.layers.map((L) => L.heads.length));
    clear(grid);
    grid.style.gridTemplateColumns = "repeat(" + H + ", max-content)";
    const saved = state.layer, size = 96;
    K.layers.forEach((L, l) => {
      state.layer = l;
      for (let h = 0; h < L.heads.length; h++) {
        const fig = el("figure", { "data-layer": String(l), "data-head": String(h), title: "open layer " + l + " head " + h });
        const c = el("canvas", {});
        paint(c, h, L.T, L.S, size);
        c.style.width = c.style.height = size + "px";
        c.style.borderColor = colour(h);
        fig.appendChild(c);
        fig.appendChild(el("figcaption", {}, "layer " + l + " · head " + h));
        grid.appendChild(fig);
      }
      for (let h = L.heads.length; h < H; h++) grid.appendChild(el("div", {})); // a layer with fewer heads
    });
    state.layer = saved;
  }

  // ---- image view ----
  function renderImage() {
    const ex = example(), im = ex.image, box = $("iv"), list = $("iv-queries");
    clear(box); clear(list);
    rowTokens().forEach((t, i) => list.appendChild(el("span", { class: "tok q" + (i === state.query ? " focus" : ""),
      "data-i": String(i) }, t)));
    const [gh, gw] = im.grid, ph = im.pixels.length, pw = im.pixels[0].length, zoom = Math.max(4, Math.floor(160 / pw));
    for (const h of state.active) {
      const fig = el("figure", { "data-head": String(h) }), c = el("canvas", { width: String(pw * zoom), height: String(ph * zoom) });
      const ctx = c.getContext("2d");
      const weights = new Array(gh * gw).fill(0);
      for (const [j, w] of row(h, Math.min(state.query, layer().T - 1))) {
        const p = j - im.offset;
        if (p >= 0 && p < gh * gw && kind().cols === "source") weights[p] = w;
      }
      // attention first (colour of the head, alpha = weight / the row's largest), then the digit's ink on top
      const top = Math.max(1e-9, ...weights), cw = pw * zoom / gw, chh = ph * zoom / gh;
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, c.width, c.height);
      ctx.fillStyle = colour(h);
      weights.forEach((w, p) => {
        ctx.globalAlpha = 0.85 * w / top;
        ctx.fillRect((p % gw) * cw, Math.floor(p / gw) * chh, cw, chh);
      });
      ctx.fillStyle = "#000";
      for (let y = 0; y < ph; y++) for (let x = 0; x < pw; x++) {
        ctx.globalAlpha = 0.6 * im.pixels[y][x] / 255;
        ctx.fillRect(x * zoom, y * zoom, zoom, zoom);
      }
      ctx.globalAlpha = 1;
      const qp = state.query - im.offset;
      if (qp >= 0 && qp < gh * gw) {
        ctx.strokeStyle = "#d00"; ctx.lineWidth = 2;
        ctx.strokeRect((qp % gw) * cw + 1, Math.floor(qp / gw) * chh + 1, cw - 2, chh - 2);
      }
      ctx.globalAlpha = 1;
      c.dataset.w = weights.map(fmt).join(" ");
      c.addEventListener("mousemove", (ev) => {
        const r = c.getBoundingClientRect();
        const p = Math.floor((ev.clientY - r.top) / r.height * gh) * gw + Math.floor((ev.clientX - r.left) / r.width * gw);
        const q = im.offset + p;
        if (q !== state.query && q < layer().T) { state.query = q; renderImage(); }
      });
      fig.appendChild(c);
      fig.appendChild(el("figcaption", {}, "head " + h + " · query “" + rowTokens()[state.query] + "”"));
      fig.appendChild(el("figcaption", { class: "scale" }, "full colour = " + fmt(top === 1e-9 ? 0 : top) +
        " (its largest weight)"));
      box.appendChild(fig);
    }
  }

  // ---- graph view ----
  function renderGraph() {
    const g = example().graph, svg = $("gv-svg"), toks = rowTokens(), W = 640, Hh = 520, pad = 24;
    clear(svg);
    svg.setAttribute("viewBox", "0 0 " + W + " " + Hh);
    const xy = g.pos.map(([x, y]) => [pad + x * (W - 2 * pad), pad + y * (Hh - 2 * pad)]);
    const q = Math.min(state.query, toks.length - 1), into = new Array(toks.length).fill(null);
    const edges = el("svg:g", {}), nodes = el("svg:g", {});
    svg.appendChild(edges); svg.appendChild(nodes);
    const H = layer().heads.length, hd0 = layer().heads[0];
    for (let t = 0; t < toks.length; t++) { // the neighbourhood's edges, faint, for its shape
      for (let i = hd0.ptr[t]; i < hd0.ptr[t + 1]; i++) {
        const j = hd0.cols[i];
        if (j < t) edges.appendChild(el("svg:line", { x1: String(xy[j][0]), y1: String(xy[j][1]), x2: String(xy[t][0]),
          y2: String(xy[t][1]), stroke: "#ccc", "stroke-width": "1", class: "edge" }));
      }
    }
    for (let h = 0; h < H; h++) {
      for (const [j, w] of row(h, q)) {
        if (!into[j]) into[j] = new Array(H).fill(0);
        into[j][h] = w;
        if (!state.active.includes(h) || j === q) continue;
        edges.appendChild(el("svg:line", { x1: String(xy[j][0]), y1: String(xy[j][1]), x2: String(xy[q][0]),
          y2: String(xy[q][1]), stroke: colour(h), "stroke-width": "3", "stroke-opacity": String(Math.min(1, w)),
          "data-head": String(h), "data-from": String(j), class: "att" }));
      }
    }
    toks.forEach((t, i) => {
      const c = el("svg:circle", { cx: String(xy[i][0]), cy: String(xy[i][1]), r: i === q ? "9" : "6",
        fill: i === q ? "#2a5db0" : into[i] ? "#9bb7e0" : "#ddd", stroke: "#555", "data-node": String(i) });
      if (into[i]) c.setAttribute("data-w", into[i].map(fmt).join(" "));
      nodes.appendChild(c);
      nodes.appendChild(el("svg:text", { x: String(xy[i][0] + 8), y: String(xy[i][1] - 6) }, t));
    });
    $("gv-readout").textContent = "node “" + toks[q] + "” (" + q + ") attends to " +
      into.filter((x) => x).length + " node(s)";
  }

  // ---- wiring ----
  function render() {
    for (const b of document.querySelectorAll("#tabs button")) b.setAttribute("aria-selected", String(b.dataset.view === state.view));
    for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + state.view;
    for (const b of document.querySelectorAll("#heads button")) b.setAttribute("aria-pressed", String(state.active.includes(Number(b.dataset.head))));
    ({ head: renderHead, matrix: renderMatrix, model: renderModel, image: renderImage, graph: renderGraph })[state.view]();
  }
  function full() { setupControls(); render(); }

  $("example").addEventListener("change", (e) => {
    state.ex = Number(e.target.value); state.kind = 0; state.layer = 0; resetHeads();
    state.query = example().graph ? example().graph.center : 0; full();
  });
  $("kind").addEventListener("change", (e) => { state.kind = Number(e.target.value); state.layer = 0; resetHeads(); full(); });
  $("layer").addEventListener("change", (e) => {
    state.layer = Number(e.target.value);
    const H = layer().heads.length; // layers of one kind may differ in heads (a GAT's output layer)
    state.active = state.active.filter((h) => h < H);
    if (!state.active.length) resetHeads();
    state.head = Math.min(state.head, H - 1);
    full();
  });
  $("mx-head").addEventListener("change", (e) => { state.head = Number(e.target.value); render(); });
  $("heads").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    const h = Number(b.dataset.head);
    state.active = state.active.includes(h) ? state.active.filter((x) => x !== h) : [...state.active, h].sort((a, c) => a - c);
    state.head = h;
    $("mx-head").value = String(h);
    render();
  });
  $("tabs").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (b) { state.view = b.dataset.view; render(); }
  });
  const onToken = (e) => {
    const t = e.target.closest(".tok");
    if (t) headFocus(t.classList.contains("q") ? "q" : "k", Number(t.dataset.i ?? t.dataset.j));
  };
  $("hv").addEventListener("mouseover", onToken);
  $("hv").addEventListener("focusin", onToken); // keyboard: Tab through the tokens
  $("hv").addEventListener("mouseleave", headUnfocus);
  $("mx-canvas").addEventListener("mousemove", matrixHover);
  $("mv").addEventListener("click", (e) => {
    const f = e.target.closest("figure");
    if (!f) return;
    state.layer = Number(f.dataset.layer); state.head = Number(f.dataset.head); state.view = "matrix";
    setupControls(); $("mx-head").value = String(state.head); render();
  });
  $("iv-queries").addEventListener("mouseover", (e) => {
    const t = e.target.closest(".tok");
    if (t && Number(t.dataset.i) !== state.query) { state.query = Number(t.dataset.i); renderImage(); }
  });
  $("gv-svg").addEventListener("mouseover", (e) => {
    const c = e.target.closest("circle");
    if (c && Number(c.dataset.node) !== state.query) { state.query = Number(c.dataset.node); renderGraph(); }
  });

  resetHeads();
  if (example().graph) { state.query = example().graph.center; state.view = "graph"; }
  else if (example().image) state.view = "image";
  full();
  window.__attnkitReadyAt = performance.now(); // ms since navigation start
  window.__attnkitReady = true;
  document.body.setAttribute("data-ready", "true");
})();
