// casbah status page.  Plain JS, no libraries: it must work on a machine with no
// Internet access.  Everything shown that came from a client (file names, URIs,
// tool names) is inserted as text, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const CACHES = [
  { key: "cas", label: "CAS (FindMissingBlobs)", color: "#2563eb" },
  { key: "action_cache", label: "ActionCache", color: "#16a34a" },
  { key: "asset", label: "Remote Asset", color: "#ea580c" },
];
const REFRESH_MS = 5000;
let lastStatus = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "onclick") node.addEventListener("click", v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
}

function pct(rate) {
  return rate === null || rate === undefined ? "–" : (rate * 100).toFixed(1) + " %";
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m";
}

function instanceName(name) {
  return name === "" ? '"" (default)' : name;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// -- instances table ------------------------------------------------------------------

function renderInstances(status) {
  const tbody = document.querySelector("#instances tbody");
  tbody.replaceChildren();
  for (const inst of status.instances) {
    const size = inst.size;
    const used = size.quota_bytes ? size.bytes / size.quota_bytes : null;
    const bar = el("span", { class: "bar" + (used !== null && used > 0.9 ? " high" : "") },
      el("span", { style: `width: ${used === null ? 0 : Math.min(100, used * 100).toFixed(1)}%` }));
    const rate = (cache) => {
      const r = inst.hit_rates[cache];
      return el("td", { class: "num rate-" + cache, "data-hits": r.hits, "data-misses": r.misses,
        title: `${r.hits} hits, ${r.misses} misses in the last hour` }, pct(r.rate));
    };
    tbody.append(el("tr", { "data-instance": inst.name },
      el("td", {}, instanceName(inst.name), inst.read_only ? el("span", { class: "muted" }, " (read-only)") : null),
      el("td", { class: "mono" }, inst.describe),
      el("td", { class: "num objects", "data-value": size.objects }, size.objects.toLocaleString("en-US")),
      el("td", { class: "num bytes", "data-value": size.bytes, title: size.bytes + " bytes" }, bytes(size.bytes)),
      el("td", { class: "num quota", "data-value": size.quota_bytes }, size.quota_bytes ? bytes(size.quota_bytes) : "none"),
      el("td", { class: "used" }, bar, " ", used === null ? "" : (used * 100).toFixed(1) + " %"),
      rate("cas"), rate("action_cache"), rate("asset"),
      el("td", { class: "num requests" }, inst.requests_last_hour.toLocaleString("en-US")),
      el("td", { class: "num errors" }, inst.errors_last_hour.toLocaleString("en-US")),
    ));
  }
}

function fillInstanceSelects(status) {
  for (const id of ["chart-instance", "lookup-instance"]) {
    const select = document.getElementById(id);
    const names = status.instances.map((i) => i.name);
    const have = Array.from(select.options).map((o) => o.value).filter((v) => v !== "*");
    if (JSON.stringify(have) === JSON.stringify(names)) continue;
    const keep = select.value;
    for (const option of Array.from(select.options)) if (option.value !== "*") option.remove();
    for (const name of names) select.append(el("option", { value: name }, instanceName(name)));
    if (keep && Array.from(select.options).some((o) => o.value === keep)) select.value = keep;
  }
}

// -- hit-rate chart -----------------------------------------------------------------------

function chartSeries(status, which) {
  const chosen = status.instances.filter((i) => which === "*" || i.name === which);
  const out = {};
  for (const { key } of CACHES) {
    const minutes = [];
    for (const inst of chosen) {
      inst.hit_rates[key].minutes.forEach((m, i) => {
        if (!minutes[i]) minutes[i] = { t: m.t, hits: 0, misses: 0 };
        minutes[i].hits += m.hits;
        minutes[i].misses += m.misses;
      });
    }
    out[key] = minutes;
  }
  return out;
}

/** The first minute (epoch seconds) the chart shows: the minute the server started (at
 * most the hour the server keeps), or the start of the last N minutes chosen. */
function chartStart(status) {
  const choice = document.getElementById("chart-window").value;
  const since = choice === "uptime" ? status.started : status.now - Number(choice) * 60 + 60;
  return Math.floor(since / 60) * 60;
}

function renderChart(status) {
  const chart = document.getElementById("hit-chart");
  const which = document.getElementById("chart-instance").value;
  const data = chartSeries(status, which);
  // Full width: the viewBox follows the element's size, so text keeps its size.
  const W = Math.max(320, Math.round(chart.clientWidth || 760)), H = 260;
  const left = 44, right = 16, top = 12, bottom = 30;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const w = W - left - right, h = H - top - bottom;
  // One slot per minute of the window, spread over the whole width (a server up for
  // two minutes gets two wide slots, not two dots at the right edge of an hour).
  const first = chartStart(status);
  const keep = (series) => (series || []).filter((m) => m.t >= first);
  const slots = keep(data.cas);
  const n = Math.max(1, slots.length);
  const x = (i) => left + ((i + 0.5) * w) / n;
  const y = (rate) => top + h - rate * h;
  chart.replaceChildren();
  // lookup volume behind the lines, scaled to the busiest minute in the window
  const volume = slots.map((_, i) => CACHES.reduce((sum, { key }) => {
    const m = keep(data[key])[i];
    return sum + (m ? m.hits + m.misses : 0);
  }, 0));
  const peak = Math.max(1, ...volume);
  const barWidth = Math.max(2, Math.min(24, (w / n) * 0.5));
  volume.forEach((v, i) => {
    if (!v) return;
    const bh = (v / peak) * h * 0.35;
    const bar = svg("rect", { class: "volume", x: x(i) - barWidth / 2, y: top + h - bh, width: barWidth, height: bh });
    bar.append(svg("title", {}, `${clock(slots[i].t)}: ${v} lookups`));
    chart.append(bar);
  });
  for (const r of [0, 0.25, 0.5, 0.75, 1]) {
    chart.append(svg("line", { class: "grid", x1: left, x2: W - right, y1: y(r), y2: y(r) }));
    chart.append(svg("text", { x: left - 6, y: y(r) + 4, "text-anchor": "end" }, `${r * 100}%`));
  }
  const step = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(w / 90))));
  slots.forEach((m, i) => {
    const last = i === slots.length - 1;
    if (!last && (slots.length - 1 - i) % step) return;
    chart.append(svg("text", { x: x(i), y: H - 10, "text-anchor": "middle" }, last ? "now" :
      new Date(m.t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false })));
  });
  let points = 0;
  for (const { key, color, label } of CACHES) {
    const pts = [];
    keep(data[key]).forEach((m, i) => {
      const total = m.hits + m.misses;
      if (total) pts.push({ i, rate: m.hits / total, m });
    });
    if (!pts.length) continue;
    chart.append(svg("path", {
      class: "series series-" + key, fill: "none", stroke: color, "stroke-width": 2,
      d: pts.map((p, k) => (k ? "L" : "M") + x(p.i).toFixed(1) + " " + y(p.rate).toFixed(1)).join(" "),
    }));
    for (const p of pts) {
      const dot = svg("circle", { class: "point point-" + key, cx: x(p.i).toFixed(1), cy: y(p.rate).toFixed(1), r: 3.5,
        fill: color, "data-rate": p.rate.toFixed(4) });
      dot.append(svg("title", {}, `${label} ${clock(p.m.t)}: ${(p.rate * 100).toFixed(1)}% (${p.m.hits} hits, ${p.m.misses} misses)`));
      chart.append(dot);
      points++;
    }
  }
  if (!points) {
    chart.append(svg("text", { x: left + w / 2, y: top + h / 2, "text-anchor": "middle" }, "no cache lookups in this window"));
  }
  chart.setAttribute("data-points", points);
  chart.setAttribute("data-minutes", n);
}

