// The demo page: signs in as a demo user, opens one stream through hub.js (shared by every tab
// of this origin), shows what arrives, and publishes through POST /publish.
import { connect } from "/static/hub.js";

const TYPE_NAMES = { 1: "login", 2: "payment", 3: "logout", 4: "log", 5: "broadcast" };
const TYPE_NUMBERS = Object.fromEntries(Object.entries(TYPE_NAMES).map(([n, k]) => [k, +n]));
const LEVELS = ["debug", "info", "warning", "error", "critical"];
const USERS = ["alice", "bob", "carol", "dave"];
const TOPICS = ["presence", "payments", "logs"];
const MAX_ROWS = 250;
const MAX_LOGS = 300;
const LATENCY_SAMPLES = 1000;
const BURST_SIZE = 1000;

const $ = (id) => document.getElementById(id);

const state = {
  user: null,
  hub: null,
  counts: { total: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0 },
  latencies: [],
  pending: [],
  scheduled: false,
  logs: [],
  logLevel: localStorage.getItem("hub-demo-level") || "info",
  showLogs: false,
  publisherToken: null,
  burst: null,
};

class DemoOff extends Error {}

// ---- tokens -------------------------------------------------------------------------------

async function demoToken(params) {
  const response = await fetch("/demo/token?" + new URLSearchParams(params), { cache: "no-store" });
  if (response.status === 404) throw new DemoOff("demo mode is off");
  if (!response.ok) throw new Error(`GET /demo/token: HTTP ${response.status}`);
  return (await response.json()).token;
}

function subscriberToken(user) {
  return () => demoToken({ user, topics: TOPICS.join(",") });
}

// ---- the stream ---------------------------------------------------------------------------

function signIn(user) {
  if (state.hub) state.hub.close();
  state.user = user;
  localStorage.setItem("hub-demo-user", user);
  $("user").value = user;
  const hub = connect({
    url: "/events",
    topics: TOPICS,
    token: subscriberToken(user),
    key: "demo:" + user, // tabs signed in as the same user share one connection
    onReset: (event) => showNotice(
      "The hub's history no longer reaches back to this page's last event " +
        `(${event.data && event.data.last_event_id}). A real app refetches its state here.`,
    ),
  });
  hub.onStatus(renderStatus);
  hub.on("*", receive);
  state.hub = hub;
}

const STATUS_TEXT = {
  connecting: "Connecting…",
  open: "Live",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
};

function renderStatus(status, { role, error }) {
  const pill = $("conn");
  pill.dataset.status = status;
  $("status").textContent = STATUS_TEXT[status] || status;
  pill.title = error ? `Connection status: ${status} (${error})` : `Connection status: ${status}`;
  const roleEl = $("role");
  roleEl.dataset.role = role || "";
  roleEl.textContent =
    status === "closed" ? "" :
    role === "leader" ? "This tab holds the connection" :
    role === "follower" ? "Shared from another tab" : "";
  if (status === "closed" && error === "logged out") {
    showNotice(`${state.user} was logged out: the hub ended the stream.`, "Sign in again", () =>
      signIn(state.user),
    );
  } else if (status === "closed" && error) {
    showNotice(`The hub refused the stream: ${error}`, "Retry", () => signIn(state.user), true);
  } else if (status === "open") {
    hideNotice();
  }
}

function receive(event) {
  if (event.name === "reset") return; // handled by onReset
  state.pending.push(event);
  if (!state.scheduled) {
    state.scheduled = true;
    // rAF paints with the screen; the timeout keeps a hidden tab's page current too.
    requestAnimationFrame(flush);
    setTimeout(flush, 100);
  }
}

// ---- rendering ----------------------------------------------------------------------------

function flush() {
  if (!state.scheduled) return;
  state.scheduled = false;
  const batch = state.pending;
  state.pending = [];
  const now = Date.now();
  const newRows = [];
  let newLogs = 0;
  for (const event of batch) {
    state.counts.total += 1;
    if (event.type in state.counts) state.counts[event.type] += 1;
    const latency = typeof event.ts === "number" ? Math.max(0, now - event.ts) : null;
    if (latency !== null) state.latencies.push(latency);
    if (event.name === "log") {
      state.logs.push(event);
      newLogs += 1;
      if (!state.showLogs) continue;
    }
    newRows.push([event, latency]);
    trackBurst(event);
  }
  if (state.latencies.length > LATENCY_SAMPLES) {
    state.latencies.splice(0, state.latencies.length - LATENCY_SAMPLES);
  }
  if (state.logs.length > MAX_LOGS) state.logs.splice(0, state.logs.length - MAX_LOGS);

  renderRows(newRows);
  if (newLogs) renderLogs(batch.filter((e) => e.name === "log"));
  renderCounters(batch.length > 0);
  renderLatency(batch.length ? batch[batch.length - 1] : null, now);
}

