// hub.js: a small, dependency-free client for the hub's SSE stream (ES module, no build step).
//
//   import { connect } from "/static/hub.js";
//   const hub = connect({ url: "/events", topics: ["payments"], token: () => fetchToken() });
//   hub.on("payment", (e) => console.log(e.id, e.user, e.data));
//   hub.onStatus((status) => console.log(status)); // connecting, open, reconnecting, closed
//   hub.close();
//
// One connection for all tabs of an origin: the tabs that connect with the same key (by default
// the url, topics and params) elect a leader with the Web Locks API (a localStorage lease where
// it is missing). Only the leader holds an EventSource; it relays every event to the other tabs
// over a BroadcastChannel. When the leader tab goes away another tab takes the lock and resumes
// from the last event id it has seen. Every tab delivers an event id at most once, so a
// handover, a replay or a stale leader never doubles an event.

export const EVENT_NAMES = Object.freeze(["login", "payment", "logout", "log", "broadcast"]);
export const STATUSES = Object.freeze(["connecting", "open", "reconnecting", "closed"]);

const RESET = "reset";
const LEASE_MS = 5000; // fallback election: a leader's lease lasts this long ...
const LEASE_TICK_MS = 1000; // ... and is renewed (or checked by followers) this often
const PROBE_TIMEOUT_MS = 5000;
const RECENT_IDS = 2048; // ids that do not sort (not "<ms>-<seq>") are deduplicated by a set

/**
 * Open (or join) a stream of the hub.
 *
 * options.url       the stream endpoint, default "/events"
 * options.topics    topic names (array), sent as ?topic=a&topic=b
 * options.token     a string, or a function returning a token or a promise of one; a function
 *                   is asked again when the hub answers 401 or the token's exp has passed
 * options.params    extra query parameters, e.g. {level: "warning"}
 * options.events    extra event names to listen for (the hub's names are always included)
 * options.lastEventId  resume after this id (say, one kept in sessionStorage across reloads)
 * options.onReset   called with the reset event when the hub's history no longer reaches back
 *                   to the last id: the page should refetch its state
 * options.share     false: this tab holds its own connection (default true: one per origin)
 * options.key       tabs with the same key share one connection; default url + topics +
 *                   params. Tabs that may see different events (other users) need other keys.
 * options.backoff   {base: 500, max: 30000} ms, for the retries EventSource does not do itself
 * options.withCredentials  send cookies to a hub on another origin (EventSource's option)
 * options.closeOnLogout  default true: a logout event for this token's user (and session, if
 *                   the logout names one) closes the stream instead of reconnecting
 */
export function connect(options = {}) {
  return new HubConnection(options);
}

function randomId() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

function report(error) {
  if (typeof reportError === "function") reportError(error);
  else setTimeout(() => { throw error; });
}

/** The claims of a JWT, without verifying it (the hub does that); null if it is not one. */
export function tokenClaims(token) {
  if (typeof token !== "string") return null;
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, "="));
    return JSON.parse(json);
  } catch {
    return null;
  }
}

/** "<ms>-<seq>" -> [ms, seq]: the hub's ids (and Redis stream ids) sort by these numbers. */
function parseId(id) {
  const m = /^(\d+)-(\d+)$/.exec(id);
  return m ? [Number(m[1]), Number(m[2])] : null;
}

class HubConnection {
  constructor(options) {
    const base = typeof location !== "undefined" ? location.href : undefined;
    this._url = new URL(options.url || "/events", base);
    this._topics = [...(options.topics || [])];
    this._params = { ...(options.params || {}) };
    this._tokenSource = options.token ?? null;
    this._onReset = options.onReset || null;
    this._closeOnLogout = options.closeOnLogout !== false;
    this._withCredentials = !!options.withCredentials;
    this._backoff = { base: 500, max: 30000, ...(options.backoff || {}) };
    this._names = [...new Set([...EVENT_NAMES, RESET, "message", ...(options.events || [])])];

    this._listeners = new Map(); // event name or "*" -> Set of functions
    this._statusListeners = new Set();
    this._status = "connecting";
    this._error = null;
    this._role = null; // "leader" | "follower"
    this._closed = false;
    this._everOpen = false;

    this._lastId = options.lastEventId || null; // the newest id delivered by this tab
    this._lastKey = this._lastId ? parseId(this._lastId) : null;
    this._recent = new Set();

    this._es = null;
    this._token = null;
    this._attempt = 0;
    this._retryTimer = null;
    this._releaseLock = null;
    this._lockAbort = null;
    this._leaseTimer = null;
    this._onPageHide = null;
    this._leaseTick = null;
    this._notified = null;

    const key =
      options.key ||
      [this._url.href, [...this._topics].sort().join(","), JSON.stringify(this._params)].join("|");
    this._channelName = "hubjs:" + key;
    this._channel = null;
    const canShare = options.share !== false && typeof BroadcastChannel === "function";
    if (canShare) {
      this._channel = new BroadcastChannel(this._channelName);
      this._channel.onmessage = (m) => this._onChannel(m.data);
    }
    if (!canShare) this._becomeLeader();
    else if (typeof navigator !== "undefined" && navigator.locks && navigator.locks.request) {
      this._electWithLocks();
    } else if (hasLocalStorage()) {
      this._electWithLease();
    } else {
      this._becomeLeader(); // nothing to elect with: this tab keeps its own connection
    }
  }

