// Between the tabs that share one stream: the BroadcastChannel they talk over, the messages they
// exchange, and the rule that makes every tab deliver an event id at most once.

import { parseId } from "./util.js";

/** @typedef {"connecting" | "open" | "reconnecting" | "closed"} Status */

/**
 * Every message the tabs exchange, by kind (its `t` field). This table is the whole protocol:
 * a kind not in it is ignored on receipt, and the connection's handler map must cover each one
 * (the type checker holds it to that).
 */
export const MESSAGES = Object.freeze({
  hello: "a connect() joined: the leader answers with its status; a closed leader lets go",
  event: "the leader relays one event {id, name, data, reset?} it took from the hub",
  status: "the leader's status {status, error, final?}; final closes every tab for good",
  resign: "the leader is closing normally: a follower takes over at once",
});

/** @typedef {keyof typeof MESSAGES} MessageKind */
/** @typedef {{id: string | null, name: string, data: string, reset?: boolean}} Relayed */
/**
 * @typedef {{t: "hello"}
 *   | ({t: "event"} & Relayed)
 *   | {t: "status", status: Status, error: string | null, final?: boolean}
 *   | {t: "resign"}} Message
 */
/**
 * One handler per kind, each given its own kind of message.
 * @typedef {{[K in MessageKind]: (message: Extract<Message, {t: K}>) => void}} Handlers
 */

const RECENT_IDS = 2048; // ids that do not sort (not "<ms>-<seq>[-<epoch>]") are deduplicated by a set

/** The channel of one shared stream. */
export class Relay {
  /**
   * @param {string} name  the channel's name: the tabs that use it share one stream
   * @param {Handlers} handlers
   */
  constructor(name, handlers) {
    /** @type {BroadcastChannel | null} */
    this._channel = new BroadcastChannel(name);
    this._channel.onmessage = (m) => {
      const message = /** @type {unknown} */ (m.data);
      if (!message || typeof message !== "object" || !("t" in message)) return;
      const kind = message.t;
      if (typeof kind !== "string" || !Object.hasOwn(MESSAGES, kind)) return;
      const valid = /** @type {Message} */ (message);
      /** @type {(message: Message) => void} */ (handlers[valid.t])(valid);
    };
  }

  /** @param {Message} message */
  post(message) {
    if (this._channel) this._channel.postMessage(message);
  }

  close() {
    if (this._channel) this._channel.close();
    this._channel = null;
  }
}

/**
 * Which events this tab has delivered. Ids from one hub sort numerically, so one number pair
 * says everything; other ids are remembered in a bounded set.
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
   * True the first time this tab sees the event's id.
   * @param {Relayed} event
   */
  accept(event) {
    const id = event.id;
    if (!id) return true;
    const key = parseId(id);
    if (event.reset) {
      // The hub says where its history resumes: take that as the last id, even if it is lower.
      this.lastId = id;
      this._lastKey = key;
      return true;
    }
    if (key) {
      const last = this._lastKey;
      if (last && key[2] === last[2]) {
        if (key[0] < last[0] || (key[0] === last[0] && key[1] <= last[1])) return false;
      }
      this._lastKey = key;
    } else {
      if (this._recent.has(id)) return false;
      this._recent.add(id);
      if (this._recent.size > RECENT_IDS) {
        const oldest = this._recent.values().next();
        if (!oldest.done) this._recent.delete(oldest.value);
      }
    }
    this.lastId = id;
    return true;
  }
}
