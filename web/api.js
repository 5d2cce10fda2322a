// The hub's REST API as the page uses it. The session cookie (HttpOnly, set by
// POST /api/session) authenticates every call, so the page never holds a key
// after login.

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }

  /** The session is gone (logged out, revoked, expired): the page must log in again. */
  get authLost() {
    return this.status === 401 || this.status === 403;
  }
}

async function request(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    // The hub answers errors as {"error", "message"}; fall back to the status line.
    const error = await response.json().catch(() => ({}));
    throw new HttpError(response.status, error.message || `${response.status} ${response.statusText}`);
  }
  return response.status === 204 ? null : response.json();
}

export const getJSON = (path) => request("GET", path);

export const session = () => getJSON("/api/session");
export const login = (key) => request("POST", "/api/session", { key });
export const logout = () => request("DELETE", "/api/session");

/** Series with its instances. UIDs only hold digits and dots, but encode anyway. */
export const seriesDetail = (uid) => getJSON(`/api/series/${encodeURIComponent(uid)}`);

/**
 * Every item of a paged list, calling onPage(items) per page so that the
 * caller can show progress and need not hold the pages twice.
 */
export async function eachPage(path, onPage, { limit = 1000, maxPages = Infinity, params = {} } = {}) {
  let cursor = null;
  for (let pages = 0; pages < maxPages; pages += 1) {
    const query = new URLSearchParams({ ...params, limit: String(limit) });
    if (cursor) query.set("cursor", cursor);
    const page = await getJSON(`${path}?${query}`);
    onPage(page.items);
    cursor = page.next_cursor;
    if (!cursor) return;
  }
}
