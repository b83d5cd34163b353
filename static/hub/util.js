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
 * "<ms>-<seq>[-<epoch>]" -> [ms, seq, epoch]: the hub's ids sort by these numbers within one
 * epoch ("" for the memory broker's ids); ids of different epochs do not compare (after Redis
 * lost or rolled back data, a new epoch may start at lower numbers).
 * @param {string} id
 * @returns {[number, number, string] | null}
 */
export function parseId(id) {
  const m = /^(\d+)-(\d+)(?:-([0-9a-z]{1,16}))?$/.exec(id);
  return m ? [Number(m[1]), Number(m[2]), m[3] || ""] : null;
}
