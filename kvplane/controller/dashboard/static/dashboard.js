// The kvplane controller's dashboard: polls GET /dashboard/data and redraws. Read-only; no
// libraries, no build step. Every string from the controller goes in as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#3366cc", "#dc8a22", "#2a9d8f", "#b5179e", "#6a994e", "#8d6e63", "#5e60ce"];
const tierColors = new Map();

function tierColor(tier) {
  if (!tierColors.has(tier)) tierColors.set(tier, PALETTE[tierColors.size % PALETTE.length]);
  return tierColors.get(tier);
}

// --- formatting --------------------------------------------------------------------------

function fmtInt(n) {
  return n === null || n === undefined ? "–" : n.toLocaleString("en-US");
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function fmtRate(x) {
  if (x === null || x === undefined) return "–";
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

function fmtPct(x) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %";
}

function fmtMs(x) {
  return x === null || x === undefined ? "–" : (x >= 10 ? x.toFixed(1) : x.toFixed(3)) + " ms";
}

function fmtAge(s) {
  if (s < 60) return s.toFixed(1) + " s ago";
  if (s < 3600) return (s / 60).toFixed(1) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function fmtDuration(s) {
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

function fmtTime(t) {
  return new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

function fmtDateTime(t) {
  const d = new Date(t * 1000);
  return d.toLocaleDateString("en-CA") + " " + d.toLocaleTimeString("en-GB", { hour12: false });
}

// --- DOM helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fillBody(table, rows, emptyText, columns) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText))]));
}

// --- plots -------------------------------------------------------------------------------

// series: [{name, color, values: [[t, v|null], ...]}]; null values break the line.
// The x axis spans the last `span` seconds, or less while the controller is younger.
function lineChart(svg, series, { fmt = fmtRate, yMax = null, span = 0, since = null } = {}) {
  const W = 320, H = 140, L = 50, R = 6, T = 8, B = 18;
  svg.replaceChildren();
  const all = series.flatMap((s) => s.values);
  const ts = all.map((p) => p[0]);
  if (ts.length < 1) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
      "collecting samples…"));
    return;
  }
  const t1 = Math.max(...ts);
  const t0 = Math.min(Math.min(...ts), Math.max(t1 - span, since === null ? -Infinity : since));
  const vs = all.map((p) => p[1]).filter((v) => v !== null);
  const top = yMax !== null ? yMax : Math.max(1e-9, ...vs) * 1.1;
  const x = (t) => L + (t1 === t0 ? W - L - R : ((t - t0) / (t1 - t0)) * (W - L - R));
  const y = (v) => T + (1 - v / top) * (H - T - B);
  svg.append(svgEl("line", { class: "axis", x1: L, y1: y(0), x2: W - R, y2: y(0) }));
  svg.append(svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: y(0) }));
  svg.append(svgEl("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, fmt(top)));
  svg.append(svgEl("text", { x: L - 4, y: y(0), "text-anchor": "end" }, fmt(0)));
  svg.append(svgEl("text", { x: L, y: H - 4 }, fmtTime(t0)));
  svg.append(svgEl("text", { x: W - R, y: H - 4, "text-anchor": "end" }, fmtTime(t1)));
  series.forEach((s, i) => {
    let d = "", pen = false;
    for (const [t, v] of s.values) {
      if (v === null) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    }
    if (d) svg.append(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.8 }));
    const last = s.values.length ? s.values[s.values.length - 1][1] : null;
    svg.append(svgEl("text", { x: W - R, y: T + 10 + 13 * i, "text-anchor": "end", fill: s.color },
      `${s.name} ${fmt(last)}`));
  });
}

function tierBars(svg, instances) {
  const rowH = 22, L = 160, W = 1300, R = 90;
  const H = Math.max(1, instances.length) * rowH + 24;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const max = Math.max(1, ...instances.map((i) => i.chunks));
  instances.forEach((inst, row) => {
    const yy = row * rowH + 4;
    svg.append(svgEl("text", { x: L - 6, y: yy + 13, "text-anchor": "end" }, inst.instance_id));
    let x0 = L;
    for (const tier of inst.tiers) {
      const w = ((W - L - R) * tier.chunks) / max;
      const bar = svgEl("rect", { x: x0, y: yy, width: Math.max(w, 0), height: rowH - 8,
        fill: tierColor(tier.location) });
      bar.append(svgEl("title", {}, `${inst.instance_id} ${tier.location}: ${tier.chunks} chunks`));
      svg.append(bar);
      x0 += w;
    }
    svg.append(svgEl("text", { x: x0 + 6, y: yy + 13 }, fmtInt(inst.chunks)));
  });
  let lx = L;
  const legendY = instances.length * rowH + 18;
  for (const tier of tierColors.keys()) {
    svg.append(svgEl("rect", { x: lx, y: legendY - 9, width: 10, height: 10, fill: tierColor(tier) }));
    svg.append(svgEl("text", { x: lx + 14, y: legendY }, tier));
    lx += 24 + 7 * tier.length;
  }
}

