// chart.js — small canvas 2D line charts. Colours come from CSS variables so the
// charts follow the light/dark theme; callers redraw on resize and theme change.

/** Read a CSS custom property as seen by the element (falls back to `fallback`). */
function cssVar(el, name, fallback) {
  const v = getComputedStyle(el).getPropertyValue(name).trim();
  return v || fallback;
}

/**
 * Size the canvas backing store to its CSS box times devicePixelRatio and return
 * a context scaled so drawing uses CSS pixels. Returns null if not visible.
 */
function prepare(canvas) {
  const rect = canvas.getBoundingClientRect();
  const w = Math.max(1, Math.round(rect.width));
  const h = Math.max(1, Math.round(rect.height));
  if (rect.width === 0 || rect.height === 0) return null;
  const dpr = window.devicePixelRatio || 1;
  const bw = Math.round(w * dpr);
  const bh = Math.round(h * dpr);
  if (canvas.width !== bw || canvas.height !== bh) {
    canvas.width = bw;
    canvas.height = bh;
  }
  const ctx = canvas.getContext("2d");
  if (!ctx) return null;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function colours(canvas) {
  return {
    bg: cssVar(canvas, "--chart-bg", "#fff"),
    grid: cssVar(canvas, "--chart-grid", "#ddd"),
    text: cssVar(canvas, "--chart-text", "#333"),
    cpu: cssVar(canvas, "--chart-cpu", "#1f6feb"),
    mem: cssVar(canvas, "--chart-mem", "#c2410c"),
    loss: cssVar(canvas, "--chart-loss", "#15803d"),
  };
}

/** Draw one polyline; points are [x, y] in canvas pixels, null where it breaks off. */
function line(ctx, points, colour, dashed) {
  if (points.length === 0) return;
  ctx.save();
  ctx.strokeStyle = colour;
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  ctx.setLineDash(dashed ? [6, 4] : []);
  ctx.beginPath();
  let run = 0;  // points drawn since the line last broke off
  for (const point of points) {
    if (point === null) {
      run = 0;
      continue;
    }
    if (run === 0) ctx.moveTo(point[0], point[1]);
    else ctx.lineTo(point[0], point[1]);
    run += 1;
  }
  // A point alone (the first after a gap, say) is drawn as a dot.
  points.forEach((point, i) => {
    if (point && !points[i - 1] && !points[i + 1]) {
      ctx.moveTo(point[0], point[1]);
      ctx.lineTo(point[0] + 1, point[1]);
    }
  });
  ctx.stroke();
  ctx.restore();
}

// Samples come about every second: more than this between two, none was taken (Offload
// was stopped), and no line is drawn across.
const GAP_S = 5;

/** The points of `key` of the samples, broken off where samples are missing. */
function pointsOf(samples, key, xOf, yOf) {
  const points = [];
  samples.forEach((s, i) => {
    if (i > 0 && s.t - samples[i - 1].t > GAP_S) points.push(null);
    points.push([xOf(s.t), yOf(s[key])]);
  });
  return points;
}

const clampPct = (v) => Math.max(0, Math.min(100, Number(v) || 0));

/**
 * History chart: CPU % and memory % over the last `windowS` seconds, y axis 0–100 %.
 * `forecast` (optional) = {from_t, interval_s, cpu: [], mem: []} drawn dashed after
 * the last sample. Returns true when a forecast was drawn.
 */
export function drawHistory(canvas, samples, forecast, windowS = 300) {
  const p = prepare(canvas);
  if (!p) return false;
  const { ctx, w, h } = p;
  const c = colours(canvas);
  const font = `12px ${cssVar(canvas, "--font", "system-ui, sans-serif")}`;
  const pad = { l: 44, r: 12, t: 26, b: 24 };
  const pw = Math.max(10, w - pad.l - pad.r);
  const ph = Math.max(10, h - pad.t - pad.b);

  ctx.fillStyle = c.bg;
  ctx.fillRect(0, 0, w, h);

  // Time range: the window ends at the last sample (or now); a forecast extends it.
  const lastT = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
  let tEnd = lastT;
  const fc = forecast && Array.isArray(forecast.cpu) ? forecast : null;
  const step = fc ? Number(fc.interval_s) || 1 : 1;
  if (fc) tEnd = Math.max(tEnd, fc.from_t + step * Math.max(fc.cpu.length, (fc.mem || []).length));
  const tStart = lastT - windowS;
  const span = Math.max(1, tEnd - tStart);
  const xOf = (t) => pad.l + ((t - tStart) / span) * pw;
  const yOf = (v) => pad.t + ph - (clampPct(v) / 100) * ph;

  // Grid and y axis labels every 25 %.
  ctx.font = font;
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  ctx.lineWidth = 1;
  for (let v = 0; v <= 100; v += 25) {
    const y = Math.round(yOf(v)) + 0.5;
    ctx.strokeStyle = c.grid;
    ctx.beginPath();
    ctx.moveTo(pad.l, y);
    ctx.lineTo(pad.l + pw, y);
    ctx.stroke();
    ctx.fillStyle = c.text;
    ctx.fillText(`${v}%`, pad.l - 6, y);
  }
  // x axis labels: seconds relative to the last sample.
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const ticks = [-windowS, -windowS * 2 / 3, -windowS / 3, 0];
  if (tEnd > lastT + 1) ticks.push(Math.round(tEnd - lastT));
  for (const rel of ticks) {
    const x = xOf(lastT + rel);
    const label = rel === 0 ? "now" : rel > 0 ? `+${Math.round(rel)}s` : `${Math.round(rel)}s`;
    ctx.fillText(label, Math.min(Math.max(x, pad.l + 12), pad.l + pw - 12), pad.t + ph + 6);
  }
  // Axes.
  ctx.strokeStyle = c.text;
  ctx.beginPath();
  ctx.moveTo(pad.l + 0.5, pad.t);
  ctx.lineTo(pad.l + 0.5, pad.t + ph + 0.5);
  ctx.lineTo(pad.l + pw, pad.t + ph + 0.5);
  ctx.stroke();

  // Data.
  const visible = samples.filter((s) => s.t >= tStart);
  line(ctx, pointsOf(visible, "cpu", xOf, yOf), c.cpu, false);
  line(ctx, pointsOf(visible, "mem", xOf, yOf), c.mem, false);

  let drew = false;
  if (fc) {
    // Start each dashed line at the last real sample so it visibly continues it.
    const last = samples.length ? samples[samples.length - 1] : null;
    const series = (key) => {
      const pts = last ? [[xOf(last.t), yOf(last[key])]] : [];
      (fc[key] || []).forEach((v, i) => {
        const t = fc.from_t + step * (i + 1);
        if (!last || t > last.t) pts.push([xOf(t), yOf(v)]);
      });
      return pts;
    };
    const cpuPts = series("cpu");
    const memPts = series("mem");
    line(ctx, cpuPts, c.cpu, true);
    line(ctx, memPts, c.mem, true);
    drew = cpuPts.length > 1 || memPts.length > 1;
  }

  // Legend (top left).
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let lx = pad.l;
  const entry = (label, colour, dashed) => {
    ctx.save();
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.setLineDash(dashed ? [6, 4] : []);
    ctx.beginPath();
    ctx.moveTo(lx, 12);
    ctx.lineTo(lx + 18, 12);
    ctx.stroke();
    ctx.restore();
    ctx.fillStyle = c.text;
    ctx.fillText(label, lx + 22, 12);
    lx += 30 + ctx.measureText(label).width;
  };
  entry("CPU %", c.cpu, false);
  entry("Memory %", c.mem, false);
  if (drew) entry("forecast", c.text, true);
  return drew;
}

/** Loss chart: one line, y axis scaled to the data (min..max). */
export function drawLoss(canvas, curve) {
  const p = prepare(canvas);
  if (!p) return;
  const { ctx, w, h } = p;
  const c = colours(canvas);
  const pad = { l: 48, r: 8, t: 10, b: 20 };
  const pw = Math.max(10, w - pad.l - pad.r);
  const ph = Math.max(10, h - pad.t - pad.b);
  ctx.fillStyle = c.bg;
  ctx.fillRect(0, 0, w, h);
  ctx.font = `11px ${cssVar(canvas, "--font", "system-ui, sans-serif")}`;
  ctx.fillStyle = c.text;
  ctx.strokeStyle = c.text;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(pad.l + 0.5, pad.t);
  ctx.lineTo(pad.l + 0.5, pad.t + ph + 0.5);
  ctx.lineTo(pad.l + pw, pad.t + ph + 0.5);
  ctx.stroke();

  const values = (curve || []).map(Number).filter((v) => Number.isFinite(v));
  if (values.length === 0) {
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("no loss data yet", pad.l + pw / 2, pad.t + ph / 2);
    return;
  }
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-12) { hi += 1; lo -= 1; }
  const xOf = (i) => pad.l + (values.length === 1 ? 0 : (i / (values.length - 1)) * pw);
  const yOf = (v) => pad.t + ph - ((v - lo) / (hi - lo)) * ph;
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2));
  ctx.textAlign = "right";
  ctx.textBaseline = "top";
  ctx.fillText(fmt(hi), pad.l - 4, pad.t);
  ctx.textBaseline = "bottom";
  ctx.fillText(fmt(lo), pad.l - 4, pad.t + ph);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.fillText(`epoch ${values.length}`, pad.l + pw / 2, pad.t + ph + 4);
  line(ctx, values.map((v, i) => [xOf(i), yOf(v)]), c.loss, false);
}
