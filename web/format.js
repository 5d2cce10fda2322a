// Small display formatters shared by the panels. Pure functions, no DOM.

/** DICOM DA "20240102" → "2024-01-02"; anything else is shown as it came. */
export function dicomDate(value) {
  const text = String(value ?? "");
  return /^\d{8}$/.test(text) ? `${text.slice(0, 4)}-${text.slice(4, 6)}-${text.slice(6)}` : text;
}

const pad = (n) => String(n).padStart(2, "0");

/** An ISO 8601 time in the viewer's zone: "14:03:07" today, "2024-01-02 14:03" before. */
export function localTime(iso, now = new Date()) {
  if (!iso) return "";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return String(iso);
  const clock = `${pad(t.getHours())}:${pad(t.getMinutes())}`;
  if (t.toDateString() === now.toDateString()) return `${clock}:${pad(t.getSeconds())}`;
  return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${clock}`;
}

/** Byte counts as people read them: 512 B, 1.5 kB, 12 MB. */
export function bytes(n) {
  if (n == null) return "";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = Number(n);
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit && value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

/** Thousands separated by thin spaces, whatever the locale ("10 000"). */
export function count(n) {
  return Number(n ?? 0).toLocaleString("en").replace(/,/g, "\u202f");
}
