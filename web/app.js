// The dashboard: login, initial load, then the live feed. This module wires the
// pieces together; each piece lives in its own module:
//   api.js    REST calls (the session cookie authenticates them)
//   feed.js   the /ws/live WebSocket, reconnect and resume by seq
//   model.js  what the page knows, in Maps, and what changed since the last render
//   table.js  one page of studies and their series
//   panels.js watchers, rejections, the instances of a series
//   chart.js  files per second
//   names.js  DICOM person names made readable

import * as api from "./api.js";
import { RateChart } from "./chart.js";
import { LiveFeed } from "./feed.js";
import { count } from "./format.js";
import { Model } from "./model.js";
import { InstancesPanel, renderRejections, renderWatchers } from "./panels.js";
import { StudyTable } from "./table.js";

const $ = (id) => document.getElementById(id);
const RETRY_LOAD_MS = 3000;
const SEARCH_DELAY_MS = 120;

const model = new Model();
let generation = 0; // bumped by every (re)start and logout; stale loads stop when it moves on
let statsChanged = false;
let frame = 0;

const table = new StudyTable({
  model,
  table: $("series-table"),
  body: $("series"),
  prev: $("prev"),
  next: $("next"),
  info: $("page-info"),
  empty: $("empty"),
  onOpen: (uid) => {
    table.select(uid);
    instances.open(uid);
  },
});

const instances = new InstancesPanel({
  root: $("instances"),
  title: $("instances-title"),
  meta: $("instances-meta"),
  body: $("instance-rows"),
  note: $("instances-note"),
  close: $("instances-close"),
  onClose: () => table.select(null),
  onError: () => sessionLost(),
});

const chart = new RateChart({
  svg: $("rate-chart"), current: $("rate-now"), top: $("rate-max"), span: $("rate-span"),
});

const feed = new LiveFeed({
  onChange: (change) => {
    model.apply(change);
    schedule();
  },
  onStats: (stats) => {
    model.stats = { ...model.stats, ...stats };
    for (const watcher of stats.watchers ?? []) model.putWatcher(watcher);
    chart.add(stats);
    statsChanged = true;
    schedule();
  },
  onState: setConnection,
  onAuthLost: () => sessionLost("Your session has ended. Paste a read key to continue."),
});

// Messages can arrive by the hundred per second; the DOM is updated at most once
// per frame with everything that changed in between.
function schedule() {
  if (!frame) frame = requestAnimationFrame(flush);
}

function flush() {
  frame = 0;
  const changed = model.changedSeries;
  model.changedSeries = new Set();
  if (changed.size || model.studiesMoved) {
    table.render(changed);
    statsChanged = true; // the series totals in the header moved
  }
  instances.changed(changed);
  if (model.watchersChanged) {
    model.watchersChanged = false;
    renderWatchers($("watchers"), model.watchers.values());
  }
  if (model.rejectionsChanged) {
    model.rejectionsChanged = false;
    renderRejections($("rejections"), model.recentRejections());
  }
  if (statsChanged) {
    statsChanged = false;
    renderTotals();
    chart.draw();
  }
}

function renderTotals() {
  const { series, instances, receiving } = model.totals;
  const rejections = model.stats?.rejections ?? 0; // only the hub counts them all
  $("totals").textContent = `${count(series)} series${receiving ? ` (${count(receiving)} receiving)` : ""}`
    + ` · ${count(instances)} instances · ${count(rejections)} rejected`;
  $("rejection-count").textContent = rejections ? `(${count(rejections)} in all)` : "";
}

function setConnection(state) {
  const node = $("connection");
  node.textContent = state;
  node.dataset.state = state;
}

function showView(live) {
  $("login-view").hidden = live;
  $("live-view").hidden = !live;
  $("connection").hidden = !live;
  $("logout").hidden = !live;
  $("totals").hidden = !live;
}

