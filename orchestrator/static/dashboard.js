// The heartbeat dashboard: every runtime in a Map, fed by Server-Sent Events from /events.
// Only one page of rows (PAGE) is ever in the DOM, so 100,000 runtimes stay responsive;
// relative times tick here, and the last-seen times of the rows on screen are refreshed
// with one small lookup every few seconds (pulses themselves never reach the page).
// Hovering a relative time shows the absolute one, in the browser's time zone.
"use strict";

const PAGE = 500;
const SEEN_REFRESH_MS = 5000;
const RENDER_GAP_MS = 250;
const SEVERITY = { dead: 0, unknown: 1, stopped: 2, alive: 3 };
// A distinct shape per state, beside the word: the state never rests on colour alone.
const ICONS = { alive: "✓", dead: "✕", stopped: "■", unknown: "?" };

const runtimes = new Map();
let clockOffset = 0; // server time minus browser time, in ms
let sortKey = "state";
let sortDir = 1;
let filterText = "";
let filterState = "";
let view = []; // the filtered, sorted runtimes; recomputed only when data or filters change
let viewDirty = true;
let shown = []; // [{r, seen, since, seenAt}] for the rows in the DOM, so ticks touch only their cells
let renderTimer = null;
let lastRender = 0;
let total = 0;
let mismatches = 0;
let lastResync = 0;

const $ = (id) => document.getElementById(id);

function parseTime(value) {
  return value === null || value === undefined ? null : Date.parse(value);
}

function put(status) {
  const old = runtimes.get(status.id);
  runtimes.set(status.id, {
    id: status.id,
    state: status.state,
    interval: status.interval,
    grace: status.grace,
    reason: status.reason || "",
    lastSeen: parseTime(status.last_seen),
    since: parseTime(status.since),
    changed: old !== undefined && old.state !== status.state,
  });
}

function now() {
  return Date.now() + clockOffset;
}

function syncClock(serverNow) {
  const t = parseTime(serverNow);
  if (t !== null) clockOffset = t - Date.now();
}

function ago(then) {
  if (then === null) return "never";
  return `${span(now() - then)} ago`;
}

// "2026-11-29 02:02:00.012 +01:00": ISO 8601 in the browser's time zone, with its offset so it is unambiguous.
function absolute(then) {
  const d = new Date(then);
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  const offset = -d.getTimezoneOffset();
  const sign = offset < 0 ? "-" : "+";
  const zone = `${sign}${pad(Math.floor(Math.abs(offset) / 60))}:${pad(Math.abs(offset) % 60)}`;
  const date = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  return `${date} ${time} ${zone}`;
}

function setTitle(td, then) {
  if (then === null) td.removeAttribute("title");
  else td.title = absolute(then);
}

