// hub.js: a small, dependency-free client for the hub's SSE stream (ES modules, no build step).
//
//   import { connect } from "/static/hub.js";
//   const hub = connect({ url: "/events", topics: ["payments"], token: () => fetchToken() });
//   hub.on("payment", (e) => console.log(e.id, e.user, e.data));
//   hub.onStatus((status) => console.log(status)); // connecting, open, reconnecting, closed
//   hub.close();
//
// One connection for all tabs of an origin: the tabs that connect with the same key (by default
// the url, topics and params) elect a leader (hub/election.js). Only the leader holds an
// EventSource (hub/source.js), listening for every type the hub lists at GET /types; it relays
// every event to the other tabs over a BroadcastChannel (hub/relay.js). When the leader tab
// goes away another tab takes over and resumes from the last event id it has seen. Every tab
// delivers an event id at most once, so a handover, a replay or a stale leader never doubles
// an event. A follower believes only what the current leader signed (hub/relay.js): another
// script of the origin posting on the channel moves nothing. When the hub ends the stream for
// good (its end frame says `reconnect: false`, e.g. a logout; a refused token or topic), every
// tab closes with the reason; when one of them connects again with the same key (signs in
// again), the others follow it rather than staying closed (unless they called close()).

import { elect } from "./hub/election.js";
import { Dedupe, Relay } from "./hub/relay.js";
import { Source } from "./hub/source.js";
import { report } from "./hub/util.js";

export { FALLBACK_TYPES, fetchTypes } from "./hub/types.js";
export { tokenClaims } from "./hub/util.js";

export const STATUSES = Object.freeze(["connecting", "open", "reconnecting", "closed"]);

const RESET = "reset";

/**
 * This page's handles that the hub closed for good (not by close()): each follows the next
 * connect() of its key in another tab. A new connect() in this page supersedes them instead, so
 * that a page that signs in again without close() does not end up with two live handles.
 * @type {Set<HubConnection>}
 */
const failed = new Set();

/** @typedef {import("./hub/relay.js").Status} Status */
/** @typedef {import("./hub/relay.js").Relayed} Relayed */
/** @typedef {import("./hub/relay.js").Handlers} Handlers */
/** @typedef {import("./hub/election.js").Election} Election */
/** @typedef {import("./hub/types.js").EventType} EventType */
/** @typedef {"leader" | "follower"} Role */

/**
 * An event as listeners get it. For the hub's events `type`, `user`, `ts` and `data` come from
 * the event's JSON; for anything else `data` is the raw data and the others are null.
 * @typedef {object} HubEvent
 * @property {string | null} id
 * @property {string} name
 * @property {number | null} type
 * @property {string | null} user
 * @property {number | null} ts
 * @property {unknown} data
 * @property {string[] | null} topics  the topics its publisher named (`"topics"` in its JSON),
 *   null when it named none
 * @property {boolean} [backwards]  on a reset only: true when its id is of the same epoch as
 *   the last event id and older (an older hub, a buggy node, a proxy). Refetch state as for
 *   any reset; the last event id stays where it was (a reconnect resumes from there), and the
 *   events up to it that come again are dropped as duplicates.
 */

/**
 * `error`: why the stream closed; `code`: the code of the hub's end frame when the hub ended it
 * on the stream (4003: logout), null otherwise.
 * @typedef {{role: Role | null, error: string | null, code: number | null}} StatusInfo
 * @typedef {(status: Status, info: StatusInfo) => void} StatusListener
 */