  // ---- public API -------------------------------------------------------------------------

  /** Listen for events named `name` ("*" for every event); returns a function that stops. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this._listeners.get(name)?.delete(fn);
  }

  /** fn(status, {role, error}) now and on every change; returns a function that stops. */
  onStatus(fn) {
    this._statusListeners.add(fn);
    try {
      fn(this._status, { role: this._role, error: this._error });
    } catch (e) {
      report(e);
    }
    return () => this._statusListeners.delete(fn);
  }

  get status() {
    return this._status;
  }

  /** "leader" (this tab holds the connection), "follower", or null before the election. */
  get role() {
    return this._role;
  }

  get lastEventId() {
    return this._lastId;
  }

  close() {
    this._shutdown(null);
    this._letGo();
  }

  /** End this handle. A leader that ends normally tells the others to take over at once. */
  _shutdown(error) {
    if (this._closed) return;
    if (this._role === "leader" && this._channel) {
      if (error === null) this._post({ t: "resign" });
      if (this._leaseTimer) writeLease(this._leaseKey(), null);
    }
    this._closed = true;
    this._stopStream();
    if (this._leaseTimer) clearInterval(this._leaseTimer);
    if (this._onPageHide) removeEventListener("pagehide", this._onPageHide);
    if (this._lockAbort) this._lockAbort.abort();
    if (this._role !== "leader" || error === null) this._letGo();
    this._setStatus("closed", error, false);
  }

  /** Release the lock and the channel. */
  _letGo() {
    if (this._releaseLock) this._releaseLock();
    this._releaseLock = null;
    if (this._channel) this._channel.close();
    this._channel = null;
  }

  /** The hub will not take this stream back (logout, refused token or topic): every tab that
   * shares it closes with the reason. This tab keeps the lock until a new connect() (in any
   * tab) says hello, so that no follower takes over and signs in again meanwhile. */
  _fail(error) {
    this._post({ t: "status", status: "closed", error, final: true });
    this._shutdown(error);
  }

  // ---- election -------------------------------------------------------------------------

  _electWithLocks() {
    this._lockAbort = new AbortController();
    navigator.locks
      .request(this._channelName, { signal: this._lockAbort.signal }, () => {
        if (this._closed) return undefined;
        this._lockAbort = null;
        this._becomeLeader();
        // Hold the lock until close() or the end of the page.
        return new Promise((resolve) => (this._releaseLock = resolve));
      })
      .catch((e) => {
        if (e.name !== "AbortError") report(e);
      });
    this._becomeFollower();
  }

  _leaseKey() {
    return "hubjs-lease:" + this._channelName;
  }

  // Fallback where Web Locks are missing: a lease in localStorage, renewed by the leader every
  // second, claimed by a follower when it has lapsed, confirmed one tick later (last writer
  // wins). A closing leader clears it and says "resign" so that a follower claims at once.
  _electWithLease() {
    const me = randomId();
    const key = this._leaseKey();
    let claimed = false;
    const tick = () => {
      if (this._closed) return;
      const now = Date.now();
      const lease = readLease(key);
      if (this._role === "leader") {
        if (lease && lease.id !== me && lease.exp > now) this._stepDown();
        else writeLease(key, { id: me, exp: now + LEASE_MS });
      } else if (claimed && lease && lease.id === me) {
        claimed = false;
        writeLease(key, { id: me, exp: now + LEASE_MS });
        this._becomeLeader();
      } else if (!lease || lease.exp <= now) {
        claimed = true;
        writeLease(key, { id: me, exp: now + LEASE_MS });
      } else {
        claimed = false;
      }
    };
    this._leaseTick = tick;
    this._leaseTimer = setInterval(tick, LEASE_TICK_MS);
    this._onPageHide = () => {
      if (this._role === "leader") {
        writeLease(key, null);
        this._post({ t: "resign" });
      }
    };
    addEventListener("pagehide", this._onPageHide);
    this._becomeFollower();
    tick();
  }

