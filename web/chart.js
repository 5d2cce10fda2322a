// Files per second (and rejections per second) over the last few minutes, drawn
// as SVG paths from the hub's once-a-second stats messages. No library: two
// paths whose `d` attribute is rebuilt from at most a few hundred samples.

const SVG = "http://www.w3.org/2000/svg";
export const WINDOW_MS = 5 * 60 * 1000;
// Until there are five minutes of samples the time axis spans what there is
// (but at least this much), so a freshly opened page shows a readable line.
const MIN_SPAN_MS = 30 * 1000;
const WIDTH = 300; // the viewBox; the SVG is stretched to its box by CSS
const HEIGHT = 80;
const GAP_MS = 3000; // no stats for this long (hub down): break the line

// 1, 2, 5, 10, 20, 50 …: an axis top people can read at a glance.
function niceCeil(value) {
  const power = 10 ** Math.floor(Math.log10(Math.max(value, 1)));
  return [1, 2, 5, 10].map((m) => m * power).find((n) => n >= value);
}

export class RateChart {
  constructor({ svg, current, top, span }) {
    Object.assign(this, { svg, current, top, span });
    this.samples = [];
    svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
    svg.setAttribute("preserveAspectRatio", "none");
    const line = (className) => {
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("class", className);
      path.setAttribute("vector-effect", "non-scaling-stroke"); // stretched, lines stay thin
      svg.append(path);
      return path;
    };
    this.grid = line("grid");
    this.grid.setAttribute("d", `M0 ${HEIGHT / 2}H${WIDTH}`);
    this.rejections = line("rejections");
    this.files = line("files"); // drawn last, on top: it is the line people look at
  }

  add(stats) {
    const t = Date.parse(stats.time) || Date.now();
    const last = this.samples.at(-1);
    if (last && t < last.t) this.samples = []; // the clock went back (another hub): start over
    this.samples.push({ t, files: stats.files_per_second ?? 0, rejections: stats.rejections_per_second ?? 0 });
    while (this.samples.length && this.samples[0].t < t - WINDOW_MS) this.samples.shift();
  }

  clear() {
    this.samples = [];
    this.draw();
  }

  draw() {
    const latest = this.samples.at(-1);
    const max = niceCeil(Math.max(1, ...this.samples.map((s) => Math.max(s.files, s.rejections))));
    const seconds = latest ? Math.round(Math.max(MIN_SPAN_MS, latest.t - this.samples[0].t) / 1000) : 0;
    const span = Math.min(WINDOW_MS, seconds * 1000 || MIN_SPAN_MS);
    this.files.setAttribute("d", this.path("files", max, span));
    this.rejections.setAttribute("d", this.path("rejections", max, span));
    this.top.textContent = `${max}/s`;
    this.span.textContent = span < 120000 ? `last ${seconds} s` : `last ${Math.round(span / 60000)} min`;
    this.current.textContent = latest
      ? `${latest.files.toFixed(latest.files < 10 ? 1 : 0)} files/s` : "– files/s";
    this.svg.setAttribute("aria-label", `files per second, ${this.span.textContent}; now ${this.current.textContent}`);
  }

  path(key, max, span) {
    const end = this.samples.at(-1)?.t ?? 0;
    let d = "";
    let previous = null;
    for (const s of this.samples) {
      const x = WIDTH - ((end - s.t) / span) * WIDTH;
      const y = HEIGHT - 1 - (s[key] / max) * (HEIGHT - 2);
      d += `${previous === null || s.t - previous > GAP_MS ? "M" : "L"}${x.toFixed(1)} ${y.toFixed(1)}`;
      previous = s.t;
    }
    return d;
  }
}