/**
 * @typedef {object} Options
 * @property {string | URL} [url]  the stream endpoint, default "/events"
 * @property {string[]} [topics]  topic names, sent as ?topic=a&topic=b (URL-encoded: any name
 *   of the hub's alphabet, `org:42`, `a/b`, `x@y`). A name the hub refuses (400) or the token
 *   does not grant (403) closes the stream with the hub's reason
 * @property {import("./hub/source.js").TokenSource} [token]  a string, or a function returning a
 *   token or a promise of one; a function is asked again when the hub answers 401 or the
 *   token's exp has passed
 * @property {string | URL} [ticketUrl]  the hub's ticket endpoint (e.g. "/tickets"): each
 *   stream then opens with a one-time ticket bought with the token just before (POST, token in
 *   the Authorization header), so the token never sits in a URL. Recommended in browsers.
 * @property {Record<string, unknown>} [params]  extra query parameters, e.g. {level: "warning"}
 * @property {string[]} [events]  extra event names to listen for (the hub's types, as GET /types
 *   lists them, are always included)
 * @property {string | null} [lastEventId]  resume after this id (say, one kept in sessionStorage)
 * @property {(event: HubEvent) => void} [onReset]  called with the reset event when the hub's
 *   history no longer reaches back to the last id: the page should refetch its state. Its
 *   `backwards` is true when its id is older than the last id (which then stays)
 * @property {boolean} [share]  false: this tab holds its own connection (default true: one per
 *   origin and key)
 * @property {string} [key]  tabs with the same key share one connection; default url + topics +
 *   params. Tabs that may see different events (other users) need other keys.
 * @property {{base?: number, max?: number}} [backoff]  ms, for the retries EventSource does not
 *   do itself; default {base: 500, max: 30000}
 * @property {boolean} [withCredentials]  send cookies to a hub on another origin
 */

/**
 * Open (or join) a stream of the hub.
 * @param {Options} [options]
 */
export function connect(options = {}) {
  return new HubConnection(options);
}

class HubConnection {
  /** @param {Options} options */
  constructor(options) {
    const base = typeof location !== "undefined" ? location.href : undefined;
    const url = new URL(options.url || "/events", base);
    const topics = [...(options.topics || [])];
    const params = { ...(options.params || {}) };
    this._onReset = options.onReset || null;

    /** @type {Map<string, Set<(event: HubEvent) => void>>} event name or "*" -> listeners */
    this._listeners = new Map();
    /** @type {Set<StatusListener>} */
    this._statusListeners = new Set();
    /** @type {Status} */
    this._status = "connecting";
    /** @type {string | null} */
    this._error = null;
    /** @type {number | null} */
    this._code = null;
    /** @type {Role | null} */
    this._role = null;
    this._closed = false;
    /** closed by the hub for good (see `failed`) */
    this._failed = false;
    this._everOpen = false;
    /** @type {{status: Status, error: string | null, code: number | null, role: Role | null} | null} */
    this._notified = null;
    this._dedupe = new Dedupe(options.lastEventId || null);

    this._source = new Source(
      {
        url,
        topics,
        params,
        token: options.token ?? null,
        ticketUrl: options.ticketUrl ? new URL(options.ticketUrl, base) : null,
        events: [...(options.events || [])],
        backoff: { base: 500, max: 30000, ...(options.backoff || {}) },
        withCredentials: !!options.withCredentials,
      },
      {
        lastId: () => this._dedupe.lastId,
        status: (status) => {
          if (status === "open") this._everOpen = true;
          this._setStatus(status === "trying" ? this._pending() : status);
        },
        event: (name, id, data) => this._fromServer(name, id, data),
        fail: (error, code) => this._fail(error, code),
      },
    );

    const key =
      options.key || [url.href, [...topics].sort().join(","), JSON.stringify(params)].join("|");
    this._channelName = "hubjs:" + key;
    for (const old of failed) if (old._channelName === this._channelName) old.close();
    /** @type {Relay | null} */
    this._relay = null;
    /** @type {Election | null} */
    this._election = null;
    // Sharing needs a way to verify the leader: WebCrypto, which insecure origins (http: other
    // than localhost) lack. Without it every tab keeps its own connection.
    const canVerify = typeof crypto !== "undefined" && !!crypto.subtle;
    if (options.share !== false && typeof BroadcastChannel === "function" && canVerify) {
      this._relay = new Relay(this._channelName, this._channelHandlers(), {
        announce: (keyId) => (this._election ? this._election.announce(keyId) : Promise.resolve()),
        leaderKeys: () => (this._election ? this._election.leaderKeys() : Promise.resolve([])),
      });
      this._elect();
      if (!this._election) this._letGo(); // no election: no leader to believe
    }
    // Nothing to share or elect with: this tab keeps its own connection.
    if (!this._election) this._becomeLeader();
  }

