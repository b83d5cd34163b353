// The demo page: signs in as a demo user, opens one stream through hub.js (shared by every tab
// of this origin), shows what arrives, and publishes through POST /publish. Its counters and
// publish buttons are built from the hub's type table (GET /types), so a type added to the hub
// shows up here with no change to this file.
import { FALLBACK_TYPES, connect, fetchTypes } from "./hub.js";

/** @typedef {import("./hub.js").HubEvent} HubEvent */
/** @typedef {import("./hub.js").EventType} EventType */
/** @typedef {import("./hub/relay.js").Status} Status */

const LEVELS = ["debug", "info", "warning", "error", "critical"];
const USERS = ["alice", "bob", "carol", "dave"];
const TOPICS = ["presence", "payments", "logs"];
const MAX_ROWS = 250;
const MAX_LOGS = 300;
const LATENCY_SAMPLES = 1000;
const BURST_SIZE = 1000;

/**
 * The page's element with this id (the page's markup has every one this file asks for).
 * @param {string} id
 */
function $(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`#${id} is missing from the page`);
  return node;
}

/**
 * @template {HTMLElement} T
 * @param {string} id
 * @param {new () => T} kind
 * @returns {T}
 */
function $as(id, kind) {
  const node = $(id);
  if (!(node instanceof kind)) throw new Error(`#${id} is not a ${kind.name}`);
  return node;
}

/** @typedef {{tag: string, seen: number, t0: number, accepted: number | null, done: number | null}} Burst */

const state = {
  /** @type {string | null} the demo user this page signs in as (the picker's choice) */
  user: null,
  /**
   * @type {string | null} who is signed in: the user whose stream the hub opened (set when the
   * stream is open, cleared when it closes: a logout, a refusal, another user picked)
   */
  signedIn: null,
  /** whether the hub gives out demo tokens (only then can this page sign anyone in) */
  demo: false,
  /** @type {ReturnType<typeof connect> | null} */
  hub: null,
  /** @type {readonly EventType[]} the hub's types, in its order */
  types: FALLBACK_TYPES,
  /** events listed in the table since the page opened or its last Clear (the first card) */
  listed: 0,
  /** log events received meanwhile but not listed ("log events" unticked) */
  unlisted: 0,
  /**
   * @type {Map<number, number>} events listed in the table since the page opened or its last
   * Clear, by type number (one card each, counting what the first card counts, by type)
   */
  counts: new Map(),
  /** @type {Map<number, number>} events received meanwhile but not listed, by type number */
  unlistedByType: new Map(),
  /** @type {"connection" | "reset" | "setup" | null} what the notice shown is about */
  notice: null,
  /** @type {number[]} */
  latencies: [],
  /** @type {HubEvent[]} */
  pending: [],
  scheduled: false,
  /** @type {HubEvent[]} */
  logs: [],
  logLevel: localStorage.getItem("hub-demo-level") || "info",
  showLogs: false,
  /** @type {string | null} */
  publisherToken: null,
  /** @type {Burst | null} */
  burst: null,
  /** @type {string[]} the named topics this page joined: its stream has them beside TOPICS */
  joined: [],
};

class DemoOff extends Error {}

// ---- tokens -------------------------------------------------------------------------------

/**
 * A demo token and its claims; an error with the hub's reason when it refuses (a topic name
 * outside its alphabet, say).
 * @param {Record<string, string>} params
 * @returns {Promise<{token: string, topics?: string[]}>}
 */
async function demoAnswer(params) {
  const response = await fetch("/demo/token?" + new URLSearchParams(params), { cache: "no-store" });
  if (response.status === 404) throw new DemoOff("demo mode is off");
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`HTTP ${response.status}: ${answer.error || "GET /demo/token failed"}`);
  }
  return answer;
}

/** @param {Record<string, string>} params */
async function demoToken(params) {
  return (await demoAnswer(params)).token;
}

/** The topics this page's stream asks for: the demo's own, then the named ones it joined. */
function streamTopics() {
  return [...TOPICS, ...state.joined];
}

/**
 * @param {string} user
 * @param {string[]} topics  what the token grants (and the stream asks for)
 */
function subscriberToken(user, topics) {
  return () => demoToken({ user, topics: topics.join(",") });
}

// ---- the stream ---------------------------------------------------------------------------

