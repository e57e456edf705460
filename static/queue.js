// queue.js — the queue's pause/resume control, its caps on jobs at once (of all, of a kind), and the schedules panel. A server without
// these routes answers 404: the controls then stay hidden and are not asked for again.

import { apiJSON } from "./api.js";
import { fmtDuration } from "./jobs.js";

const SCHEDULES_MS = 5000;

let queueControl, queueState, queueToggle, capForm, capInput, capDefault, capKind;
let section, link, tbody, fileError, switchError;
let queuePaused = null;
let lastQueue = null;

function renderQueue(paused) {
  queuePaused = paused;
  queueControl.hidden = false;
  queueState.textContent = paused ? "Queue: paused (running jobs finish, queued ones wait)" : "Queue: running";
  queueState.className = paused ? "paused" : "";
  queueToggle.textContent = paused ? "Resume queue" : "Pause queue";
}

/** The kinds offered beside "of all kinds", when the server lists them; the choice kept. */
function renderKinds(kinds) {
  if (!Array.isArray(kinds)) return;
  capKind.hidden = false;
  const offered = [...capKind.options].slice(1).map((o) => o.value);
  if (JSON.stringify(offered) === JSON.stringify(kinds)) return;
  const chosen = capKind.value;
  capKind.replaceChildren(capKind.options[0], ...kinds.map((kind) => new Option(`of ${kind}`, kind)));
  capKind.value = kinds.includes(chosen) ? chosen : "";
}

/** The cap in use, of all or of the kind chosen; left alone while the user types a new one. */
function renderCap(queue, typing = document.activeElement === capInput) {
  capForm.hidden = typeof queue.max_concurrent !== "number";
  if (capForm.hidden) return;
  renderKinds(queue.kinds);
  const kind = capKind.value;
  let cap = queue.max_concurrent;
  let set = queue.max_concurrent_set;
  let said = set
    ? `set while running, kept across restarts; OFFLOAD_MAX_CONCURRENT is ${queue.max_concurrent_default}`
    : "OFFLOAD_MAX_CONCURRENT";
  if (kind) {
    cap = (queue.kind_caps || {})[kind];
    set = (queue.kind_caps_set || []).includes(kind);
    const fallback = (queue.kind_caps_default || {})[kind];
    const without = fallback === undefined ? "without it, no cap of its own" : `OFFLOAD_KIND_CAPS says ${fallback}`;
    said = set ? `set while running, kept across restarts; ${without}`
      : cap === undefined ? "no cap of its own: only the cap on all" : "OFFLOAD_KIND_CAPS";
  }
  capDefault.hidden = !set;
  capDefault.title = kind ? "Back to OFFLOAD_KIND_CAPS" : `OFFLOAD_MAX_CONCURRENT: ${queue.max_concurrent_default}`;
  if (typing) return;
  capInput.value = cap === undefined ? "" : String(cap);
  capInput.placeholder = cap === undefined ? "no cap" : "";
  capInput.title = said;
}

/** Called with /api/health's `queue` ({"paused", "max_concurrent", ...}) when the server has one. */
export function noteQueue(queue) {
  if (queue && typeof queue.paused === "boolean") {
    lastQueue = queue;
    renderQueue(queue.paused);
    renderCap(queue);
  }
}

/** `cap`: a number, or null for the setting's (OFFLOAD_MAX_CONCURRENT, OFFLOAD_KIND_CAPS). */
async function setCap(cap, button) {
  button.disabled = true;
  const kind = capKind.value;
  try {
    const body = kind ? { max_concurrent: cap, kind } : { max_concurrent: cap };
    const r = await apiJSON("/api/queue/cap", { method: "PUT", body });
    capInput.blur();
    if (r.ok && r.data) noteQueue(r.data);
    else queueState.textContent = `Could not change how many jobs run at once: ${r.error || "no answer"}`;
  } finally {
    button.disabled = false;
  }
}

async function toggleQueue() {
  queueToggle.disabled = true;
  try {
    const verb = queuePaused ? "resume" : "pause";
    // A one-off: its failure is said here, not in the banner (that one says "retrying").
    const r = await apiJSON(`/api/queue/${verb}`, { method: "POST" });
    const now = r.ok && r.data && typeof r.data.paused === "boolean" ? r : await apiJSON("/api/queue");
    if (now.ok && now.data && typeof now.data.paused === "boolean") renderQueue(now.data.paused);
    else if (now.status === 404) queueControl.hidden = true;
    else queueState.textContent = `Could not ${verb} the queue: ${r.error || now.error || "no answer"}`;
  } finally {
    queueToggle.disabled = false;
  }
}

function whenText(iso) {
  const ms = Date.parse(iso || "");
  if (Number.isNaN(ms)) return "—";
  const sec = (ms - Date.now()) / 1000;
  return sec > 0 ? `in ${fmtDuration(sec)}` : "due now";
}

