// The fanout cluster dashboard: polls /admin/stats with the admin token kept in session
// storage, keeps 10 minutes of totals for the charts (seeded from /admin/history), and
// marks nodes that drain or disappear. No dependencies, no build step.
"use strict";

const TOKEN_KEY = "fanout.admin-token";
const POLL_MS = 1000;
const TIMEOUT_MS = 4000;
const WINDOW_MS = 10 * 60 * 1000;
const GONE_KEEP_MS = 5 * 60 * 1000; // a vanished process stays listed (as gone) this long
const MAX_EVENTS = 200;
// Polls between readings of the webhook dead letters: a Postgres query, so not every second.
const WEBHOOKS_EVERY = 5;

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  timer: null,
  series: [], // {t, connections, messages_in_per_s, ...}, oldest first
  known: { node: new Map(), worker: new Map() }, // id -> {record, seen, gone}
  unreachableSince: null,
  lastView: null,
  polls: 0,
};

// -- formatting --------------------------------------------------------------------------
const nf = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
function num(v) { return v === null || v === undefined ? "–" : nf.format(v); }
function ms(v) { return v === null || v === undefined ? "–" : v < 1 ? v.toFixed(3) : nf.format(v); }
function bytes(v) {
  if (!v) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return m ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(s)}s`;
}
function clock(t) { return new Date(t).toLocaleTimeString(); }
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text; // never innerHTML: ids come from Redis
  if (cls) node.className = cls;
  return node;
}

// -- sign-in -----------------------------------------------------------------------------
function showLogin(message) {
  stop();
  $("board").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("idle", "not connected");
  $("token").focus();
}

function signIn(token) {
  state.token = token.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("login").hidden = true;
  $("board").hidden = false;
  $("signout").hidden = false;
  setStatus("connecting", "connecting…");
  loadHistory().finally(poll);
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  $("token").value = "";
  showLogin("");
}

function stop() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

// -- fetching ----------------------------------------------------------------------------
class Denied extends Error {}

async function api(path) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
  try {
    const resp = await fetch(path, {
      headers: { Authorization: `Bearer ${state.token}` },
      signal: ctrl.signal,
      cache: "no-store",
    });
    if (resp.status === 401 || resp.status === 403) {
      const body = await resp.json().catch(() => ({}));
      throw new Denied(`${resp.status}: ${body.error ? body.error.message : resp.statusText}`);
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    return await resp.json();
  } finally {
    clearTimeout(timer);
  }
}

async function loadHistory() {
  try {
    const history = await api("/admin/history");
    state.series = history.points.filter((p) => p && typeof p.t === "number");
  } catch (err) {
    if (err instanceof Denied) showLogin(`Token refused (${err.message}).`);
  }
}

async function poll() {
  if (!state.token) return;
  try {
    const view = await api("/admin/stats");
    reachable(view);
    if (state.polls++ % WEBHOOKS_EVERY === 0) loadWebhooks();
  } catch (err) {
    if (err instanceof Denied) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(`Token refused (${err.message}).`);
      return;
    }
    unreachable(err);
  }
  state.timer = setTimeout(poll, POLL_MS);
}

function reachable(view) {
  const now = view.generated_at || Date.now();
  if (state.unreachableSince !== null) {
    event("ok", `API reachable again (down for ${duration((Date.now() - state.unreachableSince) / 1000)})`);
    state.unreachableSince = null;
  }
  $("board").classList.remove("stale");
  setStatus("live", "live");
  $("meta").textContent = `served by ${view.served_by} · updated ${clock(now)}`;
  track("node", view.nodes, now);
  track("worker", view.workers, now);
  state.lastView = view;
  state.series.push({ t: now, ...view.totals });
  state.series = state.series.filter((p) => p.t >= now - WINDOW_MS);
  render(view, now);
}

function unreachable(err) {
  if (state.unreachableSince === null) {
    state.unreachableSince = Date.now();
    event("bad", `API unreachable: ${err.name === "AbortError" ? "timed out" : err.message}`);
  }
  $("board").classList.add("stale");
  setStatus("unreachable", "API unreachable");
  showBanner(`API unreachable since ${clock(state.unreachableSince)} — retrying every ${POLL_MS / 1000}s. The numbers below are stale.`, "bad");
}

function setStatus(kind, text) {
  const pill = $("status");
  pill.dataset.state = kind;
  pill.textContent = text;
}

// -- membership: draining and vanished processes -----------------------------------------
function track(kind, records, now) {
  const known = state.known[kind];
  const present = new Set();
  for (const record of records) {
    present.add(record.id);
    const before = known.get(record.id);
    if (!before) {
      if (state.lastView) event("ok", `${kind} ${record.id} joined`);
    } else if (before.gone) {
      event("ok", `${kind} ${record.id} is back`);
    }
    if (record.draining && !(before && before.record.draining)) {
      event("warn", `${kind} ${record.id} is draining`);
    }
    known.set(record.id, { record, seen: now, gone: null });
  }
  for (const [id, entry] of known) {
    if (present.has(id)) continue;
    if (!entry.gone) {
      entry.gone = now;
      const how = entry.record.draining ? "stopped after draining" : "disappeared (no stats within the TTL)";
      event(entry.record.draining ? "warn" : "bad", `${kind} ${id} ${how}`);
    } else if (now - entry.gone > GONE_KEEP_MS) {
      known.delete(id);
    }
  }
}

function goneNotice() {
  const gone = [];
  for (const kind of ["node", "worker"]) {
    for (const [id, entry] of state.known[kind]) {
      if (entry.gone && !entry.record.draining) gone.push(`${kind} ${id} (last seen ${clock(entry.seen)})`);
    }
  }
  return gone.length ? `Gone: ${gone.join(", ")}` : "";
}

// -- rendering ---------------------------------------------------------------------------
function render(view, now) {
  const notice = goneNotice();
  if (notice) showBanner(notice, "bad");
  else hideBanner();
  renderTotals(view.totals);
  renderProcesses("nodes", "node", nodeCells, now);
  renderProcesses("workers", "worker", workerCells, now);
  renderQueue(view.queue);
  drawCharts(now);
}

function showBanner(text, kind) {
  const banner = $("banner");
  banner.textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = false;
}
function hideBanner() { $("banner").hidden = true; }

const CARDS = [
  ["nodes", "Nodes", num], ["workers", "Workers", num], ["connections", "Connections", num],
  ["users", "Users", num], ["messages_in_per_s", "Messages in/s", num],
  ["messages_out_per_s", "Messages out/s", num], ["latency_p99_ms", "Delivery p99 ms", ms],
  ["queue_depth", "Queue depth", num], ["processed_per_s", "Processed/s", num],
  ["failures_total", "Failures", num], ["drops_total", "Drops", num],
  ["slow_consumer_closes_total", "Slow closes", num], ["redis_rtt_ms_max", "Redis RTT ms (max)", ms],
  ["loop_lag_ms_max", "Loop lag ms (max)", ms], ["gc_pause_ms_max", "GC pause ms (max)", ms],
];

function renderTotals(totals) {
  const box = $("totals");
  box.replaceChildren();
  for (const [key, label, fmt] of CARDS) {
    const card = el("div", undefined, "card");
    card.id = `total-${key.replaceAll("_", "-")}`;
    card.dataset.value = totals[key] === null || totals[key] === undefined ? "" : String(totals[key]);
    let text = label;
    if ((key === "failures_total" || key === "drops_total") && totals[key] > 0) card.classList.add("warn");
    if (key === "nodes" && totals.draining_nodes) {
      card.classList.add("warn");
      text = `Nodes (${totals.draining_nodes} draining)`;
    }
    card.append(el("div", text, "label"), el("div", fmt(totals[key]), "value"));
    box.append(card);
  }
}

function stateCell(entry) {
  if (entry.gone) return el("span", `gone ${clock(entry.gone)}`, "badge gone");
  if (entry.record.draining) return el("span", "draining", "badge draining");
  if (entry.record.healthy === false) return el("span", "unhealthy", "badge unhealthy");
  return el("span", "live", "badge live");
}

function nodeCells(r) {
  return [num(r.connections), num(r.users), num(r.messages_in_per_s), num(r.messages_out_per_s),
    num(r.deliveries_per_s), ms(r.latency_p99_ms), num(r.drops_total), num(r.slow_consumer_closes_total),
    ms(r.redis_rtt_ms), ms(r.loop_lag_ms), bytes(r.rss_bytes), duration(r.uptime_s)];
}

function workerCells(r) {
  const parts = (r.partitions || []).join(", ");
  return [parts || "none", num(r.processed_per_s), num(r.processed_total), num(r.failures_total),
    num(r.dead_lettered_total), num(r.queue_depth), ms(r.redis_rtt_ms), ms(r.loop_lag_ms),
    bytes(r.rss_bytes), duration(r.uptime_s)];
}

function renderProcesses(tableId, kind, cells, now) {
  const body = $(tableId).tBodies[0];
  const rows = [...state.known[kind].entries()].sort(([a], [b]) => a.localeCompare(b));
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", `no ${kind}s are reporting`, "muted");
    td.colSpan = 15;
    tr.append(td);
    body.append(tr);
  }
  for (const [id, entry] of rows) {
    const tr = el("tr");
    tr.dataset.id = id;
    tr.dataset.state = entry.gone ? "gone" : entry.record.draining ? "draining" : "live";
    const status = el("td");
    status.append(stateCell(entry));
    tr.append(el("td", id), status);
    for (const text of cells(entry.record)) tr.append(el("td", text));
    tr.append(el("td", entry.gone ? clock(entry.seen) : `${Math.max(0, Math.round((now - entry.seen) / 1000))}s ago`));
    body.append(tr);
  }
}

function renderQueue(queue) {
  $("queue-total").textContent = `(total ${num(queue.depth)})`;
  const box = $("partitions");
  box.replaceChildren();
  const peak = Math.max(1, ...queue.partitions.map((p) => p.depth));
  for (const p of queue.partitions) {
    const item = el("div", undefined, p.owner ? "partition" : "partition unowned");
    item.dataset.partition = String(p.partition);
    item.append(el("div", `p${p.partition}: ${num(p.depth)} · ${p.owner || "no owner"}`));
    const bar = el("div", undefined, "bar");
    const fill = el("span");
    fill.style.width = `${(100 * p.depth) / peak}%`;
    bar.append(fill);
    item.append(bar);
    box.append(item);
  }
}

// -- webhooks: the outbox backlog and the dead letters (/admin/webhooks/dead-letters) ---
async function loadWebhooks() {
  try {
    renderWebhooks(await api("/admin/webhooks/dead-letters?limit=50"));
  } catch (err) {
    $("webhooks-summary").textContent = `(unavailable: ${err.message})`;
  }
}

function renderWebhooks(view) {
  const summary = $("webhooks-summary");
  summary.textContent = view.enabled
    ? `(${num(view.waiting)} waiting, oldest ${duration(view.oldest_age_s)}, ${num(view.total)} dead letters)`
    : `(off: FANOUT_WEBHOOK_URL is not set; ${num(view.total)} dead letters)`;
  summary.dataset.total = String(view.total);
  const body = $("dead-letters").tBodies[0];
  body.replaceChildren();
  for (const d of view.items) {
    const tr = el("tr");
    tr.dataset.event = d.id;
    const cells = [d.id, d.type, d.session_id, clock(d.created_at), clock(d.dead_at),
      num(d.attempts), d.last_error || "–"];
    for (const text of cells) tr.append(el("td", text));
    body.append(tr);
  }
}

function event(kind, text) {
  const list = $("events");
  const item = el("li", undefined, kind);
  item.append(el("time", clock(Date.now())), document.createTextNode(text));
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

// -- charts (canvas, last 10 minutes) ----------------------------------------------------
const CHARTS = [
  ["chart-connections", [["connections", "--in"]]],
  ["chart-messages", [["messages_in_per_s", "--in"], ["messages_out_per_s", "--out"]]],
  ["chart-latency", [["latency_p99_ms", "--warn"]]],
  ["chart-queue", [["queue_depth", "--in"]]],
];

// A round grid step (1, 2, 2.5 or 5 times a power of ten) for four steps up to `peak`.
function niceStep(peak) {
  const raw = Math.max(peak, 1e-9) / 4;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((m) => m >= raw);
}

function drawCharts(now) {
  const css = getComputedStyle(document.documentElement);
  for (const [id, lines] of CHARTS) drawChart($(id), lines, now, css);
}

function drawChart(canvas, lines, now, css) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const left = 46, right = 8, top = 8, bottom = 20;
  const start = now - WINDOW_MS;
  let peak = 0;
  for (const p of state.series) for (const [key] of lines) if (typeof p[key] === "number") peak = Math.max(peak, p[key]);
  const step = peak > 0 ? niceStep(peak) : 0.25;
  const max = step * 4;
  const x = (t) => left + ((t - start) / WINDOW_MS) * (w - left - right);
  const y = (v) => top + (1 - v / max) * (h - top - bottom);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = css.getPropertyValue("--muted");
  ctx.strokeStyle = css.getPropertyValue("--line");
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = step * i;
    ctx.beginPath();
    ctx.moveTo(left, y(v));
    ctx.lineTo(w - right, y(v));
    ctx.stroke();
    ctx.fillText(step < 1 ? v.toFixed(2) : nf.format(v), 4, y(v) + 4);
  }
  for (const [label, t] of [["-10m", start], ["-5m", start + WINDOW_MS / 2], ["now", now]]) {
    ctx.fillText(label, Math.min(x(t) - 8, w - 26), h - 5);
  }
  for (const [key, color] of lines) {
    ctx.strokeStyle = css.getPropertyValue(color);
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    let drawing = false, previous = null;
    for (const p of state.series) {
      const v = p[key];
      // A gap of over 5 s (API unreachable, no historian) is left as a gap.
      const broken = previous !== null && p.t - previous > 5000;
      if (typeof v !== "number" || p.t < start) { drawing = false; continue; }
      if (!drawing || broken) ctx.moveTo(x(p.t), y(v));
      else ctx.lineTo(x(p.t), y(v));
      drawing = true;
      previous = p.t;
    }
    ctx.stroke();
  }
}

// -- start ---------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if ($("token").value.trim()) signIn($("token").value);
  });
  $("signout").addEventListener("click", signOut);
  window.addEventListener("resize", () => drawCharts(Date.now()));
  // `fanout up` prints /dashboard#token=...: a fragment never reaches a server or its logs;
  // it is taken into sessionStorage and removed from the address bar.
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) {
    history.replaceState(null, "", location.pathname + location.search);
    signIn(fromLink);
  } else if (state.token) signIn(state.token);
  else showLogin("");
});
