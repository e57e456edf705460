// jobs.js — the jobs table (refreshed every 2 s): its filters, log viewer, cancel (one or
// several), re-run dialog, and the notes on retries, start times and priorities.
// Rows are updated in place (keyed by job id) so keyboard focus survives refreshes.

import { apiJSON, apiText, FINAL_STATES } from "./api.js";

const REFRESH_MS = 2000;
const LIMIT = 50;       // jobs listed at first, and more each time older ones are asked for
const MAX_LIMIT = 1000;  // the most the server lists at once
const ACTIVE = new Set(["queued", "running"]);
// The server's default priorities (issue 18: chat 10, every other kind 0): others are shown.
const DEFAULT_PRIORITY = { chat: 10 };
const COLUMNS = ["select", "kind", "state", "notes", "where", "age", "duration", "cpu",
  "peak", "tokens", "queue", "actions"];

let tbody, dialog, viewer, title, note, cancelSelectedBtn, selectAll;
let filterKind, filterState, filterText;
let jobs = [];               // the last list the server answered, before the text filter
const selected = new Set();  // ids of the live jobs ticked for "Cancel selected"
let refreshSeq = 0;          // answers to an older filter are dropped
let limit = LIMIT;           // how many of the newest jobs are listed
let older = false;           // whether the server holds older jobs that match, not listed
let olderBtn;

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

/** A time to come, in words: "12 s", "4 min", "2 h 5 min". */
function fmtIn(sec) {
  sec = Math.max(0, Math.ceil(sec));
  if (sec < 60) return `${sec} s`;
  const min = Math.round(sec / 60);
  if (min < 60) return `${min} min`;
  return min % 60 ? `${Math.floor(min / 60)} h ${min % 60} min` : `${min / 60} h`;
}

function num(v, digits) {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "—";
}

function shortId(id) {
  return typeof id === "string" ? id.slice(0, 8) : "?";
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

const ENDED_BADLY = new Set(["failed", "timeout"]);  // a lost job is `failed`

/** An error in a few words: its type and the start of its message. */
function errorWords(e) {
  const message = e && typeof e.message === "string" ? e.message : "";
  const short = message.length > 80 ? `${message.slice(0, 79)}…` : message;
  return [(e && e.type) || "error", short].filter(Boolean).join(": ");
}

/** A cap holding a job back: `full` with jobs running, or to be by those queued before it
 * (`roomOf` the cap's name), as the CLI says it. */
function heldBy(waits, cap, full, roomOf) {
  const running = waits.running;
  if (typeof cap !== "number" || typeof running !== "number" || running >= cap) {
    return `held: ${full}`;
  }
  return `held: ${roomOf} (${running ? `${running} running, ` : ""}${cap - running} queued before it)`;
}

/** Why it ended (failed, lost, timed out), retries, a start time to come, a priority that
 * is not the default, and the job's origin. */
export function notes(job, now = Date.now()) {
  const parts = [];
  // A timeout's log is empty: the job's own error is the only place that says why.
  if (ENDED_BADLY.has(job.state) && job.error) parts.push(errorWords(job.error));
  const attempt = typeof job.attempt === "number" ? job.attempt : 1;
  const earlier = Array.isArray(job.earlier_errors) ? job.earlier_errors : [];
  if (attempt > 1 || earlier.length) {
    parts.push(typeof job.max_attempts === "number"
      ? `attempt ${attempt} of ${job.max_attempts}` : `attempt ${attempt}`);
  }
  const runAt = toMs(job.run_at);
  if (job.state === "queued" && runAt !== null && runAt > now) {
    const wait = (runAt - now) / 1000;
    parts.push(attempt > 1 ? `retrying in ${Math.ceil(wait)} s` : `starts in ${fmtIn(wait)}`);
  }
  if (earlier.length) {
    parts.push(`earlier: ${earlier.map(errorWords).join("; ")}`);
  }
  if (typeof job.priority === "number" && job.priority !== (DEFAULT_PRIORITY[job.kind] ?? 0)) {
    parts.push(`priority ${job.priority}`);
  }
  if (job.schedule) parts.push(`schedule ${job.schedule}`);
  if (job.rerun_of) parts.push(`re-run of ${shortId(job.rerun_of)}`);
  // Held by a cap (a kind's, or the embedded model's slots for a chat), as `offload list` says.
  const held = job.state === "queued" && job.waits_for;
  if (held && held.reason === "model_slots") {
    const slots = `${held.model_slots} slot${held.model_slots === 1 ? "" : "s"}`;
    const both = typeof held.kind_cap === "number"
      ? `kind ${job.kind}'s cap ${held.model_slots} and the model's ${slots}`
      : `the embedded model's ${slots}`;
    parts.push(heldBy(held, held.model_slots, `${both} busy`, both));
  } else if (held && held.reason === "kind_cap") {
    parts.push(heldBy(held, held.kind_cap, `kind ${job.kind} at its cap ${held.kind_cap}`,
                      `kind ${job.kind}'s cap ${held.kind_cap}`));
  }
  const waitsFor = job.depends_on || [];
  if (waitsFor.length && job.state === "queued") {
    parts.push(waitsFor.length === 1 ? `after ${shortId(waitsFor[0])}` : `after ${waitsFor.length} jobs`);
  }
  return parts.length ? parts.join(" · ") : "—";
}

function cells(job) {
  const now = Date.now();
  const created = toMs(job.created_at);
  const started = toMs(job.started_at);
  const finished = toMs(job.finished_at);
  const res = job.resources || {};
  let duration = null;
  if (started !== null) duration = ((finished ?? now) - started) / 1000;
  return {
    kind: job.kind || "—",
    state: job.state || "—",
    notes: notes(job, now),
    where: where(job),
    age: created === null ? "—" : `${fmtDuration((now - created) / 1000)} ago`,
    duration: fmtDuration(duration),
    cpu: num(res.cpu_s, 1),
    peak: num(res.peak_rss_mb, 0),
    tokens: tokens(job),
    queue: job.queue_position === null || job.queue_position === undefined ? "—" : String(job.queue_position),
  };
}

/** The text the free-text filter searches: id, kind, input (its start, as listed) and error. */
function searchable(job) {
  const error = job.error ? `${job.error.type || ""} ${job.error.message || ""}` : "";
  let input = job.input_preview ?? "";
  if (job.input) {
    try { input = JSON.stringify(job.input); } catch { /* not serialisable */ }
  }
  return `${job.id} ${job.kind} ${input} ${error}`.toLowerCase();
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
  } else if (FINAL_STATES.has(job.state)) {
    td.append(" ", makeButton("Re-run", "rerun-job", job.id, `Run ${job.kind} job ${job.id} again`));
    td.append(" ", makeButton("Remove", "remove-job", job.id, `Remove ${job.kind} job ${job.id} and its output`));
  }
}

