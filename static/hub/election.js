// Tab election: of the tabs that share one stream, exactly one (the leader) holds the connection.
// Web Locks where the browser has them; a lease in localStorage where it does not. The election
// also vouches for the leader's signing key (relay.js): with Web Locks, the leader holds a
// second lock named after its key, and a key counts only if the page that holds it holds the
// election's lock too (no other page can hold a lock in that page's name). With the lease, the
// key is in the lease: weaker, since any script of the origin can write localStorage.

import { randomId, report } from "./util.js";

const LEASE_MS = 5000; // fallback election: a leader's lease lasts this long ...
const LEASE_TICK_MS = 1000; // ... and is renewed (or checked by followers) this often

/**
 * What an election tells the connection.
 * @typedef {object} Candidate
 * @property {() => void} lead     this tab is the leader now: open the stream
 * @property {() => void} follow   this tab is (again) a follower: it holds no stream
 * @property {() => void} leaving  the page goes away while this tab leads: tell the others
 */

/**
 * @typedef {object} Election
 * @property {() => void} stop     stop taking part; a leader's lease is cleared, the lock kept
 * @property {() => void} release  give the lock up (after stop)
 * @property {() => void} claim    the leader resigned: try to take over now rather than later
 * @property {(keyId: string) => Promise<void>} announce  this tab leads and signs with this key
 * @property {() => Promise<string[]>} leaderKeys  the keys the current leader announced
 */

/**
 * Start the best election this browser allows, or none (null) if it has neither Web Locks nor
 * localStorage: then every tab keeps its own connection.
 * @param {string} name  the tabs that elect with the same name share a stream
 * @param {Candidate} candidate
 * @returns {Election | null}
 */
export function elect(name, candidate) {
  // Typed as always there; older browsers and insecure origins (http: other than localhost)
  // have no navigator.locks.
  /** @type {LockManager | undefined} */
  const locks = typeof navigator !== "undefined" ? navigator.locks : undefined;
  if (locks && typeof locks.request === "function") {
    return new LockElection(name, candidate);
  }
  if (hasLocalStorage()) return new LeaseElection("hubjs-lease:" + name, candidate);
  return null;
}

/** The leader holds an exclusive Web Lock until it closes or its page ends. */
class LockElection {
  /**
   * @param {string} name
   * @param {Candidate} candidate
   */
  constructor(name, candidate) {
    this._name = name;
    this._stopped = false;
    this._released = false;
    /** @type {(() => void) | null} */
    this._release = null;
    /** @type {(() => void) | null} gives the key's lock up */
    this._withdraw = null;
    /** @type {AbortController | null} */
    this._abort = new AbortController();
    navigator.locks
      .request(name, { signal: this._abort.signal }, () => {
        if (this._stopped) return undefined;
        this._abort = null;
        candidate.lead();
        // Hold the lock until release() or the end of the page.
        return new Promise((resolve) => (this._release = () => resolve(undefined)));
      })
      .catch((e) => {
        if (!(e instanceof DOMException && e.name === "AbortError")) report(e);
      });
    candidate.follow();
  }

  stop() {
    this._stopped = true;
    if (this._abort) this._abort.abort();
  }

  release() {
    this._released = true;
    if (this._release) this._release();
    this._release = null;
    this._withdrawKey();
  }

  claim() {
    // The lock manager grants the lock to the next waiting tab by itself.
  }

  /** @param {string} keyId */
  announce(keyId) {
    this._withdrawKey();
    return new Promise((resolve) => {
      navigator.locks
        .request(keyLock(this._name, keyId), () => {
          resolve(undefined);
          if (this._released) return undefined;
          return new Promise((done) => (this._withdraw = () => done(undefined)));
        })
        .catch((e) => {
          resolve(undefined); // unannounced: the followers will not believe this tab
          report(e);
        });
    });
  }