function timeOf(ms) {
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function typeBadge(event) {
  const badge = el("span", "type");
  badge.append(el("span", "swatch t" + event.type), el("span", "num", String(event.type)));
  badge.append(document.createTextNode(event.name));
  return badge;
}

function renderRows(rows) {
  if (!rows.length) return;
  const body = $("events");
  const fragment = document.createDocumentFragment();
  // Newest first; of a large batch only what the table keeps is built at all.
  for (const [event, latency] of rows.slice(-MAX_ROWS).reverse()) {
    const tr = el("tr", rows.length < 20 ? "fresh" : "");
    tr.dataset.id = event.id || "";
    tr.dataset.type = String(event.type);
    tr.append(el("td", "time", timeOf(event.ts || Date.now())));
    const typeCell = el("td");
    typeCell.append(typeBadge(event));
    tr.append(typeCell);
    tr.append(el("td", "user", event.user || "—"));
    const payload = el("td", "payload");
    const json = JSON.stringify(event.data);
    const code = el("code", "", json);
    code.title = json;
    payload.append(code);
    tr.append(payload);
    tr.append(el("td", "lat", latency === null ? "" : `${latency} ms`));
    fragment.append(tr);
  }
  body.prepend(fragment);
  while (body.childElementCount > MAX_ROWS) body.lastElementChild.remove();
  $("events-empty").hidden = body.childElementCount > 0;
}

function renderCounters(changed) {
  for (const key of Object.keys(state.counts)) {
    const node = $("count-" + key);
    const text = state.counts[key].toLocaleString("en-US");
    if (node.textContent !== text) {
      node.textContent = text;
      const card = node.closest(".stat");
      card.classList.remove("bump");
      if (changed) {
        void card.offsetWidth; // restart the animation
        card.classList.add("bump");
      }
    }
  }
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function renderLatency(last, now) {
  if (!state.latencies.length) return;
  const sorted = [...state.latencies].sort((a, b) => a - b);
  $("lat-p50").textContent = percentile(sorted, 50);
  $("lat-p95").textContent = percentile(sorted, 95);
  if (last && typeof last.ts === "number") $("lat-last").textContent = Math.max(0, now - last.ts);
}

function logVisible(event) {
  const level = (event.data && event.data.level) || "info";
  return LEVELS.indexOf(level) >= LEVELS.indexOf(state.logLevel);
}

function logRow(event) {
  const data = event.data || {};
  const li = el("li");
  const level = LEVELS.includes(data.level) ? data.level : "info";
  li.dataset.level = level;
  li.append(el("span", "time", timeOf(event.ts || Date.now()).slice(0, 8)));
  li.append(el("span", "lvl lvl-" + level, level));
  const msg = el("span", "msg");
  if (data.service) msg.append(el("span", "svc", data.service + " "));
  msg.append(document.createTextNode(data.message ?? JSON.stringify(data)));
  msg.title = data.message ?? "";
  li.append(msg);
  return li;
}

function renderLogs(events, replace = false) {
  const list = $("logs");
  if (replace) list.replaceChildren();
  const fragment = document.createDocumentFragment();
  for (const event of events.filter(logVisible).slice(-MAX_LOGS).reverse()) {
    fragment.append(logRow(event));
  }
  list.prepend(fragment);
  while (list.childElementCount > MAX_LOGS) list.lastElementChild.remove();
  $("logs-empty").hidden = list.childElementCount > 0;
}

function showNotice(text, actionLabel, action, bad = false) {
  const box = $("notice");
  box.replaceChildren(el("span", "", text));
  box.classList.toggle("bad", bad);
  if (actionLabel) {
    const button = el("button", "", actionLabel);
    button.type = "button";
    button.addEventListener("click", () => {
      hideNotice();
      action();
    });
    box.append(button);
  }
  box.hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
}

// ---- publishing ---------------------------------------------------------------------------

async function publish(body) {
  for (let attempt = 0; attempt < 2; attempt += 1) {
    if (!state.publisherToken || attempt > 0) {
      state.publisherToken = await demoToken({ role: "publisher" });
    }
    const response = await fetch("/publish", {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        Authorization: "Bearer " + state.publisherToken,
      },
      body: JSON.stringify(body),
    });
    if (response.status === 401 && attempt === 0) continue;
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${answer.error || answer.message || ""}`);
    return answer;
  }
  throw new Error("publisher token refused");
}

function eventFor(kind) {
  const user = $("pub-user").value;
  const message = $("pub-message").value;
  switch (kind) {
    case "login":
      return { type: 1, user, data: { ip: "203.0.113.7", agent: "demo page" } };
    case "payment":
      return {
        type: 2,
        user,
        data: { amount: Number($("pub-amount").value || 0), currency: "EUR", ref: randomRef() },
      };
    case "logout":
      return { type: 3, user, data: {} };
    case "log":
      return { type: 4, data: { level: $("pub-level").value, service: "demo-page", message } };
    default:
      return { type: 5, user, data: { message } };
  }
}

function randomRef() {
  return "pay_" + Math.random().toString(36).slice(2, 10);
}

async function publishOne(kind) {
  const result = $("pub-result");
  try {
    const t0 = performance.now();
    const answer = await publish(eventFor(kind));
    const ms = (performance.now() - t0).toFixed(1);
    result.classList.remove("bad");
    result.textContent = `202 ${kind} → id ${answer.ids && answer.ids[0]} (${ms} ms)`;
  } catch (e) {
    result.classList.add("bad");
    result.textContent = `${kind} failed: ${e.message}`;
  }
}

async function burst() {
  const button = $("burst");
  const out = $("burst-result");
  button.disabled = true;
  const tag = "b" + Date.now().toString(36);
  const events = [];
  for (let i = 0; i < BURST_SIZE; i += 1) {
    events.push({
      type: 2,
      user: USERS[i % USERS.length],
      data: { amount: Math.round(Math.random() * 50000) / 100, currency: "EUR", burst: tag, seq: i + 1 },
    });
  }
  state.burst = { tag, seen: 0, t0: performance.now(), accepted: null, done: null };
  out.textContent = `Sending ${BURST_SIZE.toLocaleString("en-US")} events…`;
  try {
    await publish(events);
    state.burst.accepted = performance.now() - state.burst.t0;
    renderBurst();
  } catch (e) {
    out.textContent = `Burst failed: ${e.message}`;
    state.burst = null;
  } finally {
    button.disabled = false;
  }
}

function trackBurst(event) {
  const b = state.burst;
  if (!b || !event.data || event.data.burst !== b.tag) return;
  b.seen += 1;
  if (b.seen === BURST_SIZE) b.done = performance.now() - b.t0;
  renderBurst();
}

function renderBurst() {
  const b = state.burst;
  if (!b) return;
  const out = $("burst-result");
  const n = BURST_SIZE.toLocaleString("en-US");
  const parts = [];
  if (b.accepted !== null) parts.push(`${n} accepted in <strong>${b.accepted.toFixed(0)} ms</strong>`);
  if (b.done !== null) parts.push(`all on screen in <strong>${b.done.toFixed(0)} ms</strong>`);
  else parts.push(`${b.seen.toLocaleString("en-US")} / ${n} received`);
  out.innerHTML = parts.join(" · "); // numbers only: nothing from the wire
  out.dataset.done = b.done !== null ? "true" : "false";
}

// ---- wiring -------------------------------------------------------------------------------

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => {
    const option = el("option", "", v);
    option.value = v;
    option.selected = v === selected;
    return option;
  }));
}

function setupLevels() {
  const group = $("levels");
  for (const level of LEVELS) {
    const button = el("button", "", level);
    button.type = "button";
    button.dataset.level = level;
    button.setAttribute("aria-pressed", String(level === state.logLevel));
    button.title = `Show ${level} and above`;
    button.addEventListener("click", () => {
      state.logLevel = level;
      localStorage.setItem("hub-demo-level", level);
      for (const b of group.children) b.setAttribute("aria-pressed", String(b === button));
      renderLogs(state.logs, true);
    });
    group.append(button);
  }
}

async function main() {
  const initial = new URLSearchParams(location.search).get("user") ||
    localStorage.getItem("hub-demo-user") || "alice";
  fillSelect($("user"), USERS.includes(initial) ? USERS : [...USERS, initial], initial);
  fillSelect($("pub-user"), USERS, initial);
  fillSelect($("pub-level"), LEVELS, "info");
  setupLevels();
  $("user").addEventListener("change", (e) => signIn(e.target.value));
  $("show-logs").addEventListener("change", (e) => (state.showLogs = e.target.checked));
  $("clear").addEventListener("click", () => {
    $("events").replaceChildren();
    $("events-empty").hidden = false;
  });
  for (const button of document.querySelectorAll("[data-publish]")) {
    button.addEventListener("click", () => publishOne(button.dataset.publish));
  }
  $("burst").addEventListener("click", burst);

  try {
    await demoToken({ user: initial, topics: TOPICS.join(",") });
  } catch (e) {
    const text = e instanceof DemoOff
      ? "Demo mode is off: start the hub with --demo to sign in as a demo user."
      : `Could not get a demo token: ${e.message}`;
    showNotice(text, null, null, true);
    $("conn").dataset.status = "closed";
    $("status").textContent = STATUS_TEXT.closed;
    $("publisher").hidden = true;
    return;
  }
  signIn(initial);
}

window.hubDemo = { state, TYPE_NUMBERS };
main();
