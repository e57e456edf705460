// chat.js — the AI expert chat: sends the conversation, streams the reply token by
// token from the job's event stream (picks it up again where it stopped after a dropped
// connection; falls back to polling), supports cancel, and restores earlier turns of
// this browser's session on load, following each one still running or queued.

import { apiJSON, followJob, FINAL_STATES, reportOk } from "./api.js";

const SESSION_KEY = "offload-session";
const STALL_MS = 120_000;   // say so after this long running with nothing from the server
const POLL_MS = 1000;
const POLLS_BETWEEN_STREAMS = 5;  // a refused stream is asked for again after these
// What the API takes in a chat's body (jobs/inputs.py, MAX_BODY_BYTES): 200 messages of
// 100,000 characters each, in at most 1 MB. A long conversation sends the latest turns
// that fit; the older ones are left out (a model's context holds no more anyway).
const MAX_MESSAGES = 200;
const MAX_CONTENT_CHARS = 100_000;
const MAX_BODY_BYTES = 1_000_000;
const BODY_ROOM = 4096;     // the body's other fields and its framing
const FORGET_RETRY_MS = 1000;  // a forget answered 409 (a turn still stopping) asked again
const FORGET_TRIES = 30;       // after this, as many times at the most
const RESTORE_RETRY_MS = 1000;      // the conversation's turns asked again after this,
const RESTORE_RETRY_MAX_MS = 10_000; // doubling up to this

const history = [];         // [{role, content}] sent with every new message
let pending = null;         // the newest reply awaited: Cancel stops it, Send waits for it
const live = [];            // every turn followed to its end, oldest first
let restoring = false;      // earlier turns still loading: a new one waits for them
let forgetting = false;     // the conversation being deleted: no new turn meanwhile

let form, input, sendBtn, cancelBtn, forgetBtn, forgetNote, log;