// --- sections ----------------------------------------------------------------------------

function card(label, value, field) {
  return el("div", { class: "card" }, el("div", { class: "label" }, label),
    el("div", { class: "value", "data-field": field }, value));
}

function renderSummary(d) {
  const last = d.history.length ? d.history[d.history.length - 1] : null;
  document.getElementById("summary").replaceChildren(
    card("instances", fmtInt(d.totals.instances), "instances"),
    card("workers", fmtInt(d.totals.workers), "workers"),
    card("routers", fmtInt((d.routers || []).length), "routers"),
    card("chunks", fmtInt(d.totals.chunks), "chunks"),
    card("bytes (full chunks)", fmtBytes(d.totals.bytes), "bytes"),
    card("lookups / s", last ? fmtRate(last.lookups_per_s) : "–", "lookup-rate"),
    card("lookups", fmtInt(d.lookups.lookups), "lookups"),
    card("hit ratio", fmtPct(d.lookups.hit_ratio), "hit-ratio"),
    card("mean lookup latency", fmtMs(d.lookups.mean_latency_ms), "latency"),
    card("ingest / s", last ? fmtRate(last.admits_per_s + last.evicts_per_s) : "–", "ingest-rate"),
  );
}

function renderPlots(d) {
  const h = d.history;
  const axis = { span: d.history_span_s, since: d.started };
  const pts = (f) => h.map((p) => [p.t, f(p)]);
  lineChart(document.getElementById("plot-lookups"),
    [{ name: "lookups/s", color: PALETTE[0], values: pts((p) => p.lookups_per_s) }], axis);
  lineChart(document.getElementById("plot-latency"),
    [{ name: "ms", color: PALETTE[1], values: pts((p) => p.latency_ms) }],
    { ...axis, fmt: (v) => (v === null ? "–" : v.toFixed(v >= 10 ? 1 : 3)) });
  lineChart(document.getElementById("plot-hits"),
    [{ name: "hit", color: PALETTE[2], values: pts((p) => p.hit_ratio) }],
    { ...axis, yMax: 1, fmt: fmtPct });
  lineChart(document.getElementById("plot-ingest"), [
    { name: "admits/s", color: PALETTE[0], values: pts((p) => p.admits_per_s) },
    { name: "evicts/s", color: PALETTE[3], values: pts((p) => p.evicts_per_s) },
  ], axis);
  const tiers = [...new Set(h.flatMap((p) => Object.keys(p.chunks_by_tier)))];
  lineChart(document.getElementById("plot-tiers"), tiers.map((t) => ({
    name: t, color: tierColor(t), values: pts((p) => p.chunks_by_tier[t] || 0),
  })), { ...axis, fmt: (v) => (v === null ? "–" : fmtInt(Math.round(v))) });
}

function renderTiers(d) {
  tierBars(document.getElementById("tier-bars"), d.instances);
  const rows = d.instances.flatMap((inst) => inst.tiers.map((t) =>
    el("tr", { "data-instance": inst.instance_id, "data-tier": t.location },
      el("td", {}, inst.instance_id),
      el("td", {}, el("span", { class: "swatch", style: `background:${tierColor(t.location)}` }),
        t.location),
      el("td", { class: "num", "data-field": "chunks" }, fmtInt(t.chunks)),
      el("td", { class: "num", "data-field": "bytes" }, fmtBytes(t.bytes)))));
  fillBody("tiers", rows, "no chunks reported", 4);
}

function renderInstances(d) {
  const rows = d.instances.map((inst) =>
    el("tr", { "data-instance": inst.instance_id },
      el("td", {}, inst.instance_id),
      el("td", { class: "num", "data-field": "workers" }, inst.workers.length),
      el("td", { class: "num", "data-field": "chunks" }, fmtInt(inst.chunks)),
      el("td", { class: "num", "data-field": "bytes" }, fmtBytes(inst.bytes)),
      el("td", {}, inst.tiers.map((t) => `${t.location} ${fmtInt(t.chunks)}`).join(", ") || "–")));
  fillBody("instances", rows, "no instance registered", 5);
}