  _elect() {
    this._election = elect(this._channelName, {
      lead: () => this._becomeLeader(),
      follow: () => this._becomeFollower(),
      leaving: () => this._relay?.resignNow(),
    });
  }

  // ---- public API -------------------------------------------------------------------------

  /**
   * Listen for events named `name` ("*" for every event); returns a function that stops.
   * @param {string} name
   * @param {(event: HubEvent) => void} fn
   */
  on(name, fn) {
    let listeners = this._listeners.get(name);
    if (!listeners) this._listeners.set(name, (listeners = new Set()));
    listeners.add(fn);
    return () => {
      this._listeners.get(name)?.delete(fn);
    };
  }

  /**
   * fn(status, {role, error}) now and on every change; returns a function that stops.
   * @param {StatusListener} fn
   */
  onStatus(fn) {
    this._statusListeners.add(fn);
    try {
      fn(this._status, { role: this._role, error: this._error, code: this._code });
    } catch (e) {
      report(e);
    }
    return () => {
      this._statusListeners.delete(fn);
    };
  }

  get status() {
    return this._status;
  }

  /** "leader" (this tab holds the connection), "follower", or null before the election. */
  get role() {
    return this._role;
  }

  get lastEventId() {
    return this._dedupe.lastId;
  }

  close() {
    failed.delete(this);
    this._failed = false;
    this._shutdown(null);
    this._letGo();
  }

  // ---- roles --------------------------------------------------------------------------------

  _pending() {
    return this._everOpen ? "reconnecting" : "connecting";
  }

  _becomeFollower() {
    this._source.stop(); // a leader that lost its lease steps down
    this._role = "follower";
    this._relay?.follow();
    this._setStatus(this._pending(), null, false);
    this._post({ t: "hello" });
  }

  _becomeLeader() {
    if (this._closed) return;
    this._role = "leader";
    this._relay?.lead();
    this._source.start();
  }

  /**
   * End this handle. A leader that ends normally tells the others to take over at once. One
   * that the hub ended (`error`) keeps its channel, to follow a new connect() in another tab.
   * @param {string | null} error
   * @param {number | null} code
   */
  _shutdown(error, code = null) {
    if (this._closed) return;
    if (this._role === "leader" && this._relay && error === null) this._post({ t: "resign" });
    this._closed = true;
    this._source.stop();
    if (this._election) this._election.stop();
    if (error === null) this._letGo();
    else {
      if (this._role !== "leader" && this._election) this._election.release();
      if (this._relay) {
        this._failed = true;
        failed.add(this);
      }
    }
    this._setStatus("closed", error, false, code);
  }

  /**
   * Another tab connected with this key after the hub ended the stream (it signed in again):
   * take part again, as a new connect() would, with a fresh token from the token function.
   */
  _rejoin() {
    failed.delete(this);
    this._failed = false;
    if (this._election) this._election.release(); // a failed leader's lock goes to the newcomer
    this._closed = false;
    this._everOpen = false;
    this._role = null;
    this._source.forgetToken();
    this._elect();
  }

  /** Release the election and the channel. */
  _letGo() {
    if (this._election) this._election.release();
    if (this._relay) this._relay.close();
    this._relay = null;
  }

  /**
   * The hub will not take this stream back (its end frame said so, or it refused the token or
   * a topic): every tab that shares it closes with the reason. This tab keeps the lock until a
   * new connect() (in any tab) says hello, so that no follower takes over and signs in again
   * meanwhile.
   * @param {string} error
   * @param {number | null} code
   */
  _fail(error, code) {
    this._post({ t: "status", status: "closed", error, code, final: true });
    this._shutdown(error, code);
  }

  // ---- events -------------------------------------------------------------------------------

  /**
   * @param {string} name
   * @param {string | null} id
   * @param {string} data
   */
  _fromServer(name, id, data) {
    /** @type {Relayed} */
    const msg = { id, name, data };
    if (name === RESET) msg.reset = true; // always delivered; its id is where replay resumes
    const verdict = this._accept(msg);
    if (verdict === "duplicate") return;
    this._post({ t: "event", ...msg });
    this._deliver(msg, verdict === "backwards");
  }