function renderSelect(td, job) {
  td.textContent = "";
  if (!ACTIVE.has(job.state)) return;
  const box = document.createElement("input");
  box.type = "checkbox";
  box.className = "select-job";
  box.dataset.jobId = job.id;
  box.checked = selected.has(job.id);
  box.setAttribute("aria-label", `Select ${job.kind} job ${job.id}`);
  td.append(box);
}

function updateRow(tr, job) {
  const values = cells(job);
  for (const td of tr.children) {
    const v = values[td.dataset.col];
    if (v !== undefined && td.textContent !== v) td.textContent = v;
  }
  tr.querySelector("td[data-col='state']").className = `state state-${job.state}`;
  if (tr.dataset.state !== job.state) {
    // Only rebuild the controls when the state changes (keeps focus stable).
    const hadFocus = tr.contains(document.activeElement);
    tr.dataset.state = job.state;
    renderSelect(tr.querySelector("td[data-col='select']"), job);
    const actions = tr.querySelector("td[data-col='actions']");
    renderActions(actions, job);
    if (hadFocus) actions.querySelector("button").focus();
  }
}

function renderEmpty(text) {
  let empty = tbody.querySelector("tr.empty");
  if (!text) {
    if (empty) empty.remove();
    return;
  }
  if (!empty) {
    empty = document.createElement("tr");
    empty.className = "empty";
    const td = document.createElement("td");
    td.colSpan = COLUMNS.length;
    empty.append(td);
    tbody.append(empty);
  }
  if (empty.firstChild.textContent !== text) empty.firstChild.textContent = text;
}

function filtersActive() {
  return Boolean(filterKind.value || filterState.value || filterText.value.trim());
}

let filterNote = "";  // how many jobs match the filters
let actionNote = "";  // what the last cancel or re-run did

function setNote({ filter = filterNote, action = actionNote } = {}) {
  filterNote = filter;
  actionNote = action;
  const text = [filterNote, actionNote].filter(Boolean).join(" ");
  if (note.textContent !== text) note.textContent = text;
}

