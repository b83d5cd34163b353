// The leader's EventSource: its token, the event names it listens for, and what happens when
// it fails (EventSource retries network errors itself; on a refusal, ask the hub why) or when
// the hub ends it. Every stream the hub ends closes with one `end` frame,
// {code, reason, reconnect, detail} and no id: `reconnect: false` stops for good, `true`
// reconnects (a fresh token for an expired one). A close without it is a network cut.
// EventSource's own reconnect sends the id of the last event it read; where the connection
// dropped that event (hub.js's last id stays when an event is a duplicate, or a reset goes
// backwards), a new EventSource resumes from hub.js's last id instead.
//
// With a ticket endpoint (`ticketUrl`), every EventSource opens with a one-time ticket that the
// token buys just before (POST, token in the Authorization header), so the token never sits in
// a URL. A ticket is good for one request: EventSource's own reconnect would present the spent
// one, so on any error this closes it and opens a new one, with a new ticket, after the backoff.

import { FALLBACK_TYPES, fetchTypes } from "./types.js";
import { report, tokenClaims } from "./util.js";

const PROBE_TIMEOUT_MS = 5000;
const TICKET_TIMEOUT_MS = 5000;

/** @typedef {string | null | undefined | (() => string | null | undefined | Promise<string | null | undefined>)} TokenSource */

/**
 * What the stream tells the connection.
 * @typedef {object} SourceHooks
 * @property {() => string | null} lastId  the id to resume after
 * @property {(status: "trying" | "reconnecting" | "open") => void} status
 *   "trying": not open, an attempt is on its way (connecting, or reconnecting once it was open)
 * @property {(name: string, id: string | null, data: string) => void} event
 * @property {(error: string, code: number | null) => void} fail  the hub will not take this
 *   stream back: why, and the end frame's code if the hub said so on the stream
 */

/**
 * The frame that ends a stream the hub ends; its name is the protocol's, not an event type.
 * @typedef {{code: number | null, reason: string, reconnect: boolean, detail: string | null}} End
 */
export const END = "end";
/** The end frame's code for an expired token: reconnect with a fresh one. */
export const EXPIRED = 4002;

/**
 * @typedef {object} SourceOptions
 * @property {URL} url
 * @property {string[]} topics
 * @property {Record<string, unknown>} params
 * @property {TokenSource} token
 * @property {URL | null} ticketUrl  POST here for a one-time ticket per stream (null: the token
 *   goes in the stream URL)
 * @property {string[]} events  names to listen for besides the hub's types
 * @property {{base: number, max: number}} backoff
 * @property {boolean} withCredentials
 */

export class Source {
  /**
   * @param {SourceOptions} options
   * @param {SourceHooks} hooks
   */
  constructor(options, hooks) {
    this._options = options;
    this._hooks = hooks;
    this._running = false;
    /** @type {EventSource | null} */
    this._es = null;
    /** @type {string | null} */
    this._token = null;
    this._attempt = 0;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this._retryTimer = undefined;
    /** the names of the last good GET /types; the fallback until there is one */
    this._typeNames = FALLBACK_TYPES.map((t) => t.name);
  }

  start() {
    this._running = true;
    this._attempt = 0;
    this._open();
  }

  stop() {
    this._running = false;
    this._close();
  }

  /** The next start() asks the token function again (the last token was refused for good). */
  forgetToken() {
    this._token = null;
  }

  /** @param {boolean} fresh */
  async _getToken(fresh) {
    const src = this._options.token;
    if (src == null) return null;
    if (typeof src !== "function") return (this._token = src);
    if (fresh || this._token == null || this._tokenExpired()) this._token = (await src()) ?? null;
    return this._token;
  }

  _tokenExpired() {
    const exp = tokenClaims(this._token)?.exp;
    return typeof exp === "number" && exp * 1000 <= Date.now() + 1000;
  }

  _renewable() {
    return typeof this._options.token === "function";
  }

  /**
   * The event names to listen for: the hub's types as GET /types lists them now (so that a type
   * added to the hub arrives with no change to this file), "reset", "message" (events without
   * a name) and the caller's extra names. Asked before every new EventSource, since the hub may
   * have been redeployed meanwhile; if it cannot be had, the last list that could.
   */
  async _names() {
    try {
      this._typeNames = (await fetchTypes(this._options.url)).map((t) => t.name);
    } catch {
      // an older hub, or none reachable (then the stream fails too, and the retry asks again)
    }
    const names = new Set([...this._typeNames, "reset", "message", ...this._options.events]);
    names.delete(END);
    return names;
  }

