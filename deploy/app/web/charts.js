// Small SVG charts for the dashboard (no library: the page must work offline and load nothing from elsewhere).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = { champion: "#1a7f37", challenger: "#b7791f", rejected: "#c0362c", failed: "#c0362c",
                 retired: "#8a94a6", candidate: "#2f6fed", passed: "#2f6fed", line1: "#2f6fed", line2: "#b7791f" };

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function frame(container, height) {
  container.textContent = "";
  const width = Math.max(container.clientWidth || 360, 240);
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  container.appendChild(svg);
  return { svg, width, height, pad: { l: 36, r: 10, t: 10, b: 22 } };
}

function scale(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

function axes(f, y0, y1, yTicks, xLabels) {
  const { svg, width, height, pad } = f;
  const y = scale(y0, y1, height - pad.b, pad.t);
  for (const t of yTicks) {
    svg.appendChild(svgEl("line", { x1: pad.l, x2: width - pad.r, y1: y(t), y2: y(t), stroke: "#e6e9ef" }));
    svg.appendChild(svgEl("text", { x: pad.l - 4, y: y(t) + 3, "text-anchor": "end" }, String(+t.toFixed(2))));
  }
  for (const [x, label] of xLabels) svg.appendChild(svgEl("text", { x, y: height - 6, "text-anchor": "middle" }, label));
  return y;
}

function empty(container, text) {
  container.textContent = "";
  const p = document.createElement("p");
  p.className = "muted";
  p.textContent = text;
  container.appendChild(p);
}

// series: [{name, color, points: [[x, y], ...]}]; x numeric (round id), y in [yMin, yMax]
function lineChart(container, series, { yMin = 0, yMax = null, height = 180 } = {}) {
  const pts = series.flatMap((s) => s.points.filter((p) => p[1] !== null && !Number.isNaN(p[1])));
  if (!pts.length) return empty(container, "nothing yet");
  const f = frame(container, height);
  const xs = pts.map((p) => p[0]);
  const top = yMax ?? Math.max(...pts.map((p) => p[1])) * 1.1;
  const x = scale(Math.min(...xs), Math.max(...xs), f.pad.l + 8, f.width - f.pad.r - 8);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((t) => yMin + t * (top - yMin));
  const y = axes(f, yMin, top, ticks, [...new Set(xs)].map((v) => [x(v), String(v)]));
  series.forEach((s, i) => {
    const ok = s.points.filter((p) => p[1] !== null && !Number.isNaN(p[1]));
    const color = s.color || (i ? COLORS.line2 : COLORS.line1);
    f.svg.appendChild(svgEl("polyline", { points: ok.map((p) => `${x(p[0])},${y(p[1])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
    for (const p of ok) {
      const dot = svgEl("circle", { cx: x(p[0]), cy: y(p[1]), r: 3, fill: color });
      dot.appendChild(svgEl("title", {}, `${s.name} ${p[0]}: ${p[1].toFixed(3)}`));
      f.svg.appendChild(dot);
    }
    f.svg.appendChild(svgEl("text", { x: f.pad.l + 6 + i * 110, y: f.pad.t + 8, fill: color, style: `fill:${color}` }, s.name));
  });
}

// values: [{label, value}]
function barChart(container, values, { height = 160 } = {}) {
  if (!values.length) return empty(container, "nothing yet");
  const f = frame(container, height);
  const top = Math.max(1, ...values.map((v) => v.value));
  const y = axes(f, 0, top, [0, top / 2, top].map(Math.round), []);
  const w = (f.width - f.pad.l - f.pad.r) / values.length;
  values.forEach((v, i) => {
    const bar = svgEl("rect", { x: f.pad.l + i * w + 1, y: y(v.value), width: Math.max(w - 2, 1), height: y(0) - y(v.value), fill: COLORS.line1 });
    bar.appendChild(svgEl("title", {}, `${v.label}: ${v.value}`));
    f.svg.appendChild(bar);
  });
  f.svg.appendChild(svgEl("text", { x: f.pad.l, y: f.height - 6 }, values[0].label));
  f.svg.appendChild(svgEl("text", { x: f.width - f.pad.r, y: f.height - 6, "text-anchor": "end" }, values[values.length - 1].label));
}

// A win rate with its interval, on [0, 1], with the 0.5 line
function intervalChart(container, rate, lower, upper, { height = 54 } = {}) {
  const f = frame(container, height);
  const x = scale(0, 1, f.pad.l, f.width - f.pad.r);
  const mid = 22;
  f.svg.appendChild(svgEl("line", { x1: x(0), x2: x(1), y1: mid, y2: mid, stroke: "#e6e9ef", "stroke-width": 8 }));
  f.svg.appendChild(svgEl("line", { x1: x(lower), x2: x(upper), y1: mid, y2: mid, stroke: COLORS.challenger, "stroke-width": 8 }));
  if (rate !== null) f.svg.appendChild(svgEl("circle", { cx: x(rate), cy: mid, r: 6, fill: COLORS.champion }));
  f.svg.appendChild(svgEl("line", { x1: x(0.5), x2: x(0.5), y1: 8, y2: 36, stroke: "#667085", "stroke-dasharray": "3,3" }));
  for (const t of [0, 0.5, 1]) f.svg.appendChild(svgEl("text", { x: x(t), y: 50, "text-anchor": "middle" }, String(t)));
}

// points: [{t: Date, version, status, name}]
function versionChart(container, points, { height = 180 } = {}) {
  if (!points.length) return empty(container, "no adapter yet: the base model serves");
  const f = frame(container, height);
  const ts = points.map((p) => p.t.getTime());
  const vs = points.map((p) => p.version);
  const x = scale(Math.min(...ts), Math.max(...ts), f.pad.l + 10, f.width - f.pad.r - 10);
  const top = Math.max(...vs) + 1;
  const y = axes(f, 0, top, [...Array(Math.min(top, 6) + 1).keys()].map((i) => (i * top) / Math.min(top, 6)),
    [[f.pad.l + 10, points[0].t.toLocaleTimeString()], [f.width - f.pad.r - 10, points[points.length - 1].t.toLocaleTimeString()]]);
  for (const p of points) {
    const dot = svgEl("circle", { cx: x(p.t.getTime()), cy: y(p.version), r: 5, fill: COLORS[p.status] || "#8a94a6" });
    dot.appendChild(svgEl("title", {}, `${p.name}: ${p.status}`));
    f.svg.appendChild(dot);
  }
}