function scheduleRow(s) {
  const tr = document.createElement("tr");
  tr.dataset.schedule = s.name;
  tr.dataset.paused = String(Boolean(s.paused));
  const last = s.last_job_id ? `${String(s.last_job_id).slice(0, 8)} · ${s.last_state || "?"}` : "—";
  const when = typeof s.every_s === "number" ? `every ${fmtDuration(s.every_s)}`
    : `${s.cron} (${s.timezone || "UTC"})`;
  const values = [s.name, s.kind, when,
    s.paused ? "paused" : whenText(s.next_run_at), last];
  for (const v of values) {
    const td = document.createElement("td");
    td.textContent = String(v ?? "—");
    tr.append(td);
  }
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "toggle-schedule";
  b.dataset.schedule = s.name;
  b.dataset.action = s.paused ? "resume" : "pause";
  b.textContent = s.paused ? "Resume" : "Pause";
  b.setAttribute("aria-label", `${b.textContent} schedule ${s.name}`);
  td.append(b);
  tr.append(td);
  return tr;
}

const NEXT_RUN_CELL = 3;

/** Rebuilt only when something changed, so focus on a button survives a refresh; the
 * time to the next run is said again at every refresh. */
function renderSchedules(list) {
  const key = JSON.stringify(list.map((s) => [s.name, s.kind, s.every_s, s.cron, s.timezone,
    s.paused, s.next_run_at,
    s.last_job_id, s.last_state]));
  if (tbody.dataset.key === key) {
    for (const s of list) {
      const row = tbody.querySelector(`tr[data-schedule="${CSS.escape(s.name)}"]`);
      if (row) row.cells[NEXT_RUN_CELL].textContent = s.paused ? "paused" : whenText(s.next_run_at);
    }
    return;
  }
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.schedule : undefined;
  tbody.dataset.key = key;
  tbody.replaceChildren(...list.map(scheduleRow));
  if (!list.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = 6;
    td.textContent = "No schedules configured.";
    tr.append(td);
    tbody.append(tr);
  }
  if (focused) tbody.querySelector(`button[data-schedule="${CSS.escape(focused)}"]`)?.focus();
}

/** false once the server said it has no schedules route. */
async function refreshSchedules() {
  const r = await apiJSON("/api/schedules", { source: "schedules" });
  if (r.status === 404) {
    section.hidden = true;
    link.hidden = true;
    return false;
  }
  if (r.ok && r.data && Array.isArray(r.data.schedules)) {
    renderSchedules(r.data.schedules);
    // A change to the schedules file that could not be used: the rows are the last good ones.
    const error = typeof r.data.error === "string" ? r.data.error : "";
    fileError.textContent = error ? `The schedules file's last change is not applied: ${error}` : "";
    fileError.hidden = !error;
    section.hidden = false;
    link.hidden = false;
  }
  return true;
}

async function toggleSchedule(btn) {
  btn.disabled = true;
  const { schedule, action } = btn.dataset;
  const r = await apiJSON(`/api/schedules/${encodeURIComponent(schedule)}/${action}`,
    { method: "POST", source: "schedules" });
  // Refused (a data folder that cannot be written, a schedule gone from the file): said
  // here, where the row alone went on showing it as it was.
  const refused = r.ok || r.status === 0 ? "" : `Could not ${action} schedule ${schedule}: ${r.error}`;
  switchError.textContent = refused;
  switchError.hidden = !refused;
  await refreshSchedules();
  btn.disabled = false;
}

export function initQueue() {
  queueControl = document.getElementById("queue-control");
  queueState = document.getElementById("queue-state");
  queueToggle = document.getElementById("queue-toggle");
  capForm = document.getElementById("queue-cap-form");
  capInput = document.getElementById("queue-cap");
  capDefault = document.getElementById("queue-cap-default");
  capKind = document.getElementById("queue-cap-kind");
  capKind.addEventListener("change", () => { if (lastQueue) renderCap(lastQueue, false); });
  const setButton = capForm.querySelector("button[type=submit]");
  capForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setCap(Number(capInput.value), setButton).catch(() => { setButton.disabled = false; });
  });
  capDefault.addEventListener("click", () => {
    setCap(null, capDefault).catch(() => { capDefault.disabled = false; });
  });
  section = document.getElementById("schedules-section");
  link = document.getElementById("schedules-link");
  tbody = document.querySelector("#schedules-table tbody");
  fileError = document.getElementById("schedules-error");
  switchError = document.getElementById("schedules-switch-error");
  queueToggle.addEventListener("click", () => { toggleQueue().catch(() => { queueToggle.disabled = false; }); });
  tbody.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button.toggle-schedule");
    if (btn) toggleSchedule(btn).catch(() => { btn.disabled = false; });
  });
  apiJSON("/api/queue").then((r) => { if (r.ok) noteQueue(r.data); }).catch(() => {});
  const loop = async () => {
    let again = true;
    try { again = await refreshSchedules(); } catch { /* shown via #net-error */ }
    if (again) setTimeout(loop, SCHEDULES_MS);
  };
  loop();
}
