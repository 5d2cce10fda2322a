// The studies table: one page of studies, each followed by its series.
//
// Only one page is in the DOM, whatever the number of series. Rows are kept per
// uid between renders and updated cell by cell, so a live update changes a few
// text nodes instead of rebuilding the table (which would also lose focus and
// restart every highlight).

import { dicomDate, localTime } from "./format.js";
import { readableName } from "./names.js";

export const STUDIES_PER_PAGE = 50;
const COLUMNS = 7;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Writing the same text again still costs a DOM mutation; skip it.
function setText(node, value) {
  const text = value == null ? "" : String(value);
  if (node.textContent !== text) node.textContent = text;
}

function setAttr(node, name, value) {
  const text = value == null ? "" : String(value);
  if (node.getAttribute(name) !== text) node.setAttribute(name, text);
}

// Highlight a changed row. A row already lit keeps its running animation
// rather than restarting it: under a stream of updates, restarting hundreds of
// animations every frame is what makes a page stutter. It lights up again at
// its next change after the animation ends (animationend removes the class).
function flash(row) {
  row.classList.add("flash");
}

function studyRow() {
  const row = el("tr", "study");
  const cell = el("td");
  cell.colSpan = COLUMNS;
  for (const name of ["patient", "patient-id", "study-date", "accession", "study-description", "study-count"]) {
    cell.append(el("span", name));
  }
  row.append(cell);
  return row;
}

function fillStudy(row, study, series) {
  setAttr(row, "data-study-uid", study.uid);
  const [patient, patientId, date, accession, description, total] = row.firstChild.children;
  setText(patient, readableName(study.patient_name) || "(no name)");
  setAttr(patient, "title", study.patient_name ?? ""); // the DICOM value, as sent
  setText(patientId, study.patient_id);
  setText(date, dicomDate(study.study_date));
  setText(accession, study.accession_number);
  setText(description, study.study_description);
  const instances = series.reduce((sum, s) => sum + (s.instance_count ?? 0), 0);
  setText(total, `${series.length} series · ${instances} instances`);
}

function seriesRow() {
  const row = el("tr", "series");
  row.tabIndex = 0; // reachable by keyboard: Enter opens the instances
  for (const name of ["number", "modality", "description", "body-part", "count", "status", "updated"]) {
    row.append(el("td", name));
  }
  row.lastChild.append(el("time"));
  return row;
}

function fillSeries(row, s) {
  setAttr(row, "data-series-uid", s.series_instance_uid);
  const [number, modality, description, bodyPart, count, status, updated] = row.children;
  setText(number, s.series_number);
  setText(modality, s.modality);
  setText(description, s.series_description);
  setText(bodyPart, s.body_part_examined);
  setText(count, s.instance_count);
  setText(status, s.status);
  row.classList.toggle("receiving", s.status === "receiving");
  row.classList.toggle("stable", s.status === "stable");
  const time = updated.firstChild;
  setAttr(time, "datetime", s.last_seen);
  setAttr(time, "title", s.last_seen);
  setText(time, localTime(s.last_seen));
}

export class StudyTable {
  constructor({ model, table, body, prev, next, info, empty, onOpen }) {
    Object.assign(this, { model, table, body, prev, next, info, empty });
    this.page = 0;
    this.query = "";
    this.selected = null;
    this.rows = new Map(); // "study:uid" / "series:uid" → row currently on the page

    const open = (event) => {
      const row = event.target.closest("tr.series");
      if (row) onOpen(row.dataset.seriesUid);
    };
    body.addEventListener("click", open);
    body.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        open(event);
      }
    });
    body.addEventListener("animationend", (event) => event.target.classList.remove("flash"));
    prev.addEventListener("click", () => this.turn(-1));
    next.addEventListener("click", () => this.turn(+1));
  }

  turn(step) {
    this.page = Math.max(0, this.page + step);
    this.render(new Set());
    this.table.scrollIntoView({ block: "start" });
  }

  search(query) {
    this.query = query;
    this.page = 0;
    this.render(new Set());
  }

  select(uid) {
    this.selected = uid;
    for (const row of this.body.querySelectorAll("tr.series")) {
      row.classList.toggle("selected", row.dataset.seriesUid === uid);
    }
  }

  /** Show the current page; rows of series in `changed` are highlighted. */
  render(changed) {
    const entries = this.model.matching(this.query);
    const pages = Math.max(1, Math.ceil(entries.length / STUDIES_PER_PAGE));
    this.page = Math.min(this.page, pages - 1);
    const first = this.page * STUDIES_PER_PAGE;
    const visible = entries.slice(first, first + STUDIES_PER_PAGE);

    const rows = [];
    const kept = new Map();
    for (const entry of visible) {
      const series = this.model.seriesOf(entry);
      const key = `study:${entry.study.uid}`;
      const row = this.rows.get(key) ?? studyRow();
      fillStudy(row, entry.study, series);
      rows.push(row);
      kept.set(key, row);
      for (const s of series) {
        const skey = `series:${s.series_instance_uid}`;
        const srow = this.rows.get(skey) ?? seriesRow();
        fillSeries(srow, s);
        srow.classList.toggle("selected", s.series_instance_uid === this.selected);
        if (changed.has(s.series_instance_uid)) flash(srow);
        rows.push(srow);
        kept.set(skey, srow);
      }
    }
    // Moving rows restarts their animations; only reorder when the page changed shape.
    const current = this.body.children;
    if (current.length !== rows.length || rows.some((row, i) => current[i] !== row)) {
      this.body.replaceChildren(...rows);
    }
    this.rows = kept;

    this.prev.disabled = this.page === 0;
    this.next.disabled = this.page >= pages - 1;
    const shown = visible.length ? `Studies ${first + 1}–${first + visible.length} of ${entries.length}` : "";
    setText(this.info, entries.length > STUDIES_PER_PAGE ? `${shown} · page ${this.page + 1} of ${pages}` : shown);
    this.empty.hidden = entries.length > 0;
    setText(this.empty, this.query
      ? `No series match “${this.query}”.`
      : "No series yet: drop DICOM files into a watched folder.");
  }
}
