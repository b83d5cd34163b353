// Small helpers the hub.js modules share.

/** Hand an exception from a listener to the page's error reporting without stopping the caller. */
export function report(/** @type {unknown} */ error) {
  if (typeof reportError === "function") reportError(error);
  else {
    setTimeout(() => {
      throw error;
    });
  }
}

export function randomId() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

/**
 * The claims of a JWT, without verifying it (the hub does that); null if it is not one.
 * @param {unknown} token
 * @returns {{sub?: unknown, sid?: unknown, exp?: unknown, [claim: string]: unknown} | null}
 */
export function tokenClaims(token) {
  if (typeof token !== "string") return null;
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, "=")));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/**
 * A hub event id's position: [ms, seq, epoch], epoch "" for the memory broker's ids.
 * @typedef {[bigint, bigint, string]} Position
 */

/**
 * The position of a hub event id, read as the hub reads ids (ASCII digits, at most 20 each
 * side; an epoch of 1-16 lower-case letters and digits); null for anything else. BigInt: a
 * sequence past 2^53 still compares exactly.
 * @param {string} id
 * @returns {Position | null}
 */
export function parseId(id) {
  const m = /^([0-9]{1,20})-([0-9]{1,20})(?:-([0-9a-z]{1,16}))?$/.exec(id);
  return m ? [BigInt(m[1]), BigInt(m[2]), m[3] || ""] : null;
}

/**
 * How position `a` stands to `b`: -1 older, 0 the same, 1 newer; null when they do not compare
 * (either is null, or their epochs differ: after Redis lost or rolled back data, a new epoch
 * may start at lower numbers). Within one epoch the hub's ids only increase.
 * @param {Position | null} a
 * @param {Position | null} b
 * @returns {-1 | 0 | 1 | null}
 */
export function comparePositions(a, b) {
  if (!a || !b || a[2] !== b[2]) return null;
  if (a[0] !== b[0]) return a[0] < b[0] ? -1 : 1;
  if (a[1] !== b[1]) return a[1] < b[1] ? -1 : 1;
  return 0;
}