  /**
   * @param {"token" | "ticket"} name  how the stream authenticates
   * @param {string | null} value
   */
  _streamUrl(name, value) {
    const u = new URL(this._options.url);
    for (const t of this._options.topics) u.searchParams.append("topic", t);
    for (const [k, v] of Object.entries(this._options.params)) {
      for (const one of Array.isArray(v) ? v : [v]) u.searchParams.append(k, String(one));
    }
    if (value) u.searchParams.set(name, value);
    const lastId = this._hooks.lastId();
    if (lastId) u.searchParams.set("lastEventId", lastId);
    return u;
  }

  async _open(freshToken = false) {
    if (!this._running) return;
    this._hooks.status("trying");
    let token;
    let names;
    try {
      [token, names] = await Promise.all([this._getToken(freshToken), this._names()]);
    } catch (e) {
      report(e);
      this._retryLater();
      return;
    }
    if (!this._running) return;
    const url = await this._streamUrlFor(token);
    if (url === null) return;
    const es = new EventSource(url, { withCredentials: this._options.withCredentials });
    this._es = es;
    es.onopen = () => {
      if (es !== this._es) return;
      this._attempt = 0;
      this._hooks.status("open");
    };
    /** @type {string | null} the id of the last event this EventSource gave: its reconnect's */
    let seen = null;
    for (const name of names) {
      es.addEventListener(name, (ev) => {
        if (es !== this._es) return;
        seen = ev.lastEventId;
        this._hooks.event(name, ev.lastEventId || null, ev.data);
      });
    }
    es.addEventListener(END, (ev) => {
      if (es === this._es) this._ended(parseEnd(ev.data));
    });
    es.onerror = () => {
      if (es !== this._es) return;
      if (this._options.ticketUrl && es.readyState === EventSource.CONNECTING) {
        // The stream dropped: its ticket is spent, so no EventSource reconnect; a new one.
        this._close();
        this._retryLater(this._renewable() && this._tokenExpired());
        return;
      }
      if (es.readyState === EventSource.CONNECTING) {
        // A network error: EventSource reconnects by itself, sending Last-Event-ID. Unless the
        // token has expired, in which case that attempt is bound to fail: start over instead.
        if (this._renewable() && this._tokenExpired()) {
          this._close();
          this._open(true);
        } else if (seen !== null && seen !== (this._hooks.lastId() ?? "")) {
          // Its Last-Event-ID would be that of an event the connection dropped (a duplicate,
          // or a reset older than the last id): a new EventSource from the last id instead.
          this._close();
          this._retryLater();
        } else {
          this._hooks.status("reconnecting");
        }
        return;
      }
      // CLOSED: the hub answered with an error status and EventSource gave up. Find out why.
      this._close();
      this._recover(url);
    };
  }

  /**
   * The hub ended the stream and said how. Stop for good, or reconnect: a fresh token for an
   * expired one; a new EventSource (new ticket) after the backoff with a ticket endpoint;
   * otherwise EventSource reconnects by itself after the stream's `retry:`, with Last-Event-ID.
   * @param {End} end
   */
  _ended(end) {
    if (!end.reconnect) {
      this.stop();
      this._hooks.fail(end.reason, end.code);
      return;
    }
    const fresh = this._renewable() && (end.code === EXPIRED || this._tokenExpired());
    if (fresh || this._options.ticketUrl) {
      this._close();
      this._retryLater(fresh);
    }
    // else: the close that follows is EventSource's to reconnect from (onerror: CONNECTING)
  }

  /**
   * The stream's URL: with a one-time ticket bought with `token` when there is a ticket
   * endpoint, else with the token. null (the refusal already reported) when no ticket came,
   * or the connection was closed meanwhile.
   * @param {string | null} token
   * @returns {Promise<URL | null>}
   */
  async _streamUrlFor(token) {
    const ticketUrl = this._options.ticketUrl;
    if (!ticketUrl) return this._streamUrl("token", token);
    const { ticket, status, detail } = await requestTicket(
      ticketUrl,
      token,
      this._options.withCredentials,
    );
    if (!this._running) return null;
    if (ticket === null) {
      this._refused(status, detail);
      return null;
    }
    return this._streamUrl("ticket", ticket);
  }

