// app.js — entry point: live history chart (1 s), status panel (5 s), and wiring of
// the chat, jobs, queue and training modules.

import { apiJSON, initTokenBar } from "./api.js";
import { drawHistory } from "./chart.js";
import { initChat } from "./chat.js";
import { initJobs } from "./jobs.js";
import { initQueue, noteQueue } from "./queue.js";
import { initTrain, redrawLoss, fetchForecast, noteHistory } from "./train.js";

const HISTORY_MS = 1000;
const HEALTH_MS = 5000;
const FORECAST_REFRESH_MS = 30000; // re-anchor the forecast on recent samples
const LATE_S = 3;
const STATES = ["queued", "running", "completed", "failed", "cancelled", "timeout"];

const historyCanvas = document.getElementById("history-chart");
const ageEl = document.getElementById("history-age");
const countsEl = document.getElementById("job-counts");
const statusEl = document.getElementById("status");

let samples = [];
let forecast = null;
let forecastAsked = null; // the model version a forecast was last asked of
let updates = 0;
let lastUpdate = 0;
const pageStart = Date.now();

// ---- history chart -----------------------------------------------------------

function redrawHistory() {
  const drew = drawHistory(historyCanvas, samples, forecast);
  if (drew && forecast) historyCanvas.dataset.forecast = String(forecast.version ?? "");
}

function renderCounts(counts) {
  if (!counts) return;
  countsEl.textContent = "";
  for (const state of STATES) {
    const li = document.createElement("li");
    li.dataset.state = state;
    const n = document.createElement("strong");
    n.textContent = String(counts[state] ?? 0);
    li.append(n, ` ${state}`);
    countsEl.append(li);
  }
}

async function refreshHistory() {
  const r = await apiJSON("/api/history?seconds=300&jobs=20", { source: "history" });
  if (!r.ok || !r.data) return;
  const m = r.data.metrics || {};
  samples = Array.isArray(m.samples) ? m.samples.filter((s) => s && Number.isFinite(s.t)) : [];
  noteHistory(m);
  renderCounts(r.data.counts);
  redrawHistory();
  updates += 1;
  historyCanvas.dataset.updates = String(updates);
  lastUpdate = Date.now();
  renderAge();
}

function renderAge() {
  const since = lastUpdate ? lastUpdate : pageStart;
  const secs = Math.floor((Date.now() - since) / 1000);
  ageEl.textContent = lastUpdate ? `updated ${secs}s ago` : "waiting for data…";
  ageEl.classList.toggle("late", (Date.now() - since) / 1000 > LATE_S);
}

// ---- status panel ------------------------------------------------------------

function setField(name, text, cls) {
  const el = statusEl.querySelector(`[data-field="${name}"]`);
  if (!el) return;
  el.textContent = text;
  if (cls !== undefined) el.className = cls;
}

let healthAt = null; // when the panel's figures were read

/** While the server cannot be asked, the panel says its figures are old, and how old. */
function markHealthStale(stale) {
  const note = document.getElementById("status-stale");
  statusEl.classList.toggle("stale", stale);
  note.hidden = !stale;
  note.textContent = !stale ? ""
    : healthAt ? `As of ${healthAt.toLocaleTimeString()}: newer figures could not be read.`
      : "The figures could not be read.";
}

async function refreshHealth() {
  const r = await apiJSON("/api/health", { source: "health" });
  if (!r.ok || !r.data) {
    markHealthStale(true);
    return;
  }
  healthAt = new Date();
  markHealthStale(false);
  const h = r.data;
  const llm = h.llm || {};
  setField("provider", llm.provider || "—");
  setField("model", llm.model || "—");
  if (llm.ready) setField("ready", "ready", "ok");
  else setField("ready", llm.detail ? `not ready — ${llm.detail}` : "not ready", "warn");
  setField("running", String(h.running ?? "—"));
  setField("queued", String(h.queued ?? "—"));
  setField("max", String(h.max_concurrent ?? "—"));
  setField("version", String(h.version ?? "—"));
  const model = h.forecast_version;
  setField("forecast", model == null ? "none yet (Train model)" : `version ${model}`);
  // Trained here or elsewhere (the CLI, another page): its forecast is drawn, asked once
  // a version (the 30 s refresh asks again where it could not be made).
  if (model != null && model !== forecastAsked) {
    forecastAsked = model;
    fetchForecast(true).catch(() => {});
  } else if (model == null && forecast) {  // its model removed: no forecast of it drawn
    forecast = null;
    forecastAsked = null;
    delete historyCanvas.dataset.forecast;
    redrawHistory();
  }
  // A full disk or a data folder that cannot be written: new jobs are refused meanwhile.
  if (Array.isArray(h.problems)) {
    setField("storage", h.problems.length ? h.problems.join("; ") : "ok", h.problems.length ? "warn" : "ok");
  }
  noteQueue(h.queue);
}

// ---- loops -------------------------------------------------------------------

/** setTimeout loop: the next run starts only after the previous one finished. */
function every(ms, fn) {
  const run = async () => {
    try { await fn(); } catch { /* errors are shown in #net-error */ }
    setTimeout(run, ms);
  };
  run();
}

function init() {
  historyCanvas.dataset.updates = "0";
  initTokenBar();
  initChat();
  initJobs();
  initQueue();
  initTrain({
    onForecast: (f) => {
      forecast = f;
      redrawHistory();
    },
  });

  every(HISTORY_MS, refreshHistory);
  every(HEALTH_MS, refreshHealth);
  setInterval(renderAge, 500);
  setInterval(() => {
    if (forecast || forecastAsked != null) fetchForecast(true).catch(() => {});
  }, FORECAST_REFRESH_MS);

  // Redraw charts on resize and when the colour scheme changes.
  const redrawAll = () => { redrawHistory(); redrawLoss(); };
  if (typeof ResizeObserver === "function") {
    const ro = new ResizeObserver(() => redrawAll());
    ro.observe(historyCanvas);
    ro.observe(document.getElementById("loss-chart"));
  } else {
    window.addEventListener("resize", redrawAll);
  }
  const mq = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  if (mq && mq.addEventListener) mq.addEventListener("change", redrawAll);
}

init();