/** One entry per series drawn: the three hit rates and the grey lookup volume. */
function renderLegend() {
  const legend = document.getElementById("chart-legend");
  legend.replaceChildren(
    ...CACHES.map(({ key, label, color }) =>
      el("span", { "data-series": key }, el("i", { style: "background:" + color }), label + " hit rate")),
    el("span", { "data-series": "volume" }, el("i", { class: "volume-key" }), "lookups per minute (all caches)"));
}

// -- storage graphs -------------------------------------------------------------------------

function storageNode(node) {
  const s = node.stats || {};
  const bits = [];
  if ("bytes" in s) bits.push(bytes(s.bytes) + (s.quota_bytes ? " of " + bytes(s.quota_bytes) : ""));
  if ("objects" in s) bits.push(s.objects.toLocaleString("en-US") + (s.objects === 1 ? " object" : " objects"));
  if (s.evictions) bits.push(s.evictions.toLocaleString("en-US") + " evicted");
  const used = s.quota_bytes ? s.bytes / s.quota_bytes : null;
  return el("div", { class: "node", "data-node": node.node || "" },
    el("span", { class: "kind" }, node.kind), " ",
    el("span", { class: "mono muted" }, node.node || ""), " ",
    used !== null ? el("span", { class: "bar" + (used > 0.9 ? " high" : "") },
      el("span", { style: `width: ${Math.min(100, used * 100).toFixed(1)}%` })) : null, " ",
    el("span", { class: "muted" }, bits.join(" · ")),
    ...(node.children || []).map(storageNode));
}