  /** @param {URL} url */
  async _recover(url) {
    if (this._renewable() && this._tokenExpired()) {
      this._retryLater(true);
      return;
    }
    if (this._options.ticketUrl) {
      // The refused request spent its ticket: ask why with a new one.
      const fresh = await this._streamUrlFor(this._token);
      if (fresh === null) return;
      url = fresh;
    }
    const { status, detail } = await probe(url);
    if (!this._running) return;
    this._refused(status, detail);
  }

  /**
   * What to do after the hub (or the ticket endpoint) answered `status`: a 401 with a token
   * function gets a fresh token; other refusals fail for good; anything else retries later.
   * @param {number} status  0: no answer
   * @param {string | null} detail
   */
  _refused(status, detail) {
    if (status === 401 && this._renewable()) {
      this._retryLater(true);
    } else if (status === 401 || status === 403 || status === 400 || status === 404) {
      this._hooks.fail(detail || `HTTP ${status}`, null); // asking again will not help
    } else {
      this._retryLater(false);
    }
  }

  /** Capped, jittered exponential backoff: base * 2^attempt, at most max, times 0.5-1. */
  _retryLater(freshToken = false) {
    if (!this._running) return;
    const { base, max } = this._options.backoff;
    const cap = Math.min(max, base * 2 ** Math.min(this._attempt, 30));
    const delay = this._attempt === 0 && freshToken ? 0 : cap / 2 + (Math.random() * cap) / 2;
    this._attempt += 1;
    this._hooks.status("trying");
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(freshToken), delay);
  }

  _close() {
    clearTimeout(this._retryTimer);
    this._retryTimer = undefined;
    if (this._es) {
      this._es.close();
      this._es = null;
    }
  }
}

/**
 * POST the ticket endpoint with the token (or the page's cookies, with withCredentials): a
 * one-time ticket, or the status (0: no answer, or not a ticket) and the hub's error.
 * @param {URL} ticketUrl
 * @param {string | null} token
 * @param {boolean} withCredentials
 * @returns {Promise<{ticket: string | null, status: number, detail: string | null}>}
 */
async function requestTicket(ticketUrl, token, withCredentials) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TICKET_TIMEOUT_MS);
  try {
    /** @type {Record<string, string>} */
    const headers = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(ticketUrl, {
      method: "POST",
      headers,
      signal: abort.signal,
      cache: "no-store",
      credentials: withCredentials ? "include" : "same-origin",
    });
    const text = await response.text();
    if (response.ok) {
      const ticket = parseJson(text)?.ticket;
      if (typeof ticket === "string" && ticket) {
        return { ticket, status: response.status, detail: null };
      }
      return { ticket: null, status: 0, detail: "the ticket endpoint answered no ticket" };
    }
    return { ticket: null, status: response.status, detail: errorOf(text) };
  } catch {
    return { ticket: null, status: 0, detail: null };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * An end frame's data. A frame that does not say `reconnect: false` reconnects, as a plain
 * close would.
 * @param {string} data
 * @returns {End}
 */
function parseEnd(data) {
  const body = parseJson(data);
  const ok = body && typeof body === "object";
  const code = ok && Number.isInteger(body.code) ? body.code : null;
  const reason = ok && typeof body.reason === "string" && body.reason ? body.reason : "ended";
  const detail = ok && typeof body.detail === "string" ? body.detail : null;
  return { code, reason, reconnect: !(ok && body.reconnect === false), detail };
}

/**
 * @param {string} text
 * @returns {any}
 */
function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/**
 * The hub's error message from an error answer's body (its JSON `error`), or the body itself.
 * @param {string} text
 */
function errorOf(text) {
  const body = parseJson(text);
  return body && (body.error || body.message) ? String(body.error || body.message) : text;
}

/**
 * One request to the stream URL to learn why EventSource gave up: the status and the body.
 * @param {URL} url
 * @returns {Promise<{status: number, detail: string | null}>}
 */
async function probe(url) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), PROBE_TIMEOUT_MS);
  try {
    const response = await fetch(url, { signal: abort.signal, cache: "no-store" });
    const detail = response.ok ? null : errorOf(await response.text());
    return { status: response.status, detail };
  } catch {
    return { status: 0, detail: null };
  } finally {
    clearTimeout(timer);
    abort.abort(); // a 200 would be a live stream: end it at once
  }
}