function newId() {
  if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return `s-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

let sessionExisted = false;  // a new session has no turns to restore (skip the 404)

function sessionId() {
  let id = null;
  try { id = localStorage.getItem(SESSION_KEY); } catch { /* storage disabled */ }
  sessionExisted = Boolean(id);
  if (!id) {
    id = newId();
    try { localStorage.setItem(SESSION_KEY, id); } catch { /* keep in memory only */ }
  }
  return id;
}
let SESSION = "";

// ---- rendering -------------------------------------------------------------

function addUser(text) {
  const li = document.createElement("li");
  li.className = "msg user";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  log.append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

/** Assistant bubble: .text (the reply), .elapsed (while waiting), .note (status). */
function addAssistant(jobId) {
  const li = document.createElement("li");
  li.className = "msg assistant";
  if (jobId) li.dataset.jobId = jobId;
  const body = document.createElement("span");
  body.className = "text";
  const elapsed = document.createElement("span");
  elapsed.className = "elapsed";
  const note = document.createElement("span");
  note.className = "note";
  li.append(body, elapsed, note);
  log.append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

const part = (li, cls) => li.querySelector(`.${cls}`);

function setFinal(li, state, text, note) {
  li.dataset.state = state;
  li.setAttribute("aria-busy", "false");
  part(li, "text").textContent = text;
  part(li, "note").textContent = note || "";
  const el = part(li, "elapsed");
  if (el) el.remove();
  if (state === "failed" || state === "timeout") li.classList.add("error");
}

// ---- waiting for a reply ---------------------------------------------------

/** Follow one chat job until it reaches a final state (or stalls). */
function follow(li, jobId, userText) {
  const started = Date.now();
  const controller = new AbortController();
  const p = {
    jobId, li, userText, controller, done: false, output: "", state: "queued",
    activity: Date.now(), stalled: false,
  };
  live.push(p);
  pending = p;
  li.setAttribute("aria-busy", "true");
  updateButtons();

  const tick = () => {
    if (p.done) return;
    const secs = Math.floor((Date.now() - started) / 1000);
    const el = part(li, "elapsed");
    if (el) el.textContent = `${p.state === "queued" ? "queued" : "thinking"}… ${secs}s`;
    // Waiting its turn, or on a hidden page (no stream then), is not silence.
    if (p.state === "queued" || document.hidden) p.activity = Date.now();
    if (!p.stalled && Date.now() - p.activity > STALL_MS) stall();
  };
  const timer = setInterval(tick, 500);
  tick();

  /** Nothing for STALL_MS while running: say so, let a new message go, keep following. */
  function stall() {
    p.stalled = true;
    li.classList.add("stalled");
    part(li, "note").textContent =
      "No answer for 120 s; it shows here if it still comes (see Jobs)";
    if (pending === p) pending = newestWaited();
    updateButtons();
  }

  function finish(state, text, note) {
    if (p.done) return;
    p.done = true;
    clearInterval(timer);
    controller.abort();
    li.classList.remove("stalled");
    setFinal(li, state, text, note);
    if (state === "completed" && userText !== null) {
      history.push({ role: "user", content: userText }, { role: "assistant", content: text });
    }
    live.splice(live.indexOf(p), 1);
    // Its polls' failure said in the banner ("Retrying…") is no more once nothing polls:
    // ended otherwise (cancelled, forgotten), it stayed until a next reply streamed.
    if (!live.length) reportOk("chat");
    if (pending === p) pending = newestWaited();
    updateButtons();
  }
  p.finish = finish;

  const onActivity = () => { p.activity = Date.now(); };

  /** Show the job's copy after an event of its stream. */
  function onJob(job) {
    if (p.done || !job) return;
    onActivity();
    if (p.stalled && !FINAL_STATES.has(job.state)) {
      p.stalled = false;  // it came after all
      li.classList.remove("stalled");
      part(li, "note").textContent = "";
    }
    if (job.state) p.state = job.state;
    if (typeof job.output === "string" && job.output !== p.output) {
      p.output = job.output;
      part(li, "text").textContent = job.output;
    }
    if (FINAL_STATES.has(job.state)) finishFromJob(job);
  }

  function finishFromJob(job) {
    const out = typeof job.output === "string" ? job.output : "";
    const reply = out || replyFromResult(job.result);
    if (job.state === "completed") {
      finish("completed", reply, "");
    } else if (job.state === "cancelled") {
      finish("cancelled", reply, "Cancelled.");
    } else {
      const msg = (job.error && job.error.message) ||
        (job.state === "timeout" ? "the job ran out of time" : "the job failed");
      finish(job.state, `Error: ${msg}`, "");
    }
  }

  /** Ask for the reply `times` times, a second apart (or until it has ended). */
  async function poll(times) {
    for (let i = 0; i < times && !p.done; i += 1) {
      const r = await apiJSON(`/api/ai_chat_result/${encodeURIComponent(jobId)}`, { source: "chat" });
      if (p.done) return;
      if (r.ok && r.data) {
        const d = r.data;
        if (d.status === "completed") {
          finish("completed", d.reply || "", "");
          return;
        }
        if (d.status === "error") {
          // Find out which final state it was (failed, cancelled, timeout).
          const j = await apiJSON(`/api/jobs/${encodeURIComponent(jobId)}`);
          const state = j.ok && j.data && FINAL_STATES.has(j.data.state) ? j.data.state : "failed";
          if (state === "cancelled") finish("cancelled", p.output, "Cancelled.");
          else finish(state, `Error: ${d.message || "the job failed"}`, "");
          return;
        }
        if (d.status === "not_found") {
          finish("failed", "Error: the job was not found on the server", "");
          return;
        }
      }
      await new Promise((res) => setTimeout(res, POLL_MS));
    }
  }

  (async () => {
    while (!p.done) {
      try {
        await followJob(`/api/jobs/${encodeURIComponent(jobId)}/events`, {
          onJob,
          onActivity,
          signal: controller.signal,
          source: "chat",
        });
      } catch {
        /* the server refused the stream: poll a while, then follow it again */
      }
      // Polled to its end, a reply refused its stream once (every stream of the server
      // taken, a proxy's 502 while the server restarted) stood still until it had ended.
      if (!p.done) await poll(POLLS_BETWEEN_STREAMS);
    }
  })().catch(() => { /* never surface to the console */ });
}

function replyFromResult(result) {
  if (!result) return "";
  if (typeof result === "string") return result;
  return result.reply || result.text || result.content || "";
}

/** The newest turn a new message waits for (none stalled). */
function newestWaited() {
  for (let i = live.length - 1; i >= 0; i -= 1) if (!live[i].stalled) return live[i];
  return null;
}

function updateButtons() {
  const busy = Boolean(pending);
  cancelBtn.hidden = !busy;
  cancelBtn.disabled = !busy;
  sendBtn.disabled = busy || restoring || forgetting;
  forgetBtn.disabled = restoring || forgetting;
}

// ---- actions ----------------------------------------------------------------

const utf8 = new TextEncoder();
const bytesOf = (message) => utf8.encode(JSON.stringify(message)).length + 1;

/** Whether `text` is over the API's characters: code points, as it counts them (an
 * emoji is two UTF-16 units of `length`, one character there). */
function tooLong(text) {
  if (text.length <= MAX_CONTENT_CHARS) return false;
  let chars = 0;
  for (const _ of text) if ((chars += 1) > MAX_CONTENT_CHARS) return true;
  return false;
}

/** The messages of a new question: the latest turns of `history` that fit the API's
 * bounds, then the question. A turn is a question and its reply, kept together. */
function messagesFor(text) {
  const question = { role: "user", content: text };
  let bytes = BODY_ROOM + bytesOf(question) + utf8.encode(JSON.stringify(SESSION)).length;
  let first = history.length;
  while (first >= 2) {
    const turn = history.slice(first - 2, first);
    const size = turn.reduce((sum, m) => sum + bytesOf(m), 0);
    if (history.length - first + 2 > MAX_MESSAGES - 1 || bytes + size > MAX_BODY_BYTES
        || turn.some((m) => tooLong(m.content))) break;
    bytes += size;
    first -= 2;
  }
  return [...history.slice(first), question];
}

async function send(text) {
  const session = SESSION;
  const asked = addUser(text);
  const messages = messagesFor(text);
  const li = addAssistant(null);
  part(li, "elapsed").textContent = "sending…";
  pending = { placeholder: true };
  updateButtons();
  // No `source`: a one-off call says its failure in its bubble, not in the banner
  // (which would say "retrying" until the next message).
  const r = await apiJSON("/api/ai_chat_async", {
    method: "POST",
    body: { messages, session_id: SESSION },
  });
  pending = null;
  if (session !== SESSION) {
    // Forgotten while it was being sent: it goes too (it may have landed after the erase).
    asked.remove();
    li.remove();
    if (r.ok) apiJSON(`/api/sessions/${encodeURIComponent(session)}`, { method: "DELETE" });
    updateButtons();
    return;
  }
  if (!r.ok || !r.data || !r.data.job_id) {
    setFinal(li, "failed", `Error: ${r.error || "no job id returned"}`, "");
    updateButtons();
    return;
  }
  li.dataset.jobId = r.data.job_id;
  follow(li, r.data.job_id, text);
}

async function cancel() {
  if (!pending || !pending.jobId) return;
  const p = pending;
  cancelBtn.disabled = true;
  const r = await apiJSON(`/api/jobs/${encodeURIComponent(p.jobId)}`, { method: "DELETE" });
  if (r.ok && r.data && r.data.state === "cancelled" && !p.done) {
    // The stream will normally report it too; finishing here is idempotent.
    p.finish("cancelled", p.output, "Cancelled.");
  } else if (!p.done) {
    cancelBtn.disabled = false; // 409: already finished; the stream will tell
    // Another refusal (a data folder that cannot be written) went unsaid: it answers on.
    // Taken but not stopped yet when answered (200, `running`): the stream says its end.
    if (!r.ok && r.status && r.status !== 409) part(p.li, "note").textContent = `Could not cancel it: ${r.error}`;
  }
}

/** Delete this conversation from the server (its answering turns are stopped first),
 * then start a new one. */
async function forget() {
  if (!window.confirm("Delete this conversation's questions, replies and logs from the server?")) return;
  forgetting = true;
  updateButtons();
  forgetNote.textContent = "Forgetting…";
  // 409: a turn still stopping, the others erased; left there, the page kept them, and
  // its next question stored them again. Asked again until every turn is gone.
  const session = SESSION;
  let r;
  for (let tries = 1; ; tries += 1) {
    r = await apiJSON(`/api/sessions/${encodeURIComponent(session)}`, { method: "DELETE" });
    if (r.status !== 409 || tries >= FORGET_TRIES) break;
    forgetNote.textContent = "Forgetting… (a reply is still stopping)";
    await new Promise((res) => setTimeout(res, FORGET_RETRY_MS));
  }
  forgetting = false;
  updateButtons();
  if (!r.ok) {
    forgetNote.textContent = `Could not forget it: ${r.error || "no answer"}`;
    return;
  }
  startOver(newId());
  try { localStorage.setItem(SESSION_KEY, SESSION); } catch { /* keep in memory only */ }
  forgetNote.textContent = "Forgotten: a new conversation starts here.";
}

/** This page's copy of the conversation dropped: `session` is the one that goes on. */
function startOver(session) {
  for (const p of [...live]) p.finish("cancelled", "", "");
  log.replaceChildren();
  history.length = 0;
  SESSION = session;
}

/** Forgotten in another tab: this one shows it no more, and its next question does not
 * send the forgotten turns back to the server (they were stored again, in a new job). */
function onStorage(ev) {
  if (ev.key !== SESSION_KEY || !ev.newValue || ev.newValue === SESSION) return;
  startOver(ev.newValue);
  forgetNote.textContent = "Forgotten in another tab: a new conversation starts here.";
}

/** Re-render the earlier turns of this session (oldest first). Asked again while the
 * server cannot answer: a page that went on without them showed an empty conversation,
 * and its next question went without the earlier turns. */
async function restore() {
  let r;
  for (let delay = RESTORE_RETRY_MS; ; delay = Math.min(delay * 2, RESTORE_RETRY_MAX_MS)) {
    const asked = SESSION;
    r = await apiJSON(`/api/sessions/${encodeURIComponent(asked)}`);
    // Forgotten in another tab meanwhile: these turns are gone, and the new conversation
    // has none (shown, they went back to the server with the next question).
    if (asked !== SESSION) return;
    if (r.ok || (r.status && r.status < 500)) break;
    forgetNote.textContent = `Could not load this conversation (${r.error}); trying again…`;
    await new Promise((res) => setTimeout(res, delay));
  }
  if (!r.ok || !r.data || !Array.isArray(r.data.turns)) {
    forgetNote.textContent = `Could not load this conversation: ${r.error || "no turns in the answer"}`;
    return;
  }
  forgetNote.textContent = "";
  for (const turn of r.data.turns) {
    const q = turn.question || "";
    if (q) addUser(q);
    const li = addAssistant(turn.job_id);
    if (FINAL_STATES.has(turn.state)) {
      if (turn.state === "completed") {
        setFinal(li, "completed", turn.reply || "", "");
        if (q) history.push({ role: "user", content: q }, { role: "assistant", content: turn.reply || "" });
      } else if (turn.state === "cancelled") {
        setFinal(li, "cancelled", turn.reply || "", "Cancelled.");
      } else {
        const msg = turn.error && (turn.error.message || turn.error);
        setFinal(li, turn.state, `Error: ${typeof msg === "string" ? msg : "the job failed"}`, "");
      }
    } else if (turn.job_id) {
      follow(li, turn.job_id, q);         // running or waiting its turn: stream it to its end
    } else {
      part(li, "note").textContent = `(${turn.state || "unknown"})`;
    }
  }
}

export function initChat() {
  form = document.getElementById("chat-form");
  input = document.getElementById("chat-input");
  sendBtn = document.getElementById("chat-send");
  cancelBtn = document.getElementById("chat-cancel");
  forgetBtn = document.getElementById("chat-forget");
  forgetNote = document.getElementById("chat-forget-note");
  log = document.getElementById("chat-log");
  SESSION = sessionId();
  updateButtons();

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || pending || restoring || forgetting) return;
    input.value = "";
    send(text).catch(() => { /* errors are rendered in the bubble */ });
  });
  // Enter sends, Shift+Enter inserts a newline (IME composition is left alone).
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      if (typeof form.requestSubmit === "function") form.requestSubmit();
      else form.dispatchEvent(new Event("submit", { cancelable: true }));
    }
  });
  cancelBtn.addEventListener("click", () => { cancel().catch(() => {}); });
  forgetBtn.addEventListener("click", () => { forget().catch(() => {}); });
  window.addEventListener("storage", onStorage);
  if (sessionExisted) {
    // Its turns first: a message sent meanwhile went without them (and showed twice).
    restoring = true;
    updateButtons();
    restore().catch(() => {}).finally(() => { restoring = false; updateButtons(); });
  }
}