  async leaderKeys() {
    const { held = [] } = await navigator.locks.query();
    const leader = held.find((lock) => lock.name === this._name);
    if (!leader || !leader.clientId) return [];
    const prefix = keyLock(this._name, "");
    return held
      .filter((lock) => lock.clientId === leader.clientId && lock.name?.startsWith(prefix))
      .map((lock) => (lock.name ?? "").slice(prefix.length));
  }

  _withdrawKey() {
    if (this._withdraw) this._withdraw();
    this._withdraw = null;
  }
}

/**
 * The lock a leader holds to say which key it signs with.
 * @param {string} name
 * @param {string} keyId
 */
function keyLock(name, keyId) {
  return name + " leader-key " + keyId;
}

/**
 * Where Web Locks are missing: a lease in localStorage, renewed by the leader every second,
 * claimed by a follower when it has lapsed, confirmed one tick later (last writer wins). A
 * closing leader clears it and resigns so that a follower claims at once.
 */
class LeaseElection {
  /**
   * @param {string} key  the lease's localStorage key
   * @param {Candidate} candidate
   */
  constructor(key, candidate) {
    const me = randomId();
    this._key = key;
    this._leading = false;
    /** @type {string | null} the key this tab signs with while it leads */
    this._keyId = null;
    this._me = me;
    /** @param {number} now */
    const mine = (now) => ({ id: me, exp: now + LEASE_MS, key: this._keyId });
    this._mine = mine;
    let claimed = false;
    this._tick = () => {
      const now = Date.now();
      const lease = readLease(key);
      if (this._leading) {
        if (lease && lease.id !== me && lease.exp > now) {
          this._leading = false;
          this._keyId = null;
          candidate.follow();
        } else writeLease(key, mine(now));
      } else if (claimed && lease && lease.id === me) {
        claimed = false;
        this._keyId = null;
        writeLease(key, mine(now));
        this._leading = true;
        candidate.lead();
      } else if (!lease || lease.exp <= now) {
        claimed = true;
        this._keyId = null;
        writeLease(key, mine(now));
      } else {
        claimed = false;
      }
    };
    this._timer = setInterval(this._tick, LEASE_TICK_MS);
    this._onPageHide = () => {
      if (!this._leading) return;
      writeLease(key, null);
      candidate.leaving();
    };
    addEventListener("pagehide", this._onPageHide);
    candidate.follow();
    this._tick();
  }

  stop() {
    if (this._leading) writeLease(this._key, null);
    clearInterval(this._timer);
    removeEventListener("pagehide", this._onPageHide);
  }

  release() {
    // A lease has nothing to hold once stop() cleared it.
  }

  claim() {
    this._tick();
  }

  /** @param {string} keyId */
  async announce(keyId) {
    this._keyId = keyId;
    const lease = readLease(this._key);
    if (this._leading && lease && lease.id === this._me) writeLease(this._key, this._mine(Date.now()));
  }

  async leaderKeys() {
    const lease = readLease(this._key);
    return lease && lease.exp > Date.now() && lease.key ? [lease.key] : [];
  }
}

function hasLocalStorage() {
  try {
    return typeof localStorage !== "undefined" && localStorage !== null;
  } catch {
    return false;
  }
}

/** @typedef {{id: string, exp: number, key?: string | null}} Lease */

/**
 * @param {string} key
 * @returns {Lease | null}
 */
function readLease(key) {
  try {
    const lease = JSON.parse(localStorage.getItem(key) ?? "null");
    if (!lease || typeof lease.id !== "string" || typeof lease.exp !== "number") return null;
    return typeof lease.key === "string" || lease.key == null ? lease : null;
  } catch {
    return null;
  }
}

/**
 * @param {string} key
 * @param {Lease | null} lease
 */
function writeLease(key, lease) {
  try {
    if (lease) localStorage.setItem(key, JSON.stringify(lease));
    else localStorage.removeItem(key);
  } catch {
    // storage full or denied: the election degrades to every tab for itself
  }
}