function renderStorage(status) {
  const root = document.getElementById("storage");
  root.replaceChildren(...status.instances.map((inst) => el("div", { class: "instance-storage" },
    el("h3", {}, "Instance " + instanceName(inst.name)),
    el("div", { class: "muted" }, "CAS"), storageNode(inst.storage),
    el("div", { class: "muted" }, "ActionCache"), storageNode(inst.action_cache))));
}

// -- requests ---------------------------------------------------------------------------------

function short(text, n) {
  if (!text) return "";
  return text.length > n ? text.slice(0, n) + "…" : text;
}

function renderRequests(data) {
  const inv = document.querySelector("#invocations tbody");
  inv.replaceChildren(...data.invocations.map((r) => el("tr", {},
    el("td", { class: "mono", title: r.invocation_id }, r.invocation_id),
    el("td", {}, r.tool + (r.tool_version ? " " + r.tool_version : "")),
    el("td", { class: "num" }, r.requests), el("td", { class: "num" }, r.errors),
    el("td", {}, clock(r.first_seen)), el("td", {}, clock(r.last_seen)))));
  if (!data.invocations.length) inv.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no client sent RequestMetadata yet")));
  const req = document.querySelector("#requests tbody");
  req.replaceChildren(...data.recent.slice(0, 50).map((r) => el("tr", {},
    el("td", {}, clock(r.time)), el("td", { class: "mono" }, r.method), el("td", {}, instanceName(r.instance)),
    el("td", { class: r.code === "OK" ? "status-OK" : "status-err" }, r.code), el("td", { class: "num" }, r.ms.toFixed(2)),
    el("td", {}, r.tool ? r.tool + (r.tool_version ? " " + r.tool_version : "") : ""),
    el("td", { class: "mono", title: r.invocation_id || "" }, short(r.invocation_id, 13)),
    el("td", { class: "mono", title: r.action_id || "" }, short(r.action_id, 13)))));
}

// -- lookup ------------------------------------------------------------------------------------

const trail = []; // [{name, digest}] from the first looked-up directory down

function digestLink(digest, name, push) {
  return el("a", { class: "mono", title: digest, onclick: (e) => {
    e.preventDefault();
    if (push) trail.push({ name, digest }); else trail.length = 0;
    lookup(digest, true);
  } }, name || short(digest, 24));
}

async function lookup(digest, keepTrail) {
  const out = document.getElementById("lookup-result");
  const instance = document.getElementById("lookup-instance").value;
  const fn = document.getElementById("lookup-function").value;
  document.getElementById("lookup-digest").value = digest;
  if (!keepTrail) trail.length = 0;
  out.replaceChildren(el("span", { class: "muted" }, "looking up…"));
  let r;
  try {
    r = await getJSON(`/api/lookup?instance=${encodeURIComponent(instance)}&function=${fn}&digest=${encodeURIComponent(digest)}`);
  } catch (err) {
    out.replaceChildren(el("div", { class: "error" }, String(err.message || err)));
    return;
  }
  const parts = [el("div", { class: "row", id: "lookup-summary" },
    el("span", { class: "badge " + (r.present ? "present" : "missing"), id: "lookup-state" }, r.present ? "present" : "missing"),
    el("span", { class: "mono" }, r.digest),
    el("span", { id: "lookup-size", "data-value": r.size }, `${r.size.toLocaleString("en-US")} bytes (${bytes(r.size)})`),
    r.directory ? el("span", { class: "muted" }, "a Directory") : null)];
  if (r.directory) {
    if (!trail.length || trail[trail.length - 1].digest !== r.digest) trail.push({ name: "/", digest: r.digest });
    const crumbs = el("div", { class: "breadcrumbs" });
    trail.forEach((c, i) => {
      if (i > 1) crumbs.append(" / ");
      crumbs.append(el("a", { onclick: () => { trail.length = i + 1; lookup(c.digest, true); } },
        i ? c.name.replace(/\/$/, "") : "/"));
    });
    parts.push(crumbs);
    const rows = [];
    for (const d of r.directory.directories) {
      rows.push(el("tr", { class: "dir-entry" }, el("td", {}, digestLink(d.digest, d.name + "/", true)),
        el("td", { class: "num" }, ""), el("td", { class: "mono muted" }, d.digest), el("td", {}, d.present ? "" : el("span", { class: "badge missing" }, "missing"))));
    }
    for (const f of r.directory.files) {
      rows.push(el("tr", { class: "file-entry" }, el("td", {}, digestLink(f.digest, f.name, false),
        f.executable ? el("span", { class: "muted", title: "executable" }, "*") : null),
        el("td", { class: "num" }, bytes(f.size)), el("td", { class: "mono muted" }, f.digest),
        el("td", {}, f.present ? "" : el("span", { class: "badge missing" }, "missing"))));
    }
    for (const s of r.directory.symlinks) {
      rows.push(el("tr", { class: "symlink-entry" }, el("td", {}, s.name + "@"), el("td", {}, ""), el("td", { class: "mono muted" }, "→ " + s.target), el("td", {}, "")));
    }
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "empty directory")));
    parts.push(el("table", { id: "directory-listing" },
      el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", { class: "num" }, "Size"), el("th", {}, "Digest"), el("th", {}, ""))),
      el("tbody", {}, ...rows)));
  }
  if (r.action_result) {
    const a = r.action_result;
    parts.push(el("div", { id: "action-result" }, el("h3", {}, `ActionCache entry: exit code ${a.exit_code}`),
      el("ul", {}, ...a.output_files.map((f) => el("li", {}, f.path + " ", digestLink(f.digest, null, false))),
        ...a.output_directories.map((d) => el("li", {}, d.path + "/ (tree) ", el("span", { class: "mono" }, d.tree_digest))))));
  }
  out.replaceChildren(...parts);
}

