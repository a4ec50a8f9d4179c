// Small SVG line charts for the dashboard: axes with nice ticks and labels, a legend, gaps for missing points,
// filled areas, optional log scale, and a hover read-out. No library: the page must work offline.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PAD = {left: 64, right: 14, top: 10, bottom: 36};

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// Ticks at 1, 2 or 5 times a power of ten, about `count` of them across [lo, hi]; `extend` widens the range to
// whole ticks (a y axis whose top carries a label), else the range stays as given (x axes aligned across charts).
function niceTicks(lo, hi, count, extend) {
  // A flat series (or one whose min and max differ by rounding only, like a value and its smoothed copy) gets a
  // band around it: a step below the float resolution would never advance the loop below.
  if (!(hi - lo > 1e-9 * Math.max(Math.abs(lo), Math.abs(hi)))) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const raw = (hi - lo) / Math.max(count, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || 10 * mag;
  if (extend) {  // to whole ticks, unless that would leave a third of the chart empty: then a small margin
    const span = hi - lo, up = Math.ceil(hi / step - 1e-9) * step, down = Math.floor(lo / step + 1e-9) * step;
    hi = up - hi > 0.3 * span ? hi + 0.04 * span : up;
    lo = lo - down > 0.3 * span ? lo - 0.04 * span : down;
  }
  const ticks = [];
  for (let i = Math.ceil(lo / step); i * step <= hi + step * 1e-9 && ticks.length < 50; i++) ticks.push(+(i * step).toPrecision(12));
  return {lo: Math.min(lo, ticks[0] ?? lo), hi: Math.max(hi, ticks[ticks.length - 1] ?? hi), ticks, step};
}

function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) ticks.push(Math.pow(10, e));
  return {lo: ticks[0], hi: ticks[ticks.length - 1], ticks};
}