function render() {
  const words = filterText.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const shown = words.length ? jobs.filter((j) => words.every((w) => searchable(j).includes(w))) : jobs;
  const existing = new Map([...tbody.querySelectorAll("tr[data-job-id]")].map((tr) => [tr.dataset.jobId, tr]));
  const rows = shown.map((job) => {
    let tr = existing.get(job.id);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.jobId = job.id;
      for (const col of COLUMNS) {
        const td = document.createElement("td");
        td.dataset.col = col;
        tr.append(td);
      }
    }
    existing.delete(job.id);
    updateRow(tr, job);
    return tr;
  });
  for (const tr of existing.values()) tr.remove();
  // A job that finished or is filtered out can no longer be cancelled from here.
  const live = new Set(shown.filter((j) => ACTIVE.has(j.state)).map((j) => j.id));
  for (const id of [...selected]) if (!live.has(id)) selected.delete(id);
  renderSelection(live);
  olderBtn.hidden = !older || limit >= MAX_LIMIT;
  // Only the newest are listed: a job the filters look for may be among older ones.
  const among = older ? ` of the newest ${limit} listed` : "";
  if (rows.length === 0) {
    renderEmpty(filtersActive() ? `No jobs match these filters${among}.` : "No jobs yet.");
    setNote({ filter: filtersActive() ? `No jobs match${among}.` : "" });
    return;
  }
  renderEmpty("");
  setNote({ filter: filtersActive() ? `${rows.length} ${rows.length === 1 ? "job matches" : "jobs match"}${among}.` : "" });
  // Re-order only if needed: moving a node can drop keyboard focus.
  const current = [...tbody.children];
  if (current.length !== rows.length || rows.some((tr, i) => current[i] !== tr)) {
    const focused = document.activeElement;
    rows.forEach((tr) => tbody.append(tr));
    if (focused && tbody.contains(focused) && document.activeElement !== focused) focused.focus();
  }
}

function renderSelection(live) {
  for (const box of tbody.querySelectorAll("input.select-job")) box.checked = selected.has(box.dataset.jobId);
  const n = selected.size;
  cancelSelectedBtn.disabled = n === 0;
  cancelSelectedBtn.textContent = n ? `Cancel selected (${n})` : "Cancel selected";
  selectAll.disabled = live.size === 0;
  selectAll.checked = live.size > 0 && n === live.size;
  selectAll.indeterminate = n > 0 && n < live.size;
}

/** Kinds the page has seen join the kind filter's choices. */
function learnKinds(list) {
  const known = new Set([...filterKind.options].map((o) => o.value));
  for (const kind of new Set(list.map((j) => j.kind))) {
    if (typeof kind !== "string" || !kind || known.has(kind)) continue;
    const option = document.createElement("option");
    option.value = kind;
    option.textContent = kind;
    const after = [...filterKind.options].find((o) => o.value && o.value > kind);
    filterKind.insertBefore(option, after || null);
    known.add(kind);
  }
}

async function refresh() {
  const seq = ++refreshSeq;
  // Each job without its input, output and result: 50 chats of long conversations in full
  // were 45 MB a poll. The re-run dialog asks for its one job in full.
  const query = new URLSearchParams({ limit: String(limit), fields: "summary" });
  if (filterKind.value) query.set("kind", filterKind.value);
  if (filterState.value) query.set("state", filterState.value);
  const r = await apiJSON(`/api/jobs?${query}`, { source: "jobs" });
  if (seq !== refreshSeq) return; // the filters changed while this was asked
  if (r.ok && r.data && Array.isArray(r.data.jobs)) {
    jobs = r.data.jobs;
    older = Boolean(r.data.next_before);
    learnKinds(jobs);
    render();
  }
}

function openDialog(d) {
  if (typeof d.showModal === "function") {
    if (!d.open) {
      try { d.showModal(); } catch { d.setAttribute("open", ""); }
    }
  } else {
    d.setAttribute("open", "");
  }
}

function closeDialog(d) {
  if (d.open && typeof d.close === "function") d.close();
  else d.removeAttribute("open");
}

async function showLog(jobId) {
  title.textContent = `Log of job ${jobId}`;
  viewer.textContent = "Loading…";
  openDialog(dialog);
  const r = await apiText(`/api/jobs/${encodeURIComponent(jobId)}/log`);
  viewer.textContent = r.ok ? (r.text || "(the log is empty)") : `Could not load the log: ${r.text}`;
}

