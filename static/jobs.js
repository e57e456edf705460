// jobs.js — the jobs table (refreshed every 2 s), its log viewer and cancel buttons.
// Rows are updated in place (keyed by job id) so keyboard focus survives refreshes.

import { apiJSON, apiText } from "./api.js";

const REFRESH_MS = 2000;
const ACTIVE = new Set(["queued", "running"]);
const COLUMNS = 10; // the cells, then the actions

let tbody, dialog, viewer, title;

/** ISO string or unix seconds -> ms since epoch, or null. */
function toMs(v) {
  if (v === null || v === undefined || v === "") return null;
  if (typeof v === "number") return v < 1e12 ? v * 1000 : v;
  const ms = Date.parse(v);
  return Number.isNaN(ms) ? null : ms;
}

export function fmtDuration(sec) {
  if (sec === null || !Number.isFinite(sec)) return "—";
  sec = Math.max(0, Math.round(sec));
  if (sec < 60) return `${sec}s`;
  if (sec < 3600) return `${Math.floor(sec / 60)}m ${sec % 60}s`;
  return `${Math.floor(sec / 3600)}h ${Math.floor((sec % 3600) / 60)}m`;
}

function num(v, digits) {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "—";
}

/** Where the job ran: its launcher ("local" or "ray") and the runner's machine. */
export function where(job) {
  if (!job.launcher) return "—";
  return job.host ? `${job.launcher} · ${job.host}` : job.launcher;
}

/** A completed chat's tokens: prompt → reply, and the reply's rate; "~": counted here. */
export function tokens(job) {
  const u = job.kind === "chat" && job.result && job.result.usage;
  if (!u || typeof u.completion_tokens !== "number") return "—";
  const approx = u.counted ? "~" : "";
  const rate = typeof u.tokens_per_s === "number" ? ` · ${num(u.tokens_per_s, 1)}/s` : "";
  return `${approx}${u.prompt_tokens ?? "?"} → ${approx}${u.completion_tokens}${rate}`;
}

function cells(job) {
  const now = Date.now();
  const created = toMs(job.created_at);
  const started = toMs(job.started_at);
  const finished = toMs(job.finished_at);
  const res = job.resources || {};
  let duration = null;
  if (started !== null) duration = ((finished ?? now) - started) / 1000;
  return [
    job.kind || "—",
    job.state || "—",
    where(job),
    created === null ? "—" : `${fmtDuration((now - created) / 1000)} ago`,
    fmtDuration(duration),
    num(res.cpu_s, 1),
    num(res.peak_rss_mb, 0),
    tokens(job),
    job.queue_position === null || job.queue_position === undefined ? "—" : String(job.queue_position),
  ];
}

function makeButton(text, cls, jobId, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.dataset.jobId = jobId;
  b.setAttribute("aria-label", label);
  return b;
}

function renderActions(td, job) {
  td.textContent = "";
  td.append(makeButton("Log", "show-log", job.id, `Show log of ${job.kind} job ${job.id}`));
  if (ACTIVE.has(job.state)) {
    td.append(" ", makeButton("Cancel", "cancel-job", job.id, `Cancel ${job.kind} job ${job.id}`));
  }
}

function updateRow(tr, job) {
  const values = cells(job);
  const tds = tr.children;
  values.forEach((v, i) => {
    if (tds[i].textContent !== v) tds[i].textContent = v;
  });
  tds[1].className = `state state-${job.state}`;
  if (tr.dataset.state !== job.state) {
    // Only rebuild the buttons when the state changes (keeps focus stable).
    const hadFocus = tr.contains(document.activeElement);
    tr.dataset.state = job.state;
    renderActions(tds[COLUMNS - 1], job);
    if (hadFocus) tds[COLUMNS - 1].querySelector("button").focus();
  }
}

function render(jobs) {
  const existing = new Map([...tbody.querySelectorAll("tr[data-job-id]")].map((tr) => [tr.dataset.jobId, tr]));
  const rows = jobs.map((job) => {
    let tr = existing.get(job.id);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.jobId = job.id;
      for (let i = 0; i < COLUMNS; i++) tr.append(document.createElement("td"));
    }
    existing.delete(job.id);
    updateRow(tr, job);
    return tr;
  });
  for (const tr of existing.values()) tr.remove();
  const empty = tbody.querySelector("tr.empty");
  if (rows.length === 0) {
    if (!empty) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = document.createElement("td");
      td.colSpan = COLUMNS;
      td.textContent = "No jobs yet.";
      tr.append(td);
      tbody.append(tr);
    }
    return;
  }
  if (empty) empty.remove();
  // Re-order only if needed: moving a node can drop keyboard focus.
  const current = [...tbody.children];
  if (current.length !== rows.length || rows.some((tr, i) => current[i] !== tr)) {
    const focused = document.activeElement;
    rows.forEach((tr) => tbody.append(tr));
    if (focused && tbody.contains(focused) && document.activeElement !== focused) focused.focus();
  }
}

async function refresh() {
  const r = await apiJSON("/api/jobs?limit=50", { source: "jobs" });
  if (r.ok && r.data && Array.isArray(r.data.jobs)) render(r.data.jobs);
}

async function showLog(jobId) {
  title.textContent = `Log of job ${jobId}`;
  viewer.textContent = "Loading…";
  if (typeof dialog.showModal === "function") {
    if (!dialog.open) {
      try { dialog.showModal(); } catch { dialog.setAttribute("open", ""); }
    }
  } else {
    dialog.setAttribute("open", "");
  }
  const r = await apiText(`/api/jobs/${encodeURIComponent(jobId)}/log`);
  viewer.textContent = r.ok ? (r.text || "(the log is empty)") : `Could not load the log: ${r.text}`;
}

async function cancelJob(btn) {
  btn.disabled = true;
  const r = await apiJSON(`/api/jobs/${encodeURIComponent(btn.dataset.jobId)}`, { method: "DELETE", source: "jobs" });
  if (!r.ok && r.status !== 409) btn.disabled = false;
  await refresh();
}

export function initJobs() {
  tbody = document.querySelector("#jobs-table tbody");
  dialog = document.getElementById("log-dialog");
  viewer = document.getElementById("log-viewer");
  title = document.getElementById("log-title");
  let opener = null;

  document.getElementById("jobs-table").addEventListener("click", (ev) => {
    const btn = ev.target.closest("button");
    if (!btn) return;
    if (btn.classList.contains("show-log")) {
      opener = btn;
      showLog(btn.dataset.jobId).catch(() => {});
    } else if (btn.classList.contains("cancel-job")) {
      cancelJob(btn).catch(() => {});
    }
  });
  document.getElementById("log-close").addEventListener("click", () => {
    if (dialog.open && typeof dialog.close === "function") dialog.close();
    else dialog.removeAttribute("open");
  });
  // Return focus to the button that opened the log.
  dialog.addEventListener("close", () => {
    if (opener && document.contains(opener)) opener.focus();
  });

  const loop = async () => {
    try { await refresh(); } catch { /* shown via #net-error */ }
    setTimeout(loop, REFRESH_MS);
  };
  loop();
}

export { refresh as refreshJobs };