async function assetLookup(uri) {
  const out = document.getElementById("asset-result");
  const instance = document.getElementById("lookup-instance").value;
  const fn = document.getElementById("lookup-function").value;
  out.replaceChildren(el("span", { class: "muted" }, "looking up…"));
  try {
    const r = await getJSON(`/api/asset?instance=${encodeURIComponent(instance)}&function=${fn}&uri=${encodeURIComponent(uri)}`);
    if (!r.assets.length) {
      out.replaceChildren(el("div", { id: "asset-none" }, el("span", { class: "badge missing" }, "unknown"), " no asset was pushed under this URI"));
      return;
    }
    out.replaceChildren(el("table", { id: "asset-table" },
      el("thead", {}, el("tr", {}, ...["Kind", "Digest", "Qualifiers", "Pushed", "Expires", ""].map((t) => el("th", {}, t)))),
      el("tbody", {}, ...r.assets.map((a) => el("tr", {},
        el("td", {}, a.kind), el("td", {}, digestLink(a.digest, a.digest, false)),
        el("td", { class: "mono" }, Object.entries(a.qualifiers).map(([k, v]) => `${k}=${v}`).join(", ")),
        el("td", {}, new Date(a.pushed_at * 1000).toLocaleString()),
        el("td", {}, a.expire_at ? new Date(a.expire_at * 1000).toLocaleString() + (a.expired ? " (expired)" : "") : "never"),
        el("td", {}, el("span", { class: "badge " + (a.present ? "present" : "missing") }, a.present ? "present" : "missing")))))));
  } catch (err) {
    out.replaceChildren(el("div", { class: "error" }, String(err.message || err)));
  }
}

// -- refresh loop --------------------------------------------------------------------------------

async function refresh() {
  const state = document.getElementById("refresh-state");
  try {
    const [status, requests] = await Promise.all([getJSON("/api/status"), getJSON("/api/requests")]);
    lastStatus = status;
    document.getElementById("server-info").textContent =
      `version ${status.version} · up ${duration(status.uptime)} · ${status.listen.join(", ")}` +
      (status.shutting_down ? " · SHUTTING DOWN" : "");
    fillInstanceSelects(status);
    renderInstances(status);
    renderChart(status);
    renderStorage(status);
    renderRequests(requests);
    state.textContent = "updated " + clock(status.now);
    document.body.setAttribute("data-loaded", "1");
  } catch (err) {
    state.textContent = "refresh failed: " + (err.message || err);
  }
}

for (const id of ["chart-instance", "chart-window"]) {
  document.getElementById(id).addEventListener("change", () => lastStatus && renderChart(lastStatus));
}
window.addEventListener("resize", () => lastStatus && renderChart(lastStatus));
document.getElementById("lookup-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const digest = document.getElementById("lookup-digest").value.trim();
  if (digest) lookup(digest, false);
});
document.getElementById("asset-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const uri = document.getElementById("asset-uri").value.trim();
  if (uri) assetLookup(uri);
});
renderLegend();
refresh();
setInterval(refresh, REFRESH_MS);