async function cancelJob(btn) {
  btn.disabled = true;
  const id = btn.dataset.jobId;
  const r = await apiJSON(`/api/jobs/${encodeURIComponent(id)}`, { method: "DELETE", source: "jobs" });
  if (r.ok) {
    // Answered once it ended, or after a while: it may have ended by itself meanwhile
    // (`completed`), or still be stopping (a supervisor stalled).
    const state = r.data && r.data.state;
    let said = `Cancelled job ${shortId(id)}.`;
    if (state !== "cancelled") {
      said = FINAL_STATES.has(state) ? `Job ${shortId(id)} had already ended (${state}).`
        : `Job ${shortId(id)} is being cancelled.`;
    }
    setNote({ action: said });
  } else if (r.status !== 409) {  // 409: it had finished; the table shows how
    btn.disabled = false;
    // A refusal (a data folder that cannot be written) went unsaid: the job ran on.
    // A full disk's 507 says whether the cancel goes ahead: the server's words alone.
    if (r.status === 507) setNote({ action: `Job ${shortId(id)}: ${r.error}` });
    else if (r.status) setNote({ action: `Could not cancel job ${shortId(id)}: ${r.error}` });
  }
  await refresh();
}

/** A finished job deleted now, with its input, output and log, once the user agrees. */
async function removeJob(btn) {
  const id = btn.dataset.jobId;
  if (!window.confirm(`Remove job ${shortId(id)} with its input, output and log? This cannot be undone.`)) return;
  btn.disabled = true;
  const r = await apiJSON(`/api/jobs/${encodeURIComponent(id)}/remove`, { method: "POST", source: "jobs" });
  if (r.ok) setNote({ action: `Removed job ${shortId(id)}.` });
  else {
    btn.disabled = false;
    setNote({ action: `Could not remove job ${shortId(id)}: ${r.error || "no answer"}` });
  }
  await refresh();
}

async function cancelSelected() {
  const ids = [...selected];
  if (!ids.length) return;
  cancelSelectedBtn.disabled = true;
  setNote({ action: `Cancelling ${ids.length} ${ids.length === 1 ? "job" : "jobs"}…` });
  // Each answer comes once its job is final: ask for all at once.
  const answers = await Promise.all(ids.map((id) =>
    apiJSON(`/api/jobs/${encodeURIComponent(id)}`, { method: "DELETE", source: "jobs" })));
  const failed = answers.filter((r) => !r.ok && r.status !== 409).length;
  for (const id of ids) selected.delete(id);
  await refresh();
  setNote({ action: failed ? `${failed} of ${ids.length} could not be cancelled.`
    : `Cancelled ${ids.length} ${ids.length === 1 ? "job" : "jobs"}.` });
}

// ---- re-run dialog -----------------------------------------------------------

let rerunDialog, rerunInput, rerunError, rerunSubmit;
let rerunJob = null;      // {id, text}: the job run again and the input as first shown
let rerunSeq = 0;         // the dialog opened last: an older job's answer is dropped

/** The dialog opens at once; the job's input comes in full from the job alone (the table
 * lists it without). Until then the input cannot be edited nor sent. */
async function openRerun(jobId) {
  const listed = jobs.find((j) => j.id === jobId);
  if (!listed) return;
  const seq = ++rerunSeq;
  rerunJob = null;
  rerunInput.value = "";
  rerunInput.readOnly = true;
  rerunSubmit.disabled = true;
  rerunError.textContent = "Loading the job's input…";
  rerunInput.removeAttribute("aria-invalid");
  document.getElementById("rerun-title").textContent = `Run ${listed.kind} job ${shortId(jobId)} again`;
  openDialog(rerunDialog);
  rerunInput.focus();
  const r = await apiJSON(`/api/jobs/${encodeURIComponent(jobId)}`);
  if (seq !== rerunSeq) return;
  if (!r.ok || !r.data) {
    rerunError.textContent = r.status === 0 ? "Cannot reach the server; close and try again."
      : `Could not load the job's input: ${r.error}`;
    return;
  }
  const input = { ...(r.data.input || {}) };
  delete input.context; // the chat expert's summary: the server makes it anew
  delete input.follows; // and it follows the conversation as it is now
  const text = JSON.stringify(input, null, 2);
  rerunJob = { id: jobId, text };
  rerunInput.value = text;
  rerunInput.readOnly = false;
  rerunSubmit.disabled = false;
  rerunError.textContent = "";
}

function rerunFails(message) {
  rerunError.textContent = message;
  rerunInput.setAttribute("aria-invalid", "true");
  rerunInput.focus();
}