function renderWorkers(d) {
  const rows = d.instances.flatMap((inst) => inst.workers.map((w) =>
    el("tr", { "data-instance": inst.instance_id, "data-worker": w.worker_id },
      el("td", {}, inst.instance_id),
      el("td", { class: "num" }, w.worker_id),
      el("td", { class: "mono" }, w.address),
      el("td", { class: "mono" }, w.peer_init_url || "–"),
      el("td", { class: `state-${w.state}`, "data-field": "state" }, w.state),
      el("td", { class: "num", "data-field": "heartbeat" }, fmtAge(w.heartbeat_age_s)),
      el("td", {}, fmtDateTime(w.registration_time)),
      el("td", { class: "num", "data-field": "chunks" }, fmtInt(w.chunks)))));
  fillBody("workers", rows, "no worker registered", 8);
}

function renderRouters(d) {
  const rows = (d.routers || []).map((r) => {
    const up = r.backends.filter((b) => b.admitted).length;
    const backends = r.backends.map((b) =>
      `${b.instance_id || "?"} ${b.url}${b.admitted ? "" : " (ejected)"}`).join(", ");
    const reasons = Object.entries(r.requests).filter(([, n]) => n > 0)
      .map(([k, n]) => `${k} ${fmtInt(n)}`).join(", ");
    return el("tr", { "data-router": r.router_id },
      el("td", {}, r.router_id),
      el("td", { class: "mono" }, r.url),
      el("td", { class: "num", "data-field": "up" }, `${up} / ${r.backends.length}`),
      el("td", { "data-field": "backends" }, backends || "–"),
      el("td", { class: "num", "data-field": "in-flight" },
        fmtInt(r.backends.reduce((n, b) => n + b.in_flight, 0))),
      el("td", { class: "num", "data-field": "requests" }, fmtInt(r.requests_total)),
      el("td", { "data-field": "reasons" }, reasons || "–"),
      el("td", { class: "num", "data-field": "heartbeat" }, fmtAge(r.heartbeat_age_s)),
      el("td", { class: "num" }, fmtDuration(r.uptime_s)));
  });
  fillBody("routers", rows, "no router reports here", 9);
}

const COUNTERS = [
  ["sequence_gaps", "sequence gaps"],
  ["resyncs_requested", "resyncs requested"],
  ["reaped_workers", "reaped workers"],
  ["registrations", "registrations"],
  ["registrations_refused", "registrations refused"],
  ["deregistrations", "deregistrations"],
  ["admits_applied", "chunk admits applied"],
  ["evicts_applied", "chunk evicts applied"],
  ["reports_applied", "reports applied"],
  ["reports_stale", "stale reports"],
  ["reports_unknown_worker", "reports from unknown workers"],
  ["unknown_heartbeats", "heartbeats from unknown workers"],
  ["malformed_frames", "malformed frames"],
];

function renderCounters(d) {
  const rows = COUNTERS.filter(([k]) => k in d.counters).map(([k, label]) =>
    el("tr", { "data-counter": k }, el("td", {}, label),
      el("td", { class: "num" }, fmtInt(d.counters[k]))));
  fillBody("counters", rows, "–", 2);
}

function renderOperations(d) {
  const rows = d.operations.map((op) =>
    el("tr", { "data-event": op.event_id, "data-kind": op.kind },
      el("td", {}, fmtTime(op.created)),
      el("td", {}, op.kind),
      el("td", { class: `state-${op.status}`, "data-field": "status" }, op.status),
      el("td", { class: "mono" }, op.event_id),
      el("td", {}, op.error || "")));
  fillBody("operations", rows, "no operation yet", 5);
}

// --- the loop ----------------------------------------------------------------------------

function setStatus(state, text) {
  const s = document.getElementById("status");
  s.dataset.state = state;
  s.textContent = text;
}

function render(d) {
  renderSummary(d);
  renderPlots(d);
  renderTiers(d);
  renderInstances(d);
  renderWorkers(d);
  renderRouters(d);
  renderCounters(d);
  renderOperations(d);
  document.getElementById("updated").textContent = fmtTime(d.now);
  document.getElementById("uptime").textContent = fmtDuration(d.now - d.started);
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

// A controller run with --protect-reads wants its token on /dashboard/data: open the page as
// /dashboard#token=... (a fragment never leaves the browser, so it is in no server log).
const TOKEN = new URLSearchParams(window.location.hash.slice(1)).get("token");
const DATA_HEADERS = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};

async function poll() {
  try {
    const resp = await fetch("/dashboard/data", { cache: "no-store", headers: DATA_HEADERS });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    setStatus("live", "live");
  } catch (err) {
    setStatus("error", `controller unreachable (${err.message}); retrying`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
