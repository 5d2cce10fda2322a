// DICOM person names (VR PN), made readable. Pure functions, no DOM.
//
// A PN value has up to three component groups separated by "=": alphabetic,
// ideographic and phonetic ("Yamada^Tarou=山田^太郎=やまだ^たろう"). Each group has
// up to five components separated by "^", in the order
// family^given^middle^prefix^suffix. A romanized name reads
// "prefix given middle family suffix" ("Doe^John^^Dr" → "Dr John Doe"); an
// ideographic or phonetic one keeps the family name first, as written in
// Japanese, Chinese or Korean ("山田^太郎" → "山田 太郎").

const clean = (text) => text.replace(/\s+/g, " ").trim();

/** One component group as people read it. */
export function readableGroup(group, { familyFirst = false } = {}) {
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] =
    String(group ?? "").split("^").map(clean);
  const parts = familyFirst ? [prefix, family, given, middle, suffix] : [prefix, given, middle, family, suffix];
  return parts.filter(Boolean).join(" ");
}

/**
 * A whole PN value for display: the first non-empty group, followed by the
 * ideographic group in parentheses when the alphabetic one came first.
 */
export function readableName(value) {
  if (value == null || value === "") return "";
  const [alphabetic = "", ideographic = "", phonetic = ""] = String(value).split("=");
  const latin = readableGroup(alphabetic);
  const ideo = readableGroup(ideographic, { familyFirst: true });
  if (latin) return ideo ? `${latin} (${ideo})` : latin;
  return ideo || readableGroup(phonetic, { familyFirst: true });
}
