// What the page knows, in Maps keyed by identifier, plus "what changed since the
// last render" so that a burst of messages costs one DOM update, not hundreds.
// Applying the same state twice is harmless: every message carries the current
// state of what it concerns, so applying it is simply storing it.

import { readableName } from "./names.js";

export const MAX_REJECTIONS = 100;

const bySeriesOrder = (a, b) =>
  (a.series_number ?? Infinity) - (b.series_number ?? Infinity) ||
  String(a.first_seen).localeCompare(String(b.first_seen)) ||
  a.series_instance_uid.localeCompare(b.series_instance_uid);

// Newest study first, by when the hub first saw it: a study keeps its place
// while its series fill up, and new arrivals appear at the top of page one.
const byNewestStudy = (a, b) =>
  String(b.first_seen).localeCompare(String(a.first_seen)) || a.uid.localeCompare(b.uid);

const rejectionKey = (r) => `${r.watcher_id}\u0000${r.path}`;
const byNewestRejection = (a, b) => String(b.time).localeCompare(String(a.time));

export class Model {
  constructor() {
    this.clear();
  }

  clear() {
    this.series = new Map(); // series uid → series item
    this.studies = new Map(); // study uid → {uid, first_seen, last_seen, series: Set of uids, ...study fields}
    this.haystacks = new Map(); // series uid → lower-case text the search box looks in
    this.rejections = new Map(); // watcher id + path → rejection item
    this.watchers = new Map(); // watcher id → watcher item
    this.stats = null;
    this.sorted = []; // studies, newest first; rebuilt only when a study appears
    // Kept as series come and go, so the header agrees with the table at every
    // frame instead of lagging until the next once-a-second stats message.
    this.totals = { series: 0, instances: 0, receiving: 0 };
    this.studiesMoved = true; // a study appeared or moved: `sorted` must be rebuilt
    this.resetChanges();
  }

  /** Forget what changed (after a render, or after the initial load). */
  resetChanges() {
    this.changedSeries = new Set();
    this.rejectionsChanged = true;
    this.watchersChanged = true;
  }

  putSeries(item) {
    const uid = item.series_instance_uid;
    if (!uid) return;
    const before = this.series.get(uid);
    if (before && before.study_instance_uid !== item.study_instance_uid) {
      this.studies.get(before.study_instance_uid)?.series.delete(uid);
    }
    this.series.set(uid, item);
    this.changedSeries.add(uid);
    const totals = this.totals;
    if (before) {
      totals.instances -= before.instance_count ?? 0;
      totals.receiving -= before.status === "receiving" ? 1 : 0;
    } else {
      totals.series += 1;
    }
    totals.instances += item.instance_count ?? 0;
    totals.receiving += item.status === "receiving" ? 1 : 0;
    this.haystacks.set(uid, [
      item.patient_name, readableName(item.patient_name), item.patient_id, item.accession_number,
      item.modality, item.series_description, item.study_description, item.body_part_examined,
    ].filter(Boolean).join("\n").toLowerCase());

    const studyUid = item.study_instance_uid;
    let study = this.studies.get(studyUid);
    if (!study) {
      study = { uid: studyUid, series: new Set(), first_seen: item.first_seen, last_seen: item.last_seen };
      this.studies.set(studyUid, study);
      this.studiesMoved = true;
    }
    study.series.add(uid);
    // Study-level attributes come with every series; the newest series wins.
    for (const key of ["patient_name", "patient_id", "study_date", "study_description", "accession_number"]) {
      if (item[key] != null && item[key] !== "") study[key] = item[key];
    }
    if (item.first_seen && (!study.first_seen || item.first_seen < study.first_seen)) {
      study.first_seen = item.first_seen;
      this.studiesMoved = true;
    }
    if (item.last_seen && (!study.last_seen || item.last_seen > study.last_seen)) study.last_seen = item.last_seen;
  }

  putRejection(item) {
    this.rejections.set(rejectionKey(item), item);
    this.rejectionsChanged = true;
    // Only the most recent ones are shown; let the Map grow a little before trimming.
    if (this.rejections.size > 2 * MAX_REJECTIONS) {
      const keep = this.recentRejections();
      this.rejections = new Map(keep.map((r) => [rejectionKey(r), r]));
    }
  }

  /** The file was replaced by one that is indexed: it is no longer rejected. */
  dropRejection(item) {
    if (this.rejections.delete(rejectionKey(item))) this.rejectionsChanged = true;
  }

  recentRejections() {
    return [...this.rejections.values()].sort(byNewestRejection).slice(0, MAX_REJECTIONS);
  }

  putWatcher(item) {
    if (!item.watcher_id) return;
    const before = this.watchers.get(item.watcher_id);
    const after = { ...before, ...item };
    // Stats repeat every watcher once a second; most of the time nothing moved.
    if (before && JSON.stringify(before) === JSON.stringify(after)) return;
    this.watchers.set(item.watcher_id, after);
    this.watchersChanged = true;
  }

  /** A change message from the feed (or a replayed one): store its state. */
  apply(change) {
    const { kind } = change;
    if (kind.startsWith("series.")) this.putSeries(change);
    else if (kind === "instance.rejected") this.putRejection(change);
    else if (kind === "rejection.cleared") this.dropRejection(change);
    else if (kind.startsWith("watcher.")) this.putWatcher(change);
  }

  /**
   * Studies, newest first, that have a series matching every search term. Each
   * entry is {study, series}: series is the matching series when searching, or
   * null for "all of them" so that no search costs nothing per series.
   */
  matching(query) {
    if (this.studiesMoved) {
      this.sorted = [...this.studies.values()].sort(byNewestStudy);
      this.studiesMoved = false;
    }
    const terms = query.toLowerCase().split(/\s+/).filter(Boolean);
    if (!terms.length) return this.sorted.map((study) => ({ study, series: null }));
    const result = [];
    for (const study of this.sorted) {
      const series = [...study.series].filter((uid) => {
        const hay = this.haystacks.get(uid) ?? "";
        return terms.every((term) => hay.includes(term));
      });
      if (series.length) result.push({ study, series });
    }
    return result;
  }

  /** The series items of one entry of `matching`, in series order. */
  seriesOf(entry) {
    return [...(entry.series ?? entry.study.series)].map((uid) => this.series.get(uid)).sort(bySeriesOrder);
  }
}
