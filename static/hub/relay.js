// Between the tabs that share one stream: the BroadcastChannel they talk over, the messages they
// exchange, how a follower knows a message comes from the current leader, and the rule that
// makes every tab deliver an event id at most once.
//
// Any script of the origin can post on the channel, so a follower believes only what the
// current leader signed. Each time a tab becomes the leader it makes a fresh ECDSA key pair
// (the private key never leaves it) and announces the public key through the election, bound
// to the leadership itself (election.js: a Web Lock held by the leader's page; the lease where
// locks are missing). A follower acts on an event, status or resign only if it is signed by a
// key the election names as the leader's, with a sequence number above the last it took from
// that key (no replays). `hello` is the one unsigned kind: any tab may join.

import { comparePositions, parseId, report } from "./util.js";

/** @typedef {"connecting" | "open" | "reconnecting" | "closed"} Status */

/**
 * Every message the tabs exchange, by kind (its `t` field). This table is the whole protocol:
 * a kind not in it is ignored on receipt, and the connection's handler map must cover each one
 * (the type checker holds it to that). All but `hello` come from the leader, signed.
 */
export const MESSAGES = Object.freeze({
  hello: "a connect() joined: the leader answers with its status; a closed leader lets go",
  event: "the leader relays one event {id, name, data, reset?} it took from the hub",
  status: "the leader's status {status, error, code?, final?}; final closes every tab for good",
  resign: "the leader is closing normally: a follower takes over at once",
});

/** @typedef {keyof typeof MESSAGES} MessageKind */
/** @typedef {{id: string | null, name: string, data: string, reset?: boolean}} Relayed */
/**
 * @typedef {{t: "hello"}
 *   | ({t: "event"} & Relayed)
 *   | {t: "status", status: Status, error: string | null, code?: number | null, final?: boolean}
 *   | {t: "resign"}} Message
 */
/**
 * One handler per kind, each given its own kind of message.
 * @typedef {{[K in MessageKind]: (message: Extract<Message, {t: K}>) => void}} Handlers
 */
/**
 * How the election vouches for the leader: `announce` binds this tab's key to its leadership;
 * `leaderKeys` names the keys the current leader announced (none if it cannot say).
 * @typedef {object} Trust
 * @property {(keyId: string) => Promise<void>} announce
 * @property {() => Promise<string[]>} leaderKeys
 */
/**
 * On the channel: `b` the message as JSON (with its sequence number `n`), `k` the signer's
 * public key (raw P-256, base64url), `s` the signature of `b`. A hello has only `b`.
 * @typedef {{b: string, k?: string, s?: ArrayBuffer}} Wire
 */
/** @typedef {{id: string, key: CryptoKey, n: number, resign: Wire | null}} Signer */

const RECENT_IDS = 2048; // ids that do not sort (not "<ms>-<seq>[-<epoch>]") are deduplicated by a set
const ALGORITHM = { name: "ECDSA", namedCurve: "P-256" };
const SIGNATURE = { name: "ECDSA", hash: "SHA-256" };
const LAST = Number.MAX_SAFE_INTEGER; // the pre-signed resign's number: nothing after it counts

/** The channel of one shared stream. */
export class Relay {
  /**
   * @param {string} name  the channel's name: the tabs that use it share one stream
   * @param {Handlers} handlers
   * @param {Trust} trust
   */
  constructor(name, handlers, trust) {
    this._handlers = handlers;
    this._trust = trust;
    /** @type {Promise<Signer> | null} while this tab leads */
    this._signer = null;
    /** @type {Signer | null} the same, once made (for a resign that cannot wait) */
    this._ready = null;
    /** @type {{id: string, key: CryptoKey, n: number} | null} the leader key last verified */
    this._trusted = null;
    this._outbox = Promise.resolve();
    this._inbox = Promise.resolve();
    /** @type {BroadcastChannel | null} */
    this._channel = new BroadcastChannel(name);
    this._channel.onmessage = (m) => this._receive(m.data);
  }

  /** This tab leads from now on: sign what it posts with a fresh key, announced first. */
  lead() {
    this._ready = null;
    const signer = makeSigner(this._trust);
    this._signer = signer;
    signer.then(
      (s) => {
        if (this._signer === signer) this._ready = s;
      },
      report,
    );
  }

  /** This tab follows: it signs nothing, and believes only the leader. */
  follow() {
    this._signer = null;
    this._ready = null;
  }

  /**
   * Post in order. A tab that does not lead posts only hellos: nothing else it said would be
   * believed.
   * @param {Message} message
   */
  post(message) {
    const channel = this._channel;
    if (!channel) return;
    if (message.t === "hello") {
      channel.postMessage({ b: JSON.stringify(message) });
      return;
    }
    const signer = this._signer;
    if (!signer) return;
    this._outbox = this._outbox
      .then(async () => {
        const s = await signer;
        s.n += 1;
        channel.postMessage(await sign(s, { ...message, n: s.n }));
      })
      .catch(report);
  }

  /** The page goes away: a resign that cannot wait for a signature (signed in advance). */
  resignNow() {
    if (this._channel && this._ready && this._ready.resign) {
      this._channel.postMessage(this._ready.resign);
    }
  }

  /** Stop listening now; what was posted still goes out, then the channel closes. */
  close() {
    const channel = this._channel;
    this._channel = null;
    if (!channel) return;
    channel.onmessage = null;
    this._outbox = this._outbox.then(() => channel.close());
  }

