// The hub's event types, learnt from the hub itself (GET /types), so that a type added to the
// hub's table reaches the page with no change here.

/**
 * `topics`: its events may name topics; `internal`: the hub publishes it itself (join, leave),
 * a publish of it is refused.
 * @typedef {{type: number, name: string, filters: string[], topics?: boolean, internal?: boolean}} EventType
 */

/**
 * The hub's table as it was when this file was written. Used only when GET /types cannot be
 * had (an older hub, or the hub is unreachable: then the stream cannot open either, and the
 * next attempt asks again).
 * @type {readonly EventType[]}
 */
export const FALLBACK_TYPES = Object.freeze([
  { type: 1, name: "login", filters: [] },
  { type: 2, name: "payment", filters: [], topics: true },
  { type: 3, name: "logout", filters: [] },
  { type: 4, name: "log", filters: ["level", "service"] },
  { type: 5, name: "broadcast", filters: [], topics: true },
]);

const TYPES_TIMEOUT_MS = 5000;

/**
 * Where a hub lists its types: `types` beside the stream endpoint ("/events" -> "/types",
 * "https://hub.example/prefix/events" -> "https://hub.example/prefix/types").
 * @param {string | URL} streamUrl
 */
export function typesUrl(streamUrl) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  return new URL("types", new URL(streamUrl, base));
}

/**
 * GET /types: the hub's event types. Throws if the hub does not answer with a valid list.
 * @param {string | URL} [streamUrl]  the stream endpoint, as given to connect(); default "/events"
 * @returns {Promise<EventType[]>}
 */
export async function fetchTypes(streamUrl = "/events") {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TYPES_TIMEOUT_MS);
  try {
    const response = await fetch(typesUrl(streamUrl), { signal: abort.signal, cache: "no-store" });
    if (!response.ok) throw new Error(`GET /types: HTTP ${response.status}`);
    return parseTypes(await response.json());
  } finally {
    clearTimeout(timer);
  }
}

/**
 * @param {unknown} body
 * @returns {EventType[]}
 */
function parseTypes(body) {
  const list = body && typeof body === "object" && "types" in body ? body.types : null;
  if (!Array.isArray(list)) throw new Error("GET /types: no list of types");
  return list.map((entry) => {
    const { type, name, filters, topics, internal } = entry ?? {};
    if (typeof type !== "number" || typeof name !== "string" || !name) {
      throw new Error("GET /types: an entry without a number or a name");
    }
    const params = Array.isArray(filters) ? filters.filter((f) => typeof f === "string") : [];
    return { type, name, filters: params, topics: topics === true, internal: internal === true };
  });
}
