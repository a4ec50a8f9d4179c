// Number, time and duration formatting for the dashboard: one place, so every panel reads the same way.
"use strict";

const isNum = v => typeof v === "number" && isFinite(v);

const Fmt = {
  // Plain number with about `sig` significant digits; NaN/inf arrive as text and are shown as they are.
  num(v, sig = 4) {
    if (typeof v === "string") return v;
    if (!isNum(v)) return "—";
    if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) return v.toExponential(2);
    return (+v.toPrecision(sig)).toString();
  },
  // A 0..1 fraction as a percentage.
  pct(v, digits = 1) { return isNum(v) ? (v * 100).toFixed(digits) + " %" : Fmt.num(v); },
  // A value already in percent.
  pct100(v, digits = 0) { return isNum(v) ? v.toFixed(digits) + " %" : "—"; },
  lr(v) { return v === 0 ? "0" : isNum(v) ? v.toExponential(2).replace("e-", "e−").replace("e+", "e") : Fmt.num(v); },
  // Axis tick of a small quantity such as a learning rate: 0, 5e−4, 1.5e−3.
  expTick(v) { return !isNum(v) ? "" : v === 0 ? "0" : (+v.toPrecision(2)).toExponential().replace("e-", "e−").replace("e+", "e"); },
  rate(v) { return isNum(v) ? (v >= 100 ? Math.round(v).toLocaleString("en") : v.toFixed(1)) : "—"; },
  ms(seconds) {
    if (!isNum(seconds)) return "—";
    const ms = seconds * 1000;
    return ms >= 100 ? Math.round(ms) + " ms" : ms.toFixed(1) + " ms";
  },
  gb(v) { return isNum(v) ? (v >= 100 ? v.toFixed(0) : v.toFixed(1)) : "—"; },
  mb(v) { return isNum(v) ? (v >= 1024 ? (v / 1024).toFixed(1) + " GB" : Math.round(v) + " MB") : "—"; },
  // 3 h 05 m, 4 m 07 s, 12 s.
  dur(s) {
    if (!isNum(s)) return "—";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h >= 48) return `${Math.floor(h / 24)} d ${h % 24} h`;
    if (h) return `${h} h ${String(m).padStart(2, "0")} m`;
    if (m) return `${m} m ${String(sec).padStart(2, "0")} s`;
    return `${sec} s`;
  },
  ago(s) { return !isNum(s) ? "—" : (s < 2 ? "just now" : Fmt.dur(s) + " ago"); },
  // Wall-clock time of a Unix timestamp; the date too when it is not today.
  clock(t) {
    if (!isNum(t)) return "—";
    const d = new Date(t * 1000), now = new Date();
    const hm = d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
    return d.toDateString() === now.toDateString() ? hm : d.toLocaleDateString([], {month: "short", day: "numeric"}) + " " + hm;
  },
  epochTick(v, precise) { return precise ? (+v).toFixed(2) : Fmt.num(v, 3); },
  // Axis tick of a quantity whose tick step is `step` (avoids 0.30000000000000004).
  tick(v, step) {
    if (!isNum(v)) return "";
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(1);
    const digits = step ? Math.max(0, -Math.floor(Math.log10(step) + 1e-9)) : 2;
    return v.toFixed(Math.min(digits, 6));
  },
};

window.Fmt = Fmt;
window.isNum = isNum;