  /** @param {unknown} data */
  _receive(data) {
    if (!data || typeof data !== "object" || !("b" in data) || typeof data.b !== "string") return;
    const wire = /** @type {Wire} */ (data);
    /** @type {unknown} */
    let message;
    try {
      message = JSON.parse(wire.b);
    } catch {
      return;
    }
    if (!message || typeof message !== "object" || !("t" in message)) return;
    const kind = message.t;
    if (typeof kind !== "string" || !Object.hasOwn(MESSAGES, kind)) return;
    const valid = /** @type {Message} */ (message);
    const handle = /** @type {(message: Message) => void} */ (this._handlers[valid.t]);
    if (valid.t === "hello") {
      handle(valid);
      return;
    }
    // The rest is the leader's word: a leader believes no one, a follower only the leader.
    if (this._signer || typeof wire.k !== "string" || !(wire.s instanceof ArrayBuffer)) return;
    const n = "n" in valid ? valid.n : null;
    if (typeof n !== "number" || !Number.isSafeInteger(n)) return;
    this._inbox = this._inbox
      .then(() => this._verify(wire, n))
      .then((ok) => {
        if (ok && this._channel && !this._signer) handle(valid);
      })
      .catch(report);
  }

  /**
   * Signed by the current leader's key, and newer than what that key said before.
   * @param {Wire} wire
   * @param {number} n
   */
  async _verify(wire, n) {
    const id = /** @type {string} */ (wire.k);
    let trusted = this._trusted;
    if (!trusted || trusted.id !== id) {
      // A key not seen before (a new leader, or a forgery): ask the election whose it is.
      if (!(await this._trust.leaderKeys()).includes(id)) return false;
      const key = await importKey(id);
      if (!key) return false;
      trusted = { id, key, n: -1 };
    }
    if (n <= trusted.n) return false;
    const body = new TextEncoder().encode(wire.b);
    const signature = /** @type {ArrayBuffer} */ (wire.s);
    if (!(await crypto.subtle.verify(SIGNATURE, trusted.key, signature, body))) return false;
    trusted.n = n;
    this._trusted = trusted;
    return true;
  }
}

/**
 * A fresh key pair, its public half announced through the election, and a resign signed in
 * advance for a page that goes away.
 * @param {Trust} trust
 * @returns {Promise<Signer>}
 */
async function makeSigner(trust) {
  const pair = await crypto.subtle.generateKey(ALGORITHM, false, ["sign", "verify"]);
  const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  const id = btoa(String.fromCharCode(...raw))
    .replace(/\+/g, "-")
    .replace(/\//g, "_")
    .replace(/=+$/, "");
  /** @type {Signer} */
  const signer = { id, key: pair.privateKey, n: 0, resign: null };
  signer.resign = await sign(signer, { t: "resign", n: LAST });
  await trust.announce(id);
  return signer;
}

/**
 * @param {Signer} signer
 * @param {Message & {n: number}} message
 * @returns {Promise<Wire>}
 */
async function sign(signer, message) {
  const b = JSON.stringify(message);
  const s = await crypto.subtle.sign(SIGNATURE, signer.key, new TextEncoder().encode(b));
  return { b, k: signer.id, s };
}

/**
 * A public key from its id; null if the id is not one.
 * @param {string} id
 */
async function importKey(id) {
  try {
    const b64 = id.replace(/-/g, "+").replace(/_/g, "/");
    const raw = Uint8Array.from(atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, "=")), (c) =>
      c.charCodeAt(0),
    );
    return await crypto.subtle.importKey("raw", raw, ALGORITHM, false, ["verify"]);
  } catch {
    return null;
  }
}

/**
 * What to do with an event: "new", deliver it (its id, if any, becomes the last id);
 * "duplicate", drop it (this tab has it: a position of the last id's epoch and not newer, or
 * another id seen lately); "backwards", deliver it marked so: a reset older than the last id,
 * which stays.
 * @typedef {"new" | "duplicate" | "backwards"} Verdict
 */

/**
 * Which events this tab has delivered. Ids from one hub only increase within an epoch, so the
 * last id says everything for positions; other ids are remembered in a bounded set. The last id
 * never moves back: a reset older than it (an older hub, a buggy node, a proxy) is delivered
 * as "backwards", and the events up to the last id that come after it are duplicates.
 */
export class Dedupe {
  /** @param {string | null} lastId  resume after this id */
  constructor(lastId) {
    /** the newest id delivered by this tab */
    this.lastId = lastId;
    this._lastKey = lastId ? parseId(lastId) : null;
    /** @type {Set<string>} */
    this._recent = new Set();
  }

  /**
   * Whether to deliver the event: "new" the first time this tab sees its id.
   * @param {Relayed} event
   * @returns {Verdict}
   */
  accept(event) {
    const id = event.id;
    if (!id) return "new";
    const key = parseId(id);
    const order = comparePositions(key, this._lastKey);
    if (event.reset) {
      // The hub says where its history resumes: take that as the last id, unless it is an
      // older position of the same epoch (then the client still has what it has).
      if (order !== null && order < 0) return "backwards";
    } else if (key) {
      if (order !== null && order <= 0) return "duplicate";
    } else {
      if (this._recent.has(id)) return "duplicate";
      this._recent.add(id);
      if (this._recent.size > RECENT_IDS) {
        const oldest = this._recent.values().next();
        if (!oldest.done) this._recent.delete(oldest.value);
      }
    }
    this.lastId = id;
    this._lastKey = key;
    return "new";
  }
}
