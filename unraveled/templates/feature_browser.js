// The SAE feature browser (unraveled.render.feature_browser): a sortable, searchable list of
// features and, for the feature picked, its top activating contexts, activation histogram and
// promoted and suppressed tokens. One copy in the output folder's assets/ serves every browser
// page; each page carries its own data (the JSON element "page-data").
"use strict";

function drawPage() {
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const root = document.getElementById("page-root");
  const features = data.features;
  const token = (id) => data.vocab[String(id)] ?? "";
  const state = { key: "index", descending: false, query: "", selected: null };

  root.innerHTML = `
<style>
.fb{display:grid;grid-template-columns:minmax(320px,1fr) 2fr;gap:1.2rem;align-items:start}
.fb-list{max-height:80vh;overflow:auto;border:1px solid #dde3ee}
.fb table{border-collapse:collapse;width:100%;font-size:.85rem}
.fb th,.fb td{padding:.2rem .45rem;text-align:right;border-bottom:1px solid #eef1f6}
.fb td.text,.fb th.text{text-align:left}
.fb th button{font:inherit;border:0;background:none;cursor:pointer;color:#2457c5;padding:0}
.fb tr.feature-row{cursor:pointer} .fb tr.feature-row:hover{background:#f2f5fb}
.fb tr.selected{background:#e3ebfa}
.fb-context{font-family:ui-monospace,monospace;font-size:.85rem;white-space:pre-wrap;margin:.15rem 0;
  padding:.15rem .3rem;border-left:3px solid #dde3ee}
.fb-context span{border-radius:2px} .fb-context .top{outline:1px solid #c0392b}
.fb-tokens{font-family:ui-monospace,monospace;font-size:.85rem}
.fb-tokens td{text-align:left}
.fb-search{width:100%;box-sizing:border-box;padding:.35rem;margin-bottom:.4rem}
</style>
<div class="fb">
 <div>
  <input class="fb-search" id="fb-search" type="search"
   placeholder="Search: feature index, or a token it fires on or promotes">
  <div class="meta" id="fb-count"></div>
  <div class="fb-list"><table>
   <thead><tr>
    <th><button data-sort="index">feature</button></th>
    <th><button data-sort="density">density</button></th>
    <th><button data-sort="max">max act.</button></th>
    <th class="text">top token</th>
   </tr></thead>
   <tbody id="fb-rows"></tbody>
  </table></div>
 </div>
 <div id="fb-detail"><p class="meta">Pick a feature on the left.</p></div>
</div>`;

  const rowsElement = root.querySelector("#fb-rows");
  const value = (feature, key) => key === "index" ? feature.index : feature[key];

  function matches(feature, query) {
    if (!query) return true;
    if (/^\d+$/.test(query)) return String(feature.index).startsWith(query);
    const q = query.toLowerCase();
    const texts = [feature.top, ...feature.promoted.map((p) => p[0])].map(token);
    return texts.some((text) => text.toLowerCase().includes(q));
  }

  function visible() {
    const shown = features.filter((feature) => matches(feature, state.query.trim()));
    const sign = state.descending ? -1 : 1;
    shown.sort((a, b) => sign * (value(a, state.key) - value(b, state.key)) || a.index - b.index);
    return shown;
  }

  function drawList() {
    const shown = visible();
    rowsElement.innerHTML = "";
    for (const feature of shown) {
      const row = document.createElement("tr");
      row.className = "feature-row" + (feature.index === state.selected ? " selected" : "");
      row.dataset.index = feature.index;
      row.innerHTML = `<td>${feature.index}</td><td>${percent(feature.density)}</td>` +
        `<td>${feature.max.toFixed(3)}</td><td class="text"></td>`;
      row.lastChild.textContent = feature.top >= 0 ? JSON.stringify(token(feature.top)) : "–";
      row.addEventListener("click", () => select(feature.index));
      rowsElement.appendChild(row);
    }
    root.querySelector("#fb-count").textContent =
      `${shown.length} of ${features.length} features, by ${state.key}` +
      (state.descending ? " (largest first)" : "");
    return shown.map((feature) => feature.index);
  }

  function percent(x) {
    return x === 0 ? "0" : x < 1e-4 ? (100 * x).toExponential(1) + "%" : (100 * x).toFixed(2) + "%";
  }

  function shade(v, max) {
    const alpha = max > 0 ? Math.max(0, Math.min(1, v / max)) : 0;
    return `rgba(231,111,81,${alpha.toFixed(3)})`;
  }

  function histogram(counts, edges) {
    const width = 420, height = 120, n = counts.length;
    const top = Math.max(1, ...counts);
    const bar = width / n;
    let bars = "";
    counts.forEach((count, i) => {
      const h = (height - 14) * count / top;
      const low = i === 0 ? "0" : edges[i - 1].toPrecision(3);
      const high = i === n - 1 ? "∞" : edges[i].toPrecision(3);
      bars += `<rect x="${(i * bar).toFixed(1)}" y="${(height - 14 - h).toFixed(1)}" ` +
        `width="${Math.max(bar - 1, 1).toFixed(1)}" height="${h.toFixed(1)}" fill="#2457c5">` +
        `<title>${low} – ${high}: ${count}</title></rect>`;
    });
    return `<svg width="${width}" height="${height}" role="img" ` +
      `aria-label="activation histogram">${bars}` +
      `<text x="0" y="${height - 2}" font-size="10">${edges[0].toPrecision(2)}</text>` +
      `<text x="${width}" y="${height - 2}" font-size="10" text-anchor="end">` +
      `${edges[edges.length - 1].toPrecision(2)} (log scale)</text></svg>`;
  }

  function tokenTable(pairs, title) {
    const table = document.createElement("table");
    table.className = "fb-tokens";
    table.innerHTML = `<thead><tr><th class="text">${title}</th><th>logit</th></tr></thead>`;
    const body = document.createElement("tbody");
    for (const [id, logit] of pairs) {
      const row = document.createElement("tr");
      row.innerHTML = `<td class="text"></td><td>${logit.toFixed(3)}</td>`;
      row.firstChild.textContent = JSON.stringify(token(id));
      body.appendChild(row);
    }
    table.appendChild(body);
    return table;
  }

  function select(index) {
    const feature = features.find((f) => f.index === index);
    if (!feature) return false;
    state.selected = index;
    for (const row of rowsElement.children) {
      row.classList.toggle("selected", Number(row.dataset.index) === index);
    }
    const detail = root.querySelector("#fb-detail");
    detail.innerHTML = `<h2>Feature ${index}</h2>
<div class="meta">active on ${percent(feature.density)} of ${data.n_tokens.toLocaleString()}
tokens · max activation ${feature.max.toFixed(3)} · mean ${feature.mean.toPrecision(3)}</div>
<h3>Top activating contexts</h3><div id="fb-contexts"></div>
<h3>Activation histogram (active tokens, by |activation|)</h3>${histogram(feature.hist, data.bin_edges)}
<h3>Logit effect of the decoder direction</h3><div id="fb-logits" style="display:flex;gap:2rem"></div>`;
    const contexts = detail.querySelector("#fb-contexts");
    if (feature.contexts.length === 0) {
      contexts.innerHTML = `<p class="meta">Never active on these tokens (dead).</p>`;
    }
    for (const [ids, values, centre] of feature.contexts) {
      const line = document.createElement("div");
      line.className = "fb-context";
      ids.forEach((id, i) => {
        const span = document.createElement("span");
        span.textContent = token(id);
        // values[i]: hundredths of the feature's max activation.
        const activation = values[i] * (feature.max || 1) / 100;
        span.style.background = shade(activation, feature.max);
        span.title = `${JSON.stringify(token(id))}: ${activation.toPrecision(3)}`;
        if (i === centre) span.className = "top";
        line.appendChild(span);
      });
      contexts.appendChild(line);
    }
    const logits = detail.querySelector("#fb-logits");
    logits.appendChild(tokenTable(feature.promoted, "promoted"));
    logits.appendChild(tokenTable(feature.suppressed, "suppressed"));
    if (location.hash !== `#feature-${index}`) history.replaceState(null, "", `#feature-${index}`);
    return true;
  }

  function sort(key, descending) {
    state.descending = descending ?? (state.key === key ? !state.descending : key !== "index");
    state.key = key;
    return drawList();
  }

  function search(query) {
    state.query = query;
    root.querySelector("#fb-search").value = query;
    return drawList();
  }

  for (const button of root.querySelectorAll("th button")) {
    button.addEventListener("click", () => sort(button.dataset.sort));
  }
  root.querySelector("#fb-search").addEventListener("input", (event) => {
    state.query = event.target.value;
    drawList();
  });
  // For scripts and tests: the same actions as the buttons and the search box.
  window.featureBrowser = { sort, search, select, rows: () => drawList() };
  drawList();
  const wanted = /^#feature-(\d+)$/.exec(location.hash);
  select(wanted ? Number(wanted[1]) : (features[0] ?? { index: null }).index);
}