  _becomeFollower() {
    this._role = "follower";
    this._setStatus(this._everOpen ? "reconnecting" : "connecting", null, false);
    this._post({ t: "hello" });
  }

  _becomeLeader() {
    if (this._closed) return;
    this._role = "leader";
    this._attempt = 0;
    this._open();
  }

  _stepDown() {
    this._stopStream();
    this._becomeFollower();
  }

  // ---- the leader's stream ------------------------------------------------------------------

  async _getToken(fresh) {
    const src = this._tokenSource;
    if (src == null) return null;
    if (typeof src !== "function") return (this._token = src);
    if (fresh || this._token == null || this._tokenExpired()) this._token = await src();
    return this._token;
  }

  _tokenExpired() {
    const claims = tokenClaims(this._token);
    return !!(claims && typeof claims.exp === "number" && claims.exp * 1000 <= Date.now() + 1000);
  }

  _streamUrl(token) {
    const u = new URL(this._url);
    for (const t of this._topics) u.searchParams.append("topic", t);
    for (const [k, v] of Object.entries(this._params)) {
      for (const one of Array.isArray(v) ? v : [v]) u.searchParams.append(k, String(one));
    }
    if (token) u.searchParams.set("token", token);
    if (this._lastId) u.searchParams.set("lastEventId", this._lastId);
    return u;
  }

  async _open(freshToken = false) {
    if (this._closed || this._role !== "leader") return;
    this._setStatus(this._everOpen ? "reconnecting" : "connecting");
    let token;
    try {
      token = await this._getToken(freshToken);
    } catch (e) {
      report(e);
      this._retryLater();
      return;
    }
    if (this._closed || this._role !== "leader") return;
    const url = this._streamUrl(token);
    const es = new EventSource(url, { withCredentials: this._withCredentials });
    this._es = es;
    es.onopen = () => {
      if (es !== this._es) return;
      this._attempt = 0;
      this._everOpen = true;
      this._setStatus("open");
    };
    for (const name of this._names) {
      es.addEventListener(name, (ev) => {
        if (es === this._es) this._fromServer(name, ev);
      });
    }
    es.onerror = () => {
      if (es !== this._es) return;
      if (es.readyState === EventSource.CONNECTING) {
        // A network error: EventSource reconnects by itself, sending Last-Event-ID. Unless the
        // token has expired, in which case that attempt is bound to fail: start over instead.
        if (typeof this._tokenSource === "function" && this._tokenExpired()) {
          this._stopStream();
          this._open(true);
        } else {
          this._setStatus("reconnecting");
        }
        return;
      }
      // CLOSED: the hub answered with an error status and EventSource gave up. Find out why.
      this._stopStream();
      this._recover(url);
    };
  }

  async _recover(url) {
    if (typeof this._tokenSource === "function" && this._tokenExpired()) {
      this._retryLater(true);
      return;
    }
    const { status, detail } = await probe(url);
    if (this._closed || this._role !== "leader") return;
    if (status === 401 && typeof this._tokenSource === "function") {
      this._retryLater(true);
    } else if (status === 401 || status === 403 || status === 400 || status === 404) {
      this._fail(detail || `HTTP ${status}`); // asking again will not help
    } else {
      this._retryLater(false);
    }
  }