function extent(series, key) {
  let lo = Infinity, hi = -Infinity;
  for (const s of series) for (const v of s[key]) if (v !== null && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return lo <= hi ? [lo, hi] : null;
}

// One chart in `host`. opts: xLabel, yLabel, xFormat, yFormat, tipFormat, yFloor (a value the y range always
// includes, e.g. 0), yCeil (a top it never passes), yClamp ([lo, hi] the axis stays within), emptyText, logToggle.
class LineChart {
  constructor(host, opts) {
    this.host = host;
    this.opts = opts;
    this.series = [];
    this.log = false;
    this.legend = host.appendChild(document.createElement("div"));
    this.legend.className = "legend";
    this.box = host.appendChild(document.createElement("div"));
    this.box.className = "plot";
    this.tip = this.box.appendChild(document.createElement("div"));
    this.tip.className = "tip";
    this.svg = this.box.appendChild(svgEl("svg", {role: "img", "aria-label": opts.yLabel}));
    this.svg.addEventListener("mousemove", e => this.hover(e));
    this.svg.addEventListener("mouseleave", () => { this.tip.style.display = "none"; this.draw(); });
    new ResizeObserver(() => this.draw()).observe(this.box);
    if (opts.logToggle) this.addLogToggle();
  }

  addLogToggle() {
    const btn = document.createElement("button");
    btn.className = "toggle";
    btn.textContent = "log";
    btn.title = "logarithmic y axis";
    btn.addEventListener("click", () => { this.log = !this.log; btn.classList.toggle("on", this.log); this.draw(); });
    this.host.querySelector(".chart-head")?.appendChild(btn);
  }

  // series: [{name, color, x: [], y: [], width, faint, fill, dots, hideLegend, tipY}], xDomain: [lo, hi] or null
  update(series, xDomain) {
    this.series = series.filter(s => s.x.length);
    this.xDomain = xDomain;
    this.legend.replaceChildren(...series.filter(s => !s.hideLegend).map(s => {
      const item = document.createElement("span");
      item.className = "key" + (s.x.length ? "" : " missing");
      item.innerHTML = `<i style="background:${s.color}"></i>`;
      item.append(s.name);
      return item;
    }));
    this.draw();
  }

  scales(w, h) {
    const useLog = this.log && (extent(this.series, "y") || [0])[0] > 0;
    const xe = this.xDomain || extent(this.series, "x") || [0, 1];
    const x = niceTicks(xe[0], xe[1], Math.max(2, Math.floor(w / 70)));
    let ye = extent(this.series, "y") || [0, 1];
    if (this.opts.yFloor !== undefined && !useLog) ye = [Math.min(ye[0], this.opts.yFloor), ye[1]];
    if (this.opts.yCeil !== undefined) ye = [ye[0], Math.min(Math.max(ye[1], ye[0]), this.opts.yCeil)];
    const y = useLog ? logTicks(ye[0], ye[1]) : niceTicks(ye[0], ye[1], Math.max(2, Math.floor(h / 38)), true);
    if (this.opts.yClamp && !useLog) {  // e.g. a percentage: a flat 0 % line must not get a -1 % axis
      const [c0, c1] = this.opts.yClamp;
      Object.assign(y, {lo: Math.max(y.lo, c0), hi: Math.min(y.hi, c1)});
      y.ticks = y.ticks.filter(t => t >= y.lo && t <= y.hi);
    }
    const fy = useLog ? v => Math.log10(v) : v => v;
    const [ylo, yhi] = [fy(y.lo), fy(y.hi)];
    return {
      x, y,
      sx: v => PAD.left + (v - x.lo) / ((x.hi - x.lo) || 1) * (w - PAD.left - PAD.right),
      sy: v => (v === null || (useLog && v <= 0)) ? null
        : PAD.top + (1 - (fy(v) - ylo) / ((yhi - ylo) || 1)) * (h - PAD.top - PAD.bottom),
    };
  }

  draw(hoverIndex) {
    const w = this.box.clientWidth, h = this.box.clientHeight;
    if (!w || !h) return;
    this.svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    this.svg.replaceChildren();
    if (!this.series.length) {
      this.svg.append(svgEl("text", {x: w / 2, y: h / 2, class: "empty", "text-anchor": "middle"},
                            this.opts.emptyText || "waiting for data…"));
      return;
    }
    const sc = this.scales(w, h);
    this.sc = sc;
    this.drawAxes(sc, w, h);
    const id = this.clipId || (this.clipId = "clip" + (++LineChart.count));
    const defs = svgEl("defs");
    const clipPath = defs.appendChild(svgEl("clipPath", {id}));
    clipPath.append(svgEl("rect", {x: PAD.left, y: PAD.top - 4, width: w - PAD.left - PAD.right + 4,
                                   height: h - PAD.top - PAD.bottom + 4}));
    this.svg.append(defs);
    const clip = svgEl("g", {"clip-path": `url(#${id})`});
    for (const s of this.series) this.drawSeries(clip, s, sc, h);
    this.svg.append(clip);
    if (hoverIndex !== undefined) this.drawHover(sc, h, hoverIndex);
  }

  drawAxes(sc, w, h) {
    const fx = this.opts.xFormat || (v => v), fyv = this.opts.yFormat || (v => v);
    const g = svgEl("g", {class: "axis"});
    for (const t of sc.y.ticks) {
      const y = sc.sy(t);
      g.append(svgEl("line", {x1: PAD.left, x2: w - PAD.right, y1: y, y2: y, class: "grid"}));
      g.append(svgEl("text", {x: PAD.left - 6, y: y + 4, "text-anchor": "end"}, fyv(t, sc.y.step)));
    }
    for (const t of sc.x.ticks) {
      const x = sc.sx(t);
      g.append(svgEl("line", {x1: x, x2: x, y1: PAD.top, y2: h - PAD.bottom, class: "grid vgrid"}));
      g.append(svgEl("text", {x, y: h - PAD.bottom + 15, "text-anchor": "middle"}, fx(t)));
    }
    g.append(svgEl("text", {x: (PAD.left + w - PAD.right) / 2, y: h - 4, "text-anchor": "middle", class: "label"},
                   this.opts.xLabel));
    g.append(svgEl("text", {x: 10, y: (h - PAD.bottom + PAD.top) / 2, "text-anchor": "middle", class: "label",
                            transform: `rotate(-90 10 ${(h - PAD.bottom + PAD.top) / 2})`},
                   this.opts.yLabel + (this.log ? " (log)" : "")));
    this.svg.append(g);
  }

  drawSeries(parent, s, sc, h) {
    const runs = [];  // unbroken runs of points; a null y is a gap
    let run = [];
    s.x.forEach((xv, i) => {
      const y = sc.sy(s.y[i]);
      if (y === null || xv === null) { if (run.length) runs.push(run); run = []; }
      else run.push([sc.sx(xv), y]);
    });
    if (run.length) runs.push(run);
    const base = h - PAD.bottom;
    for (const pts of runs) {
      const d = pts.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
      if (s.fill) parent.append(svgEl("path", {d: `${d}L${pts[pts.length - 1][0]},${base}L${pts[0][0]},${base}Z`,
                                               fill: s.color, "fill-opacity": 0.55, stroke: "none"}));
      else parent.append(svgEl("path", {d, fill: "none", stroke: s.color, "stroke-width": s.width || 2,
                                        "stroke-opacity": s.faint ? 0.3 : 1, "stroke-linejoin": "round"}));
      if (s.dots || pts.length === 1) {
        for (const [x, y] of pts) parent.append(svgEl("circle", {cx: x, cy: y, r: 3.5, fill: s.color}));
      }
    }
  }

  hover(event) {
    if (!this.series.length || !this.sc) return;
    const rect = this.svg.getBoundingClientRect();
    const px = event.clientX - rect.left;
    let best = null;
    for (const s of this.series) {
      s.x.forEach((xv, i) => {
        const d = Math.abs(this.sc.sx(xv) - px);
        if (best === null || d < best.d) best = {d, xv};
      });
    }
    this.draw(best.xv);
    const fx = this.opts.xFormat || (v => v), tipFmt = this.opts.tipFormat || this.opts.yFormat || (v => v);
    const rows = this.series.filter(s => !s.faint).map(s => {
      const i = nearestIndex(s.x, best.xv);
      const v = i === null ? null : (s.tipY || s.y)[i];
      return v === null || v === undefined ? "" : `<div><i style="background:${s.color}"></i>${s.name}: <b>${tipFmt(v)}</b></div>`;
    }).join("");
    this.tip.innerHTML = `<div class="tip-x">${this.opts.xLabel} ${fx(best.xv, true)}</div>${rows}`;
    this.tip.style.display = "block";
    const left = this.sc.sx(best.xv) + 12;
    this.tip.style.left = (left + this.tip.offsetWidth > rect.width ? left - this.tip.offsetWidth - 24 : left) + "px";
  }

  drawHover(sc, h, xv) {
    const x = sc.sx(xv);
    this.svg.append(svgEl("line", {x1: x, x2: x, y1: PAD.top, y2: h - PAD.bottom, class: "cursor"}));
  }
}

LineChart.count = 0;

function nearestIndex(xs, xv) {
  let best = null, bd = Infinity;
  xs.forEach((v, i) => { const d = Math.abs(v - xv); if (v !== null && d < bd) { bd = d; best = i; } });
  return best;
}

// TensorBoard-style debiased exponential smoothing (weight 0..1); gaps stay gaps.
function smooth(ys, weight) {
  let last = 0, n = 0;
  return ys.map(v => {
    if (v === null) return null;
    last = last * weight + (1 - weight) * v;
    n++;
    return last / (1 - Math.pow(weight, n));
  });
}

window.PillCharts = {LineChart, smooth, niceTicks};