/** @param {string} user */
function signIn(user) {
  if (state.hub) state.hub.close();
  state.user = user;
  localStorage.setItem("hub-demo-user", user);
  $as("user", HTMLSelectElement).value = user;
  const topics = streamTopics();
  const hub = connect({
    url: "/events",
    topics,
    token: subscriberToken(user, topics),
    ticketUrl: "/tickets", // the token buys a one-time ticket per stream: never in a URL
    // Tabs signed in as the same user, on the same topics, share one connection.
    key: ["demo:" + user, ...[...state.joined].sort()].join("|"),
    onReset: showReset,
  });
  state.hub = hub; // before its first status: renderWho reads it
  hub.onStatus(renderStatus);
  hub.on("*", receive);
}

/**
 * The hub could not replay everything this page missed (a `reset` event): say so in plain words,
 * with the ids only in the tooltip. The page keeps the rows it has and goes on with new events
 * (the hub's stream resumes from its newest event); the events in between are not coming.
 * @param {HubEvent} event
 */
function showReset(event) {
  const last = field(event.data, "last_event_id");
  const what = typeof last === "string" && !event.backwards
    ? "Some events may be missing from the list: this page was offline for longer than the " +
      "hub keeps events."
    : "Some events may be missing from the list: the hub could not send again everything " +
      "published since this page's last event.";
  const text = `${what} The page kept what it had and goes on with new events as they come.`;
  const details = [`The hub's reset event ${event.id ?? "(no id)"}`];
  if (typeof last === "string") details.push(`this page's last event: ${last}`);
  const reason = field(event.data, "reason");
  if (typeof reason === "string") details.push(`the hub's reason: ${reason}`);
  showNotice(text, { kind: "reset", title: details.join("; ") });
}

/** The code of the hub's end frame when a logout ended the stream (README, Subscribing). */
const END_LOGOUT = 4003;

/** @type {Record<Status, string>} */
const STATUS_TEXT = {
  connecting: "Connecting…",
  open: "Live",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
};

/** @type {import("./hub.js").StatusListener} */
function renderStatus(status, { role, error, code }) {
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
  // Signed in while the hub holds the stream open for the user (or it is being resumed).
  if (status === "open") state.signedIn = state.user;
  else if (status === "closed") state.signedIn = null;
  renderWho();
  if (status === "closed" && code === END_LOGOUT) {
    const user = state.user ?? "";
    showNotice(`${user} was logged out: the hub ended the stream.`, {
      kind: "connection",
      actionLabel: "Sign in again",
      action: () => signIn(user),
    });
  } else if (status === "closed" && error) {
    const user = state.user ?? "";
    showNotice(`The hub refused the stream: ${error}`, {
      kind: "connection",
      actionLabel: "Retry",
      action: () => signIn(user),
      bad: true,
    });
  } else if (status === "open" && state.notice === "connection") {
    hideNotice(); // what it said is over; a reset's notice stays until dismissed
  }
}

/**
 * The user picker and what it says: only in demo mode (the only way this page signs anyone
 * in), and "Signed in as" only while someone is.
 */
function renderWho() {
  $("who").hidden = !state.demo;
  $("who-text").textContent =
    state.signedIn !== null ? "Signed in as" :
    state.hub !== null && state.hub.status !== "closed" ? "Signing in as" : "Sign in as";
}

