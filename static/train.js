// train.js — start a training job, follow its progress and loss curve, and fetch
// the forecast once a model exists.

import { apiJSON, followJob, FINAL_STATES } from "./api.js";
import { drawLoss } from "./chart.js";

let startBtn, progressEl, statusEl, lossCanvas;
let lossCurve = [];
let following = null;       // id of the training job being followed, or "submitting"
let onForecast = () => {};
let history = null;         // {kept, needs, intervalS}: what /api/history says of the samples

/** Seconds until a training run has enough history (0: it has), or null before we know. */
function historyWaitS() {
  if (!history) return null;
  return Math.max(0, history.needs - history.kept) * history.intervalS;
}

function fmtWait(sec) {
  return sec < 60 ? `${Math.ceil(sec)} s` : `${Math.ceil(sec / 60)} min`;
}

/** The Train button: busy while a run is followed, waiting while history is short. */
function renderStart() {
  const wait = historyWaitS();
  let label = "Train model";
  if (!following && wait === null) label = "Train model (checking history…)";
  else if (!following && wait > 0) label = `Train (enough history in ${fmtWait(wait)})`;
  if (startBtn.textContent !== label) startBtn.textContent = label;
  startBtn.disabled = Boolean(following) || wait === null || wait > 0;
}

/** Called with every /api/history answer's `metrics`. */
export function noteHistory(metrics) {
  if (!metrics || typeof metrics.kept !== "number" || typeof metrics.train_needs !== "number") return;
  history = { kept: metrics.kept, needs: metrics.train_needs, intervalS: metrics.interval_s || 1 };
  if (startBtn) renderStart();
}

export function redrawLoss() {
  if (lossCanvas) drawLoss(lossCanvas, lossCurve);
}

/**
 * GET /api/predict. `quiet` (page load, periodic refresh): say nothing on 409.
 * Returns the forecast or null.
 */
export async function fetchForecast(quiet) {
  // No `source`: a one-off, said in the status line (a banner would say "retrying" for good).
  const r = await apiJSON("/api/predict?horizon=60");
  if (r.ok && r.data && Array.isArray(r.data.cpu)) {
    onForecast(r.data);
    return r.data;
  }
  if (!quiet) {
    if (r.status === 409) statusEl.textContent = r.error;
    else statusEl.textContent = `${statusEl.textContent} (forecast unavailable: ${r.error})`;
  }
  return null;
}

function applyJob(job) {
  if (!job) return;
  const prog = job.progress || null;
  if (prog && typeof prog.fraction === "number") progressEl.value = Math.max(0, Math.min(1, prog.fraction));
  if (prog && prog.message && !FINAL_STATES.has(job.state)) statusEl.textContent = prog.message;
  else if (job.state === "queued") statusEl.textContent = `queued${job.queue_position != null ? ` (position ${job.queue_position})` : ""}`;
  if (Array.isArray(job.loss_curve) && job.loss_curve.length !== lossCurve.length) {
    lossCurve = job.loss_curve.slice();
    redrawLoss();
  }
}

async function finishJob(job) {
  following = null;
  renderStart();
  progressEl.removeAttribute("aria-busy");
  if (job.state === "completed") {
    progressEl.value = 1;
    statusEl.textContent = "completed";
    await fetchForecast(false);
  } else if (job.state === "cancelled") {
    statusEl.textContent = "cancelled";
  } else {
    const msg = job.error && job.error.message ? job.error.message : job.state;
    statusEl.textContent = `${job.state}: ${msg}`;
  }
}

/** Follow a training job by its event stream, falling back to polling the job. */
async function follow(jobId) {
  following = jobId;
  renderStart();
  let final = null;
  const onJob = (job) => {
    applyJob(job);
    if (FINAL_STATES.has(job.state)) final = job;
  };
  try {
    await followJob(`/api/jobs/${encodeURIComponent(jobId)}/events`, { onJob, source: "train" });
  } catch { /* fall back to polling below */ }
  while (!final && following === jobId) {
    const r = await apiJSON(`/api/jobs/${encodeURIComponent(jobId)}`, { source: "train" });
    if (r.ok && r.data) {
      applyJob(r.data);
      if (FINAL_STATES.has(r.data.state)) final = r.data;
    } else if (r.status === 404) {
      final = { state: "failed", error: { message: "the job disappeared" } };
    }
    if (!final) await new Promise((res) => setTimeout(res, 1000));
  }
  if (final) await finishJob(final);
}

async function start() {
  // A run without enough history fails at once: never submit one.
  if (following || historyWaitS() !== 0) { renderStart(); return; }
  following = "submitting";
  renderStart();
  lossCurve = [];
  redrawLoss();
  progressEl.value = 0;
  statusEl.textContent = "starting…";
  const r = await apiJSON("/api/jobs", {
    method: "POST",
    body: { kind: "train", input: { epochs: 200 } },
    source: "train",
  });
  if (!r.ok || !r.data || !r.data.id) {
    statusEl.textContent = `Error: ${r.error || "no job id returned"}`;
    following = null;
    renderStart();
    return;
  }
  statusEl.textContent = "queued";
  await follow(r.data.id);
}

export function initTrain(options = {}) {
  if (options.onForecast) onForecast = options.onForecast;
  startBtn = document.getElementById("train-start");
  progressEl = document.getElementById("train-progress");
  statusEl = document.getElementById("train-status");
  lossCanvas = document.getElementById("loss-chart");
  startBtn.addEventListener("click", () => {
    start().catch(() => { following = null; renderStart(); });
  });
  renderStart();
  redrawLoss();

  // On load: resume a training job that is still active (the model's forecast is asked
  // for once /api/health names one).
  (async () => {
    const r = await apiJSON("/api/jobs?kind=train&state=queued&state=running&limit=1&fields=summary");
    const active = r.ok && r.data && Array.isArray(r.data.jobs) ? r.data.jobs[0] : null;
    if (active && !following) await follow(active.id);
  })().catch(() => {});
}