  /**
   * Whether this tab delivers the event: the events it has are dropped, and a reset older than
   * its last id (of the same epoch) is delivered marked `backwards`, the last id kept.
   * @param {Relayed} msg
   */
  _accept(msg) {
    const last = this._dedupe.lastId;
    const verdict = this._dedupe.accept(msg);
    if (verdict === "backwards") {
      console.warn(
        `hub.js: a reset to ${msg.id}, older than the last event id ${last} (same epoch): ` +
          "the last event id stays, and the events up to it that come again are dropped",
      );
    }
    return verdict;
  }

  /**
   * @param {Relayed} msg
   * @param {boolean} backwards  a reset older than the last id
   */
  _deliver(msg, backwards = false) {
    /** @type {any} */
    let body;
    try {
      body = JSON.parse(msg.data);
    } catch {
      body = msg.data;
    }
    const isHubEvent = body && typeof body === "object" && "type" in body && "data" in body;
    /** @type {HubEvent} */
    const event = isHubEvent
      ? {
          id: msg.id,
          name: msg.name,
          type: body.type,
          user: body.user ?? null,
          ts: body.ts,
          data: body.data,
          topics: Array.isArray(body.topics) ? body.topics : null,
        }
      : { id: msg.id, name: msg.name, type: null, user: null, ts: null, data: body, topics: null };
    if (msg.reset) event.backwards = backwards;
    if (msg.name === RESET && this._onReset) this._call(this._onReset, event);
    for (const fn of this._listeners.get(msg.name) || []) this._call(fn, event);
    for (const fn of this._listeners.get("*") || []) this._call(fn, event);
  }

  /**
   * @param {(event: HubEvent) => void} fn
   * @param {HubEvent} event
   */
  _call(fn, event) {
    try {
      fn(event);
    } catch (e) {
      report(e);
    }
  }

  // ---- between tabs -------------------------------------------------------------------------

  /** @param {import("./hub/relay.js").Message} message */
  _post(message) {
    if (this._relay && !this._closed) this._relay.post(message);
  }

  /** @returns {Handlers} what this tab does with each kind of message from the others */
  _channelHandlers() {
    return {
      hello: () => {
        if (this._failed) this._rejoin(); // a new connect() elsewhere: follow its sign-in
        else if (this._closed) this._letGo();
        else if (this._role === "leader") {
          this._post({ t: "status", status: this._status, error: this._error });
        }
      },
      event: (m) => {
        // The relay passes only what the current leader signed: its ids came from its stream.
        if (this._closed || this._role !== "follower") return;
        const verdict = this._accept(m);
        if (verdict !== "duplicate") this._deliver(m, verdict === "backwards");
      },
      status: (m) => {
        if (this._closed || this._role !== "follower") return;
        if (m.final) this._shutdown(m.error || "closed", m.code ?? null);
        else {
          if (m.status === "open") this._everOpen = true;
          this._setStatus(m.status, m.error || null, false);
        }
      },
      resign: () => {
        if (this._closed || this._role !== "follower") return;
        this._setStatus("reconnecting", null, false);
        if (this._election) this._election.claim();
      },
    };
  }

  /**
   * @param {Status} status
   * @param {string | null} error
   * @param {boolean} broadcast  a leader tells the followers
   * @param {number | null} code  the end frame's code, when the hub ended the stream
   */
  _setStatus(status, error = null, broadcast = true, code = null) {
    const seen = this._notified;
    this._status = status;
    this._error = error;
    this._code = code;
    if (broadcast && this._role === "leader") this._post({ t: "status", status, error });
    if (
      seen &&
      seen.status === status &&
      seen.error === error &&
      seen.code === code &&
      seen.role === this._role
    ) {
      return;
    }
    this._notified = { status, error, code, role: this._role };
    const info = { role: this._role, error, code };
    for (const fn of this._statusListeners) {
      try {
        fn(status, info);
      } catch (e) {
        report(e);
      }
    }
  }
}