function showLogin(message = "") {
  showView(false);
  $("whoami").textContent = "";
  const error = $("login-error");
  error.textContent = message;
  error.hidden = !message;
  $("key").focus();
}

function sessionLost(message = "") {
  generation += 1;
  feed.stop();
  instances.close();
  model.clear();
  chart.clear();
  table.render(new Set());
  showLogin(message);
}

/** Initial load (stats, every series, rejections, watchers), then the live feed. */
async function startLive(me) {
  const mine = ++generation;
  feed.stop();
  model.clear();
  chart.clear();
  showView(true);
  if (me) $("whoami").textContent = `${me.name} (${me.role})`;
  setConnection("connecting");
  const loading = $("loading");
  loading.hidden = false;
  loading.textContent = "Loading…";
  try {
    // last_seq first: whatever changes while we page through the lists is
    // replayed by the feed afterwards, so nothing falls between the two.
    const stats = await api.getJSON("/api/stats");
    if (mine !== generation) return;
    model.stats = stats;
    await api.eachPage("/api/series", (items) => {
      if (mine !== generation) throw new Error("superseded");
      for (const item of items) model.putSeries(item);
      loading.textContent = `Loading… ${count(model.series.size)} of ${count(stats.series)} series`;
    });
    // Only the newest rejections are shown: one page, newest first.
    await api.eachPage("/api/rejections", (items) => {
      if (mine !== generation) throw new Error("superseded");
      for (const item of items) model.putRejection(item);
    }, { limit: 100, maxPages: 1, params: { order: "desc" } });
    const watchers = await api.getJSON("/api/watchers");
    if (mine !== generation) return;
    for (const watcher of watchers.items) model.putWatcher(watcher);
    loading.hidden = true;
    model.resetChanges(); // nothing is "new" on the first render: no highlights
    table.render(new Set());
    statsChanged = true;
    schedule();
    feed.start(stats.last_seq ?? 0);
  } catch (error) {
    if (mine !== generation) return;
    if (error.authLost) {
      sessionLost("Your session has ended. Paste a read key to continue.");
      return;
    }
    setConnection("reconnecting");
    loading.textContent = `Cannot load the index (${error.message}); retrying…`;
    setTimeout(() => {
      if (mine === generation) startLive(me);
    }, RETRY_LOAD_MS);
  }
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const submit = $("login-submit");
  const error = $("login-error");
  submit.disabled = true;
  error.hidden = true;
  try {
    const me = await api.login($("key").value.trim());
    $("key").value = ""; // the cookie holds the session now; the key need not linger
    startLive(me);
  } catch (err) {
    error.textContent = err.status === 401 || err.status === 403
      ? `That key was not accepted: ${err.message}`
      : `Cannot sign in: ${err.message}`;
    error.hidden = false;
    $("key").select();
  } finally {
    submit.disabled = false;
  }
});

$("logout").addEventListener("click", async () => {
  try {
    await api.logout();
  } catch {
    // Gone already, or the hub is down: the page forgets the session either way.
  }
  sessionLost();
});

let searchTimer = 0;
$("search").addEventListener("input", (event) => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => table.search(event.target.value.trim()), SEARCH_DELAY_MS);
});
document.addEventListener("keydown", (event) => {
  // "/" jumps to the search box, as on many sites, unless one is typing already.
  if (event.key === "/" && !event.target.closest("input, textarea, select")) {
    event.preventDefault();
    $("search").focus();
  }
});

async function boot() {
  // GET /login?token=… (the one-time link `dicomhub up` prints) redirects here
  // with #link-expired when the link was already used or has expired.
  let notice = "";
  if (location.hash === "#link-expired") {
    notice = "That login link has expired or was already used. Paste a read key instead.";
    history.replaceState(null, "", location.pathname);
  }
  try {
    startLive(await api.session());
  } catch (error) {
    showLogin(error.authLost ? notice : `Cannot reach the hub: ${error.message}`);
  }
}

boot();