async function submitRerun() {
  if (!rerunJob) return;
  const { id, text } = rerunJob;
  let body;
  if (rerunInput.value.trim() !== text.trim()) {
    let input;
    try {
      input = JSON.parse(rerunInput.value);
    } catch (err) {
      rerunFails(`The input is not valid JSON: ${err.message}`);
      return;
    }
    if (input === null || typeof input !== "object" || Array.isArray(input)) {
      rerunFails("The input must be a JSON object, like {\"seconds\": 2}.");
      return;
    }
    body = { input };
  }
  rerunSubmit.disabled = true;
  try {
    const r = await apiJSON(`/api/jobs/${encodeURIComponent(id)}/rerun`, { method: "POST", body, source: "jobs" });
    if (!r.ok) {
      rerunFails(r.status === 0 ? "Cannot reach the server; try again." : r.error);
      return;
    }
    rerunJob = null;
    closeDialog(rerunDialog);
    setNote({ action: `Started job ${r.data && r.data.id}, a re-run of ${id}.` });
    // A chat's re-run is a new turn of its conversation: the chat shows it if it is this page's.
    const session = r.data && r.data.input && r.data.input.session_id;
    if (session) window.dispatchEvent(new CustomEvent("offload:turns", { detail: { session } }));
    await refresh();
  } finally {
    rerunSubmit.disabled = false;
  }
}

export function initJobs() {
  tbody = document.querySelector("#jobs-table tbody");
  dialog = document.getElementById("log-dialog");
  viewer = document.getElementById("log-viewer");
  title = document.getElementById("log-title");
  note = document.getElementById("jobs-note");
  cancelSelectedBtn = document.getElementById("cancel-selected");
  selectAll = document.getElementById("select-all");
  filterKind = document.getElementById("filter-kind");
  filterState = document.getElementById("filter-state");
  filterText = document.getElementById("filter-text");
  olderBtn = document.getElementById("jobs-older");
  rerunDialog = document.getElementById("rerun-dialog");
  rerunInput = document.getElementById("rerun-input");
  rerunError = document.getElementById("rerun-error");
  rerunSubmit = document.getElementById("rerun-submit");
  let opener = null;

  const table = document.getElementById("jobs-table");
  table.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button");
    if (!btn) return;
    if (btn.classList.contains("show-log")) {
      opener = btn;
      showLog(btn.dataset.jobId).catch(() => {});
    } else if (btn.classList.contains("cancel-job")) {
      cancelJob(btn).catch(() => {});
    } else if (btn.classList.contains("rerun-job")) {
      opener = btn;
      openRerun(btn.dataset.jobId).catch(() => {});
    } else if (btn.classList.contains("remove-job")) {
      removeJob(btn).catch(() => { btn.disabled = false; });
    }
  });
  table.addEventListener("change", (ev) => {
    const box = ev.target;
    if (box === selectAll) {
      for (const b of tbody.querySelectorAll("input.select-job")) {
        if (selectAll.checked) selected.add(b.dataset.jobId);
        else selected.delete(b.dataset.jobId);
      }
    } else if (box.classList && box.classList.contains("select-job")) {
      if (box.checked) selected.add(box.dataset.jobId);
      else selected.delete(box.dataset.jobId);
    } else {
      return;
    }
    render();
  });
  cancelSelectedBtn.addEventListener("click", () => { cancelSelected().catch(() => {}); });
  olderBtn.addEventListener("click", () => {
    limit = Math.min(limit + LIMIT, MAX_LIMIT);
    refresh().catch(() => {});
  });

  document.getElementById("jobs-filter").addEventListener("submit", (ev) => ev.preventDefault());
  filterText.addEventListener("input", () => render());
  for (const select of [filterKind, filterState]) {
    select.addEventListener("change", () => { refresh().catch(() => {}); });
  }

  document.getElementById("log-close").addEventListener("click", () => closeDialog(dialog));
  document.getElementById("rerun-close").addEventListener("click", () => closeDialog(rerunDialog));
  document.getElementById("rerun-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    submitRerun().catch(() => { rerunSubmit.disabled = false; });
  });
  // Return focus to the button that opened a dialog.
  for (const d of [dialog, rerunDialog]) {
    d.addEventListener("close", () => {
      if (opener && document.contains(opener)) opener.focus();
    });
  }

  const loop = async () => {
    try { await refresh(); } catch { /* shown via #net-error */ }
    setTimeout(loop, REFRESH_MS);
  };
  loop();
}

export { refresh as refreshJobs };
