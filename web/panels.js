// The side panels: watchers, recent rejections, and the instances of one series.
// Every value from the hub is set with textContent or an attribute, never as HTML.

import { bytes, dicomDate, localTime } from "./format.js";
import { readableName } from "./names.js";
import { seriesDetail } from "./api.js";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = String(text);
  return node;
}

function time(iso) {
  const node = el("time", "time", localTime(iso));
  if (iso) {
    node.dateTime = iso;
    node.title = iso;
  }
  return node;
}

/** Watchers: connected or not, how much their outbox still holds, when last heard of. */
export function renderWatchers(list, watchers) {
  const items = [...watchers].sort((a, b) => a.watcher_id.localeCompare(b.watcher_id)).map((w) => {
    const item = el("li", w.connected ? "watcher connected" : "watcher disconnected");
    item.dataset.watcherId = w.watcher_id;
    item.append(
      el("span", "name", w.watcher_id),
      el("span", "state", w.connected ? "connected" : "disconnected"),
      el("span", "backlog", `backlog ${w.backlog ?? 0}`),
      el("span", "counts", `${w.instances ?? 0} indexed · ${w.rejections ?? 0} rejected`),
      time(w.last_seen),
    );
    return item;
  });
  if (!items.length) items.push(el("li", "none", "No watcher has connected yet."));
  list.replaceChildren(...items);
}

/** Rejected files, newest first: the reason says why, the detail says where. */
export function renderRejections(list, rejections) {
  const items = rejections.map((r) => {
    const item = el("li", "rejection");
    item.dataset.path = r.path;
    item.dataset.watcherId = r.watcher_id;
    item.dataset.reason = r.reason;
    const path = el("span", "path", r.path);
    path.title = `${r.watcher_id}: ${r.path}`;
    item.append(el("span", "reason", r.reason), path, el("span", "detail", r.detail), time(r.time));
    return item;
  });
  if (!items.length) items.push(el("li", "none", "No rejected files."));
  list.replaceChildren(...items);
}

const TRANSFER_SYNTAXES = {
  "1.2.840.10008.1.2": "Implicit VR LE",
  "1.2.840.10008.1.2.1": "Explicit VR LE",
  "1.2.840.10008.1.2.1.99": "Deflated",
  "1.2.840.10008.1.2.2": "Explicit VR BE",
  "1.2.840.10008.1.2.4.50": "JPEG Baseline",
  "1.2.840.10008.1.2.4.51": "JPEG Extended",
  "1.2.840.10008.1.2.4.57": "JPEG Lossless",
  "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
  "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
  "1.2.840.10008.1.2.4.81": "JPEG-LS",
  "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
  "1.2.840.10008.1.2.4.91": "JPEG 2000",
  "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
  "1.2.840.10008.1.2.4.203": "HTJ2K",
  "1.2.840.10008.1.2.5": "RLE Lossless",
};

// A series can hold thousands of instances; the first ones tell the story.
const MAX_INSTANCE_ROWS = 1000;
// A series that keeps receiving is re-read at most this often while shown.
const REFRESH_MS = 1000;

function instanceRow(i) {
  const row = el("tr");
  row.dataset.sopInstanceUid = i.sop_instance_uid;
  const syntax = el("td", "syntax", TRANSFER_SYNTAXES[i.transfer_syntax_uid] ?? i.transfer_syntax_uid);
  syntax.title = i.transfer_syntax_uid ?? "";
  const path = el("td", "path", i.path);
  path.title = `${i.watcher_id}: ${i.path}`;
  row.append(
    el("td", "number", i.instance_number),
    path,
    el("td", "size", bytes(i.size)),
    el("td", "dims", i.rows && i.columns ? `${i.columns}×${i.rows}` : ""),
    el("td", "frames", i.number_of_frames),
    syntax,
  );
  const received = el("td", "received");
  received.append(time(i.received));
  row.append(received);
  return row;
}

/** The instances of one series, fetched when opened and re-read while it changes. */
export class InstancesPanel {
  constructor({ root, title, meta, body, note, close, onClose, onError }) {
    Object.assign(this, { root, title, meta, body, note, onClose, onError });
    this.uid = null;
    this.request = 0; // answers to an older request are dropped
    this.refreshTimer = 0;
    close.addEventListener("click", () => this.close());
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.uid) this.close();
    });
  }

  async open(uid) {
    const opening = uid !== this.uid;
    this.uid = uid;
    const request = ++this.request;
    this.root.hidden = false;
    this.root.dataset.seriesUid = uid;
    if (opening) {
      this.title.textContent = "Loading…";
      this.meta.replaceChildren();
      this.body.replaceChildren();
      this.note.textContent = "";
    }
    let series;
    try {
      series = await seriesDetail(uid);
    } catch (error) {
      if (request !== this.request) return;
      if (error.authLost) this.onError(error);
      else this.note.textContent = `Cannot load this series: ${error.message}`;
      return;
    }
    if (request !== this.request) return;
    this.show(series);
  }

  show(s) {
    this.title.textContent = s.series_description || `Series ${s.series_number ?? ""}`.trim();
    const facts = [
      ["Patient", readableName(s.patient_name)],
      ["Patient ID", s.patient_id],
      ["Study", [dicomDate(s.study_date), s.study_description].filter(Boolean).join(" · ")],
      ["Modality", s.modality],
      ["Body part", s.body_part_examined],
      ["Instances", s.instance_count],
      ["Status", s.status],
      ["Series UID", s.series_instance_uid],
    ];
    this.meta.replaceChildren(...facts.filter(([, v]) => v != null && v !== "").flatMap(([k, v]) => [
      el("dt", null, k), el("dd", null, v),
    ]));
    const instances = s.instances ?? [];
    this.body.replaceChildren(...instances.slice(0, MAX_INSTANCE_ROWS).map(instanceRow));
    this.note.textContent = instances.length > MAX_INSTANCE_ROWS
      ? `Showing the first ${MAX_INSTANCE_ROWS} of ${instances.length} instances.` : "";
  }

  /** The shown series changed: read it again, at most once a second. */
  changed(uids) {
    if (!this.uid || !uids.has(this.uid) || this.refreshTimer) return;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = 0;
      if (this.uid) this.open(this.uid);
    }, REFRESH_MS);
  }

  close() {
    this.uid = null;
    this.request += 1;
    clearTimeout(this.refreshTimer);
    this.refreshTimer = 0;
    this.root.hidden = true;
    delete this.root.dataset.seriesUid;
    this.onClose();
  }
}