  /** Capped, jittered exponential backoff: base * 2^attempt, at most max, times 0.5-1. */
  _retryLater(freshToken = false) {
    if (this._closed) return;
    const { base, max } = this._backoff;
    const cap = Math.min(max, base * 2 ** Math.min(this._attempt, 30));
    const delay = this._attempt === 0 && freshToken ? 0 : cap / 2 + (Math.random() * cap) / 2;
    this._attempt += 1;
    this._setStatus(this._everOpen ? "reconnecting" : "connecting");
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(freshToken), delay);
  }

  _stopStream() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (this._es) {
      this._es.close();
      this._es = null;
    }
  }

  _fromServer(name, ev) {
    const msg = { id: ev.lastEventId || null, name, data: ev.data };
    if (name === RESET) msg.reset = true; // always delivered; its id is where replay resumes
    if (!this._accept(msg)) return;
    this._post({ t: "event", ...msg });
    this._deliver(msg);
    if (name === "logout" && this._closeOnLogout && this._isOwnLogout(msg.data)) {
      // The hub ends the stream after a logout; reconnecting would only sign in again.
      this._fail("logged out");
    }
  }

  _isOwnLogout(raw) {
    const claims = tokenClaims(this._token);
    if (!claims) return false;
    let event;
    try {
      event = JSON.parse(raw);
    } catch {
      return false;
    }
    const session = event && event.data && event.data.session;
    return event.user === claims.sub && (!session || session === claims.sid);
  }

  // ---- relaying and delivery ----------------------------------------------------------------

  _post(message) {
    if (this._channel && !this._closed) this._channel.postMessage(message);
  }

  _onChannel(m) {
    if (!m || typeof m !== "object") return;
    if (this._closed) {
      if (m.t === "hello") this._letGo(); // a failed leader makes way for a new connect()
      return;
    }
    if (m.t === "event") {
      if (this._accept(m)) this._deliver(m);
    } else if (m.t === "status") {
      if (this._role === "follower") {
        if (m.final) this._shutdown(m.error || "closed");
        else {
          if (m.status === "open") this._everOpen = true;
          this._setStatus(m.status, m.error || null, false);
        }
      }
    } else if (m.t === "hello") {
      if (this._role === "leader") {
        this._post({ t: "status", status: this._status, error: this._error });
      }
    } else if (m.t === "resign") {
      if (this._role === "follower") {
        this._setStatus("reconnecting", null, false);
        if (this._leaseTick) this._leaseTick();
      }
    }
  }

  /** True the first time this tab sees an event id (ids from one hub sort numerically). */
  _accept(msg) {
    const id = msg.id;
    if (!id) return true;
    const key = parseId(id);
    if (msg.reset) {
      // The hub says where its history resumes: take that as the last id, even if it is lower.
      this._lastId = id;
      this._lastKey = key;
      return true;
    }
    if (key) {
      const last = this._lastKey;
      if (last && (key[0] < last[0] || (key[0] === last[0] && key[1] <= last[1]))) return false;
      this._lastKey = key;
    } else {
      if (this._recent.has(id)) return false;
      this._recent.add(id);
      if (this._recent.size > RECENT_IDS) this._recent.delete(this._recent.values().next().value);
    }
    this._lastId = id;
    return true;
  }

  _deliver(msg) {
    let body;
    try {
      body = JSON.parse(msg.data);
    } catch {
      body = msg.data;
    }
    const isHubEvent = body && typeof body === "object" && "type" in body && "data" in body;
    const event = isHubEvent
      ? {
          id: msg.id,
          name: msg.name,
          type: body.type,
          user: body.user ?? null,
          ts: body.ts,
          data: body.data,
        }
      : { id: msg.id, name: msg.name, type: null, user: null, ts: null, data: body };
    if (msg.name === RESET && this._onReset) this._call(this._onReset, event);
    for (const fn of this._listeners.get(msg.name) || []) this._call(fn, event);
    for (const fn of this._listeners.get("*") || []) this._call(fn, event);
  }

  _call(fn, arg) {
    try {
      fn(arg);
    } catch (e) {
      report(e);
    }
  }

  _setStatus(status, error = null, broadcast = true) {
    const seen = this._notified;
    this._status = status;
    this._error = error;
    if (broadcast && this._role === "leader") this._post({ t: "status", status, error });
    if (seen && seen.status === status && seen.error === error && seen.role === this._role) return;
    this._notified = { status, error, role: this._role };
    const info = { role: this._role, error };
    for (const fn of this._statusListeners) {
      try {
        fn(status, info);
      } catch (e) {
        report(e);
      }
    }
  }
}

/** One request to the stream URL to learn why EventSource gave up: the status and the body. */
async function probe(url) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), PROBE_TIMEOUT_MS);
  try {
    const response = await fetch(url, { signal: abort.signal, cache: "no-store" });
    let detail = null;
    if (!response.ok) {
      const text = await response.text();
      try {
        const body = JSON.parse(text);
        detail = body.error || body.message || text;
      } catch {
        detail = text;
      }
    }
    return { status: response.status, detail };
  } catch {
    return { status: 0, detail: null };
  } finally {
    clearTimeout(timer);
    abort.abort(); // a 200 would be a live stream: end it at once
  }
}

function hasLocalStorage() {
  try {
    return typeof localStorage !== "undefined" && localStorage !== null;
  } catch {
    return false;
  }
}

function readLease(key) {
  try {
    return JSON.parse(localStorage.getItem(key));
  } catch {
    return null;
  }
}

function writeLease(key, lease) {
  try {
    if (lease) localStorage.setItem(key, JSON.stringify(lease));
    else localStorage.removeItem(key);
  } catch {
    // storage full or denied: the election degrades to every tab for itself
  }
}