/** @param {HubEvent} event */
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
  /** @type {[HubEvent, number | null][]} */
  const newRows = [];
  let newLogs = 0;
  for (const event of batch) {
    if (event.type !== null && !state.counts.has(event.type)) {
      addCounter({ type: event.type, name: event.name });
    }
    const latency = typeof event.ts === "number" ? Math.max(0, now - event.ts) : null;
    if (latency !== null) state.latencies.push(latency);
    if (event.name === "log") {
      state.logs.push(event);
      newLogs += 1;
      if (!state.showLogs) {
        state.unlisted += 1;
        bump(state.unlistedByType, event.type);
        continue;
      }
    }
    state.listed += 1;
    bump(state.counts, event.type);
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

/**
 * @param {Map<number, number>} counts
 * @param {number | null} type
 */
function bump(counts, type) {
  if (type !== null) counts.set(type, (counts.get(type) ?? 0) + 1);
}

/** @param {number} ms */
function timeOf(ms) {
  const d = new Date(ms);
  const pad = (/** @type {number} */ n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/**
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {string} [className]
 * @param {string} [text]
 * @returns {HTMLElementTagNameMap[K]}
 */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The first five types have their colours in demo.css; any other gets one by its number.
const CSS_COLOURS = 5;

/** @param {number | null} type */
function swatch(type) {
  const node = el("span", "swatch t" + type);
  if (type !== null && (type < 1 || type > CSS_COLOURS)) {
    node.style.background = `hsl(${(type * 137.5) % 360} 65% 45%)`;
  }
  return node;
}

/** @param {HubEvent} event */
function typeBadge(event) {
  const badge = el("span", "type");
  badge.append(swatch(event.type), el("span", "num", String(event.type)));
  badge.append(document.createTextNode(event.name));
  return badge;
}

/**
 * A counter card for one type, before the latency card.
 * @param {{type: number, name: string}} type
 */
function addCounter({ type, name }) {
  state.counts.set(type, 0);
  const card = el("div", "stat");
  card.dataset.type = String(type);
  const label = el("div", "label");
  label.title = `${name} events listed in the table since the page opened or its last Clear`;
  label.append(swatch(type), document.createTextNode(`${type} · ${name}`));
  const value = el("div", "value", "0");
  value.id = "count-" + type;
  const note = el("div", "sub");
  note.id = `count-${type}-note`;
  card.append(label, value, note);
  $("stats").insertBefore(card, $("stat-latency"));
}

/** One publish button per type the hub lists, but those the hub publishes itself. */
function addPublishButtons() {
  const buttons = $("publish-buttons");
  for (const kind of state.types.filter((t) => !t.internal)) {
    const { type, name } = kind;
    const button = el("button");
    button.type = "button";
    button.dataset.publish = name;
    button.append(swatch(type), document.createTextNode(name[0].toUpperCase() + name.slice(1)));
    button.addEventListener("click", () => publishOne(kind));
    buttons.append(button);
  }
}

/** @param {[HubEvent, number | null][]} rows */
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
    const typeCell = el("td", "type-cell");
    typeCell.append(typeBadge(event));
    tr.append(typeCell);
    tr.append(userCell(event));
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
  while (body.childElementCount > MAX_ROWS) body.lastElementChild?.remove();
  $("events-empty").hidden = body.childElementCount > 0;
}

/**
 * Whom the event is for: its user, and the topics its publisher named. A broadcast has no user
 * (a `user` field a publisher put on one routes nothing, so it is not shown as if it did): it
 * reaches every stream, or only the subscribers of the topics it names.
 * @param {HubEvent} event
 */
function userCell(event) {
  const topics = event.topics ?? [];
  const broadcast = event.name === "broadcast";
  if (broadcast && !topics.length) {
    const cell = el("td", "user everyone", "everyone");
    cell.title = "A broadcast goes to every stream: it is for no one user";
    return cell;
  }
  const cell = el("td", "user", broadcast ? undefined : event.user || "—");
  if (!topics.length) return cell;
  cell.classList.add("to-topics");
  if (!broadcast) cell.append(" ");
  for (const topic of topics) cell.append(el("span", "topic", topic));
  const names = topics.join(", ");
  cell.title = broadcast
    ? `A broadcast to the subscribers of ${names}`
    : `For ${event.user || "no user"}, and the subscribers of ${names}`;
  return cell;
}

/** @param {boolean} changed */
function renderCounters(changed) {
  const note = [];
  if (state.listed > MAX_ROWS) note.push(`the newest ${MAX_ROWS} kept`);
  if (state.unlisted) {
    const n = state.unlisted;
    note.push(`${n.toLocaleString("en-US")} log event${n === 1 ? "" : "s"} not listed`);
  }
  $("count-total-note").textContent = note.join(" · ");
  for (const type of state.counts.keys()) {
    const n = state.unlistedByType.get(type) ?? 0;
    $(`count-${type}-note`).textContent = n ? `${n.toLocaleString("en-US")} not listed` : "";
  }
  const counts = [["total", state.listed], ...state.counts];
  for (const [key, count] of counts) {
    const node = $("count-" + key);
    const text = count.toLocaleString("en-US");
    if (node.textContent !== text) {
      node.textContent = text;
      const card = node.closest(".stat");
      if (!(card instanceof HTMLElement)) continue;
      card.classList.remove("bump");
      if (changed) {
        void card.offsetWidth; // restart the animation
        card.classList.add("bump");
      }
    }
  }
}

/**
 * @param {number[]} sorted
 * @param {number} p
 */
function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/**
 * @param {HubEvent | null} last
 * @param {number} now
 */
function renderLatency(last, now) {
  if (!state.latencies.length) return;
  const sorted = [...state.latencies].sort((a, b) => a - b);
  $("lat-p50").textContent = String(percentile(sorted, 50));
  $("lat-p95").textContent = String(percentile(sorted, 95));
  if (last && typeof last.ts === "number") {
    $("lat-last").textContent = String(Math.max(0, now - last.ts));
  }
}

/**
 * One field of an event's data, if the data is an object that has it.
 * @param {unknown} data
 * @param {string} name
 * @returns {unknown}
 */
function field(data, name) {
  return data && typeof data === "object" && name in data
    ? /** @type {Record<string, unknown>} */ (data)[name]
    : undefined;
}

/** @param {HubEvent} event */
function logLevel(event) {
  const level = field(event.data, "level");
  return typeof level === "string" && LEVELS.includes(level) ? level : "info";
}

/** @param {HubEvent} event */
function logVisible(event) {
  return LEVELS.indexOf(logLevel(event)) >= LEVELS.indexOf(state.logLevel);
}

/** @param {HubEvent} event */
function logRow(event) {
  const li = el("li");
  const level = logLevel(event);
  li.dataset.level = level;
  li.append(el("span", "time", timeOf(event.ts || Date.now()).slice(0, 8)));
  li.append(el("span", "lvl lvl-" + level, level));
  const msg = el("span", "msg");
  const service = field(event.data, "service");
  if (service) msg.append(el("span", "svc", service + " "));
  const message = field(event.data, "message");
  msg.append(document.createTextNode(message != null ? String(message) : JSON.stringify(event.data ?? {})));
  msg.title = message != null ? String(message) : "";
  li.append(msg);
  return li;
}

/**
 * @param {HubEvent[]} events
 * @param {boolean} [replace]
 */
function renderLogs(events, replace = false) {
  const list = $("logs");
  if (replace) list.replaceChildren();
  const fragment = document.createDocumentFragment();
  for (const event of events.filter(logVisible).slice(-MAX_LOGS).reverse()) {
    fragment.append(logRow(event));
  }
  list.prepend(fragment);
  while (list.childElementCount > MAX_LOGS) list.lastElementChild?.remove();
  $("logs-empty").hidden = list.childElementCount > 0;
}

/**
 * @typedef {object} NoticeOptions
 * @property {"connection" | "reset" | "setup"} kind  what it is about: a connection's notice goes
 *   when the stream opens again; the others stay until dismissed
 * @property {string} [title]  details for the tooltip (ids and such)
 * @property {string} [actionLabel]
 * @property {() => void} [action]
 * @property {boolean} [bad]
 */

/**
 * A banner under the top bar, with a Dismiss button (and an action, if given).
 * @param {string} text
 * @param {NoticeOptions} options
 */
function showNotice(text, { kind, title, actionLabel, action, bad = false }) {
  const box = $("notice");
  const message = el("span", "text", text);
  if (title) message.title = title;
  const buttons = el("span", "actions");
  if (actionLabel && action) {
    const button = el("button", "", actionLabel);
    button.type = "button";
    button.addEventListener("click", () => {
      hideNotice();
      action();
    });
    buttons.append(button);
  }
  const dismiss = el("button", "dismiss");
  dismiss.type = "button";
  dismiss.title = "Dismiss";
  dismiss.setAttribute("aria-label", "Dismiss");
  dismiss.append(el("span", "", "×"));
  dismiss.firstElementChild?.setAttribute("aria-hidden", "true");
  dismiss.addEventListener("click", hideNotice);
  buttons.append(dismiss);
  box.replaceChildren(message, buttons);
  box.classList.toggle("bad", bad);
  box.dataset.kind = kind;
  state.notice = kind;
  box.hidden = false;
}

function hideNotice() {
  const box = $("notice");
  // A control inside that had the focus goes with it: the focus moves to the page, not lost.
  const hadFocus = box.contains(document.activeElement);
  box.hidden = true;
  box.removeAttribute("data-kind");
  state.notice = null;
  if (hadFocus) $("main").focus({ preventScroll: true });
}

// ---- publishing ---------------------------------------------------------------------------

/**
 * @param {unknown} body
 * @returns {Promise<{ids?: string[]}>}
 */
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

/**
 * The event a publish button sends: a fitting payload for the types this page knows, the
 * form's user and message for any other.
 * @param {EventType} kind
 */
function eventFor(kind) {
  const user = $as("pub-user", HTMLSelectElement).value;
  const message = $as("pub-message", HTMLInputElement).value;
  const type = kind.type;
  switch (kind.name) {
    case "login":
      return { type, user, data: { ip: "203.0.113.7", agent: "demo page" } };
    case "payment": {
      const amount = Number($as("pub-amount", HTMLInputElement).value || 0);
      return { type, user, data: { amount, currency: "EUR", ref: randomRef() } };
    }
    case "logout":
      return { type, user, data: {} };
    case "log": {
      const level = $as("pub-level", HTMLSelectElement).value;
      return { type, data: { level, service: "demo-page", message } };
    }
    case "broadcast": // for everyone: no user
      return { type, data: { message } };
    default:
      return { type, user, data: { message } };
  }
}

/** @param {unknown} e */
function messageOf(e) {
  return e instanceof Error ? e.message : String(e);
}

function randomRef() {
  return "pay_" + Math.random().toString(36).slice(2, 10);
}

/**
 * A broadcast to the named topic of the "Topic" field: only the streams on it get it.
 * @param {string} topic
 */
async function publishToTopic(topic) {
  const result = $("pub-result");
  const kind = state.types.find((t) => t.name === "broadcast");
  const message = $as("pub-message", HTMLInputElement).value;
  try {
    const type = kind ? kind.type : "broadcast";
    const answer = await publish({ type, topics: [topic], data: { message } });
    result.classList.remove("bad");
    result.textContent = `202 broadcast to ${topic} → id ${answer.ids && answer.ids[0]}`;
  } catch (e) {
    result.classList.add("bad");
    result.textContent = `broadcast to ${topic} failed: ${messageOf(e)}`;
  }
}

/** @param {EventType} kind */
async function publishOne(kind) {
  const result = $("pub-result");
  try {
    const t0 = performance.now();
    const answer = await publish(eventFor(kind));
    const ms = (performance.now() - t0).toFixed(1);
    result.classList.remove("bad");
    result.textContent = `202 ${kind.name} → id ${answer.ids && answer.ids[0]} (${ms} ms)`;
  } catch (e) {
    result.classList.add("bad");
    result.textContent = `${kind.name} failed: ${messageOf(e)}`;
  }
}

async function burst() {
  const button = $as("burst", HTMLButtonElement);
  const out = $("burst-result");
  button.disabled = true;
  const tag = "b" + Date.now().toString(36);
  const events = [];
  for (let i = 0; i < BURST_SIZE; i += 1) {
    events.push({
      type: "payment",
      user: USERS[i % USERS.length],
      data: { amount: Math.round(Math.random() * 50000) / 100, currency: "EUR", burst: tag, seq: i + 1 },
    });
  }
  /** @type {Burst} */
  const run = { tag, seen: 0, t0: performance.now(), accepted: null, done: null };
  state.burst = run;
  out.textContent = `Sending ${BURST_SIZE.toLocaleString("en-US")} events…`;
  try {
    await publish(events);
    run.accepted = performance.now() - run.t0;
    renderBurst();
  } catch (e) {
    out.textContent = `Burst failed: ${messageOf(e)}`;
    state.burst = null;
  } finally {
    button.disabled = false;
  }
}

/** @param {HubEvent} event */
function trackBurst(event) {
  const b = state.burst;
  if (!b || field(event.data, "burst") !== b.tag) return;
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

// ---- named topics -------------------------------------------------------------------------

/**
 * Join the named topic(s) of the join field: the hub reads the names (a name outside its
 * alphabet is refused, and the page says why) and signs a token granting them; the page's
 * stream then opens again with them.
 * @param {string} text
 */
async function joinTopic(text) {
  const out = $("join-result");
  const name = text.trim();
  if (!name || !state.user) return;
  const user = state.user;
  let granted;
  try {
    // The hub's reading of the names (each once, in order) is the list the page keeps.
    const answer = await demoAnswer({ user, topics: [...streamTopics(), name].join(",") });
    granted = answer.topics ?? [];
  } catch (e) {
    out.classList.add("bad");
    out.textContent = `Could not join "${name}": ${messageOf(e)}`;
    return;
  }
  const joined = granted.filter((t) => !TOPICS.includes(t));
  out.classList.remove("bad");
  if (joined.length === state.joined.length) {
    out.textContent = `This page's stream has ${name} already.`;
    return;
  }
  state.joined = joined;
  out.textContent = `Joined ${name}: this page's stream includes it.`;
  $as("join-topic", HTMLInputElement).value = "";
  renderJoined();
  signIn(user);
}

/** @param {string} topic */
function leaveTopic(topic) {
  state.joined = state.joined.filter((t) => t !== topic);
  $("join-result").textContent = `Left ${topic}.`;
  renderJoined();
  if (state.user) signIn(state.user);
}

/** The joined topics, each with a button that leaves it. */
function renderJoined() {
  $("joined").replaceChildren(...state.joined.map((topic) => {
    const chip = el("span", "topic", topic);
    chip.dataset.topic = topic;
    const leave = el("button", "leave", "×");
    leave.type = "button";
    leave.title = `Leave ${topic}`;
    leave.setAttribute("aria-label", `Leave ${topic}`);
    leave.addEventListener("click", () => leaveTopic(topic));
    chip.append(leave);
    return chip;
  }));
}

// ---- wiring -------------------------------------------------------------------------------

/**
 * @param {string} id
 * @param {string[]} values
 * @param {string} selected
 */
function fillSelect(id, values, selected) {
  $as(id, HTMLSelectElement).replaceChildren(...values.map((v) => {
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

/**
 * The empty table's hint when the page has no stream (and no publish panel).
 * @param {boolean} demoOff
 * @returns {Node[]}
 */
function noStreamHint(demoOff) {
  if (!demoOff) return [document.createTextNode("No stream: the page could not sign in.")];
  const text = (/** @type {string} */ t) => document.createTextNode(t);
  return [
    text("No stream: this page signs in only in demo mode ("),
    el("code", "", "hub --demo"),
    text("). Without it, publish with "),
    el("code", "", "hub publish"),
    text(" or "),
    el("code", "", "POST /publish"),
    text(" and a token from "),
    el("code", "", "hub token --sub NAME --publish"),
    text(" (README: First steps)."),
  ];
}

async function main() {
  const initial = new URLSearchParams(location.search).get("user") ||
    localStorage.getItem("hub-demo-user") || "alice";
  fillSelect("user", USERS.includes(initial) ? USERS : [...USERS, initial], initial);
  fillSelect("pub-user", USERS, initial);
  fillSelect("pub-level", LEVELS, "info");
  setupLevels();
  const userSelect = $as("user", HTMLSelectElement);
  userSelect.addEventListener("change", () => signIn(userSelect.value));
  const showLogs = $as("show-logs", HTMLInputElement);
  showLogs.addEventListener("change", () => (state.showLogs = showLogs.checked));
  $("clear").addEventListener("click", () => {
    $("events").replaceChildren();
    $("events-empty").hidden = false;
    state.listed = 0;
    state.unlisted = 0;
    for (const type of state.counts.keys()) state.counts.set(type, 0);
    state.unlistedByType.clear();
    renderCounters(false);
  });
  $("burst").addEventListener("click", burst);
  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    joinTopic($as("join-topic", HTMLInputElement).value);
  });
  $("publish-topic").addEventListener("click", () => {
    publishToTopic($as("pub-topic", HTMLInputElement).value.trim());
  });

  // The same table hub.js listens by; an older hub without GET /types gets the built-in one.
  state.types = await fetchTypes("/events").catch(() => FALLBACK_TYPES);
  for (const type of state.types) addCounter(type);
  addPublishButtons();

  try {
    await demoToken({ user: initial, topics: TOPICS.join(",") });
  } catch (e) {
    const text = e instanceof DemoOff
      ? "Demo mode is off: start the hub with --demo to sign in as a demo user."
      : `Could not get a demo token: ${messageOf(e)}`;
    showNotice(text, { kind: "setup", bad: true });
    $("conn").dataset.status = "closed";
    $("status").textContent = STATUS_TEXT.closed;
    $("publisher").hidden = true;
    $("join-form").hidden = true;
    $("events-empty").replaceChildren(...noStreamHint(e instanceof DemoOff));
    return;
  }
  state.demo = true;
  signIn(initial);
}

/** @type {any} */ (window).hubDemo = { state };
main();