function span(ms) {
  const s = Math.max(0, ms / 1000);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

// Sort keys: ascending means what the column shows ascends (most recently seen first, for instance).
const KEYS = {
  id: (r) => r.id,
  state: (r) => SEVERITY[r.state] ?? 9,
  interval: (r) => r.interval,
  grace: (r) => r.grace,
  last_seen: (r) => (r.lastSeen === null ? Infinity : -r.lastSeen),
  since: (r) => -r.since,
  reason: (r) => r.reason,
};

function compare(a, b) {
  const key = KEYS[sortKey];
  const x = key(a);
  const y = key(b);
  if (x < y) return -sortDir;
  if (x > y) return sortDir;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

function recompute() {
  const text = filterText.toLowerCase();
  const rows = [];
  for (const r of runtimes.values()) {
    if (filterState && r.state !== filterState) continue;
    if (text && !r.id.toLowerCase().includes(text)) continue;
    rows.push(r);
  }
  rows.sort(compare);
  view = rows;
  viewDirty = false;
}

function scheduleRender(dataChanged = true) {
  if (dataChanged) viewDirty = true;
  if (renderTimer !== null) return;
  const wait = Math.max(0, RENDER_GAP_MS - (performance.now() - lastRender));
  renderTimer = setTimeout(render, wait);
}

function cell(tr, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  tr.appendChild(td);
  return td;
}

function stateCell(tr, state) {
  const badge = document.createElement("span");
  badge.className = `badge state-${state}`;
  const icon = document.createElement("span");
  icon.className = "icon";
  icon.setAttribute("aria-hidden", "true");
  icon.textContent = ICONS[state] ?? "•";
  badge.append(icon, state);
  const td = cell(tr, "", "state");
  td.appendChild(badge);
}

function render() {
  renderTimer = null;
  lastRender = performance.now();
  if (viewDirty) recompute();
  const body = document.createDocumentFragment();
  shown = [];
  for (const r of view.slice(0, PAGE)) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    tr.dataset.state = r.state;
    if (r.changed) {
      tr.className = "flash";
      r.changed = false;
    }
    cell(tr, r.id, "id");
    stateCell(tr, r.state);
    cell(tr, `${r.interval} s`, "num interval");
    cell(tr, `${r.grace} s`, "num grace");
    const seen = cell(tr, ago(r.lastSeen), "seen");
    setTitle(seen, r.lastSeen);
    const since = cell(tr, span(now() - r.since), "since");
    setTitle(since, r.since);
    cell(tr, r.reason, "reason");
    body.appendChild(tr);
    shown.push({ r, seen, since, seenAt: r.lastSeen });
  }
  $("rows").replaceChildren(body);
  const matching = view.length;
  $("note").textContent =
    matching > PAGE
      ? `showing ${PAGE} of ${matching} matching (narrow the filter to see others)`
      : `showing ${matching} of ${runtimes.size}`;
}

function tick() {
  for (const row of shown) {
    const { r, seen, since } = row;
    seen.textContent = ago(r.lastSeen);
    if (row.seenAt !== r.lastSeen) {
      row.seenAt = r.lastSeen; // refreshSeen moved it
      setTitle(seen, r.lastSeen);
    }
    since.textContent = span(now() - r.since);
  }
}

function showCounts(counts) {
  syncClock(counts.now);
  total = counts.total;
  $("count-all").textContent = counts.total;
  for (const state of ["alive", "dead", "stopped", "unknown"]) {
    $(`count-${state}`).textContent = counts.states[state] ?? 0;
  }
  setLink(counts.ready ? "live" : "down", counts.ready ? "live" : "orchestrator not connected to its broker");
  // Registrations and deregistrations raise no transition: a total that disagrees twice in a row means resync.
  mismatches = counts.total === runtimes.size ? 0 : mismatches + 1;
  if (mismatches >= 2 && performance.now() - lastResync > 10000) resync();
}

async function resync() {
  lastResync = performance.now();
  mismatches = 0;
  const response = await fetch("/api/runtimes");
  if (!response.ok) return;
  const list = await response.json();
  runtimes.clear();
  for (const status of list) put(status);
  scheduleRender();
}

async function refreshSeen() {
  const ids = shown.map(({ r }) => r.id);
  if (ids.length === 0 || document.hidden) return;
  try {
    const response = await fetch("/api/runtimes/lookup", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ids }),
    });
    if (!response.ok) return;
    const list = await response.json();
    for (const status of list) {
      const r = runtimes.get(status.id);
      if (r && r.state === status.state) r.lastSeen = parseTime(status.last_seen);
    }
    if (sortKey === "last_seen") scheduleRender();
    else tick();
  } catch (error) {
    // The feed's own error handler shows the link state; try again next time.
  }
}

function setLink(kind, text) {
  const link = $("link");
  link.className = `link link-${kind}`;
  link.textContent = text;
}

function connect() {
  const events = new EventSource("/events");
  events.addEventListener("snapshot", (e) => {
    const data = JSON.parse(e.data);
    runtimes.clear();
    for (const status of data.runtimes) put(status);
    showCounts(data);
    scheduleRender();
  });
  events.addEventListener("update", (e) => {
    const data = JSON.parse(e.data);
    syncClock(data.now);
    for (const status of data.runtimes) put(status);
    for (const id of data.removed) runtimes.delete(id);
    scheduleRender();
  });
  events.addEventListener("counts", (e) => showCounts(JSON.parse(e.data)));
  events.onerror = () => setLink("down", "reconnecting…");
}

function setSort(key) {
  sortDir = key === sortKey ? -sortDir : 1;
  sortKey = key;
  for (const th of document.querySelectorAll("th[data-key]")) {
    if (th.dataset.key === sortKey) th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
  scheduleRender();
}

function setStateFilter(state) {
  filterState = state;
  $("state-filter").value = state;
  for (const button of document.querySelectorAll("#counts .count")) {
    button.setAttribute("aria-pressed", String(button.dataset.state === state));
  }
  scheduleRender();
}

function init() {
  for (const th of document.querySelectorAll("th[data-key]")) th.addEventListener("click", () => setSort(th.dataset.key));
  for (const button of document.querySelectorAll("#counts .count")) {
    button.addEventListener("click", () => setStateFilter(button.dataset.state));
  }
  let debounce = null;
  $("filter").addEventListener("input", (e) => {
    clearTimeout(debounce);
    debounce = setTimeout(() => {
      filterText = e.target.value.trim();
      scheduleRender();
    }, 150);
  });
  $("state-filter").addEventListener("change", (e) => setStateFilter(e.target.value));
  sortDir = -1; // setSort flips it: the default view is state ascending, dead first
  setSort("state");
  setStateFilter("");
  connect();
  setInterval(tick, 1000);
  setInterval(refreshSeen, SEEN_REFRESH_MS);
}

init();
