// chat.js — the AI expert chat: sends the conversation, streams the reply token by
// token from the job's event stream (picks it up again where it stopped after a dropped
// connection; falls back to polling), supports cancel, and restores earlier turns of
// this browser's session on load, following each one still running or queued. Tabs of
// one session show each other's turns: a turn sent or ended is told to the others.

import { apiJSON, FINAL_STATES, reportOk } from "./api.js";
import { followReply } from "./chat_follow.js";
import { ANSWER_WAIT_MS, askInTime, restoreTurns } from "./chat_restore.js";
import {
  makeAssistant, makeTurn, makeUser, messagesFor, part, refusalOf, setFinal,
} from "./chat_view.js";

const SESSION_KEY = "offload-session";
const TURN_KEY = "offload-session-turn";   // {session, at}: a tab's turn was sent or ended
const FORGOTTEN_KEY = "offload-forgotten"; // {session, next}: written by a forget alone
const FORGET_RETRY_MS = 1000;  // a forget answered 409 (a turn still stopping) asked again
const FORGET_TRIES = 30;       // after this, as many times at the most
const LOOK_AGAIN_MS = [10_000, 30_000, 60_000];  // an unanswered question's turn looked for

let pending = null;         // the newest reply awaited: Cancel stops it, Send waits for it
const live = [];            // every turn followed to its end, oldest first
let restoring = false;      // earlier turns still loading: a new one waits for them
let forgetting = false;     // the conversation being deleted: no new turn meanwhile
let syncing = null;         // the turns being loaded from the server (a promise)
let syncAgain = false;      // told of a change while loading: load again after
let sending = Promise.resolve();  // a question on its way (its turn has no id yet)
let dropping = false;       // this page's copy being dropped: its ends are not news

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

/** Say what happens to the conversation under it ("" says nothing). */
function say(text) {
  forgetNote.textContent = text;
}

function place(li) {
  log.append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

// ---- waiting for a reply ---------------------------------------------------

/** Follow one chat job until it reaches a final state; the newest is the one awaited. */
function follow(li, jobId, state) {
  const session = SESSION;
  const p = followReply(li, jobId, state, {
    stalled: (q) => {
      if (pending === q) pending = newestWaited();
      updateButtons();
    },
    // Awaited again: it had no Cancel reply (and Send was free) to its end.
    resumed: () => {
      if (!pending || !pending.placeholder) pending = newestWaited();
      updateButtons();
    },
    ended: (q) => {
      if (!dropping) announce(session);
      live.splice(live.indexOf(q), 1);
      // Its polls' failure said in the banner ("Retrying…") is no more once nothing polls:
      // ended otherwise (cancelled, forgotten), it stayed until a next reply streamed.
      if (!live.length) reportOk("chat");
      if (pending === q) pending = newestWaited();
      updateButtons();
    },
  });
  live.push(p);
  pending = p;
  updateButtons();
  return p;
}

/** The newest turn a new message waits for (none stalled). */
function newestWaited() {
  for (let i = live.length - 1; i >= 0; i -= 1) if (!live[i].stalled) return live[i];
  return null;
}

function updateButtons() {
  const busy = Boolean(pending);
  const focused = document.activeElement;
  cancelBtn.hidden = !busy;
  cancelBtn.disabled = !busy || Boolean(pending && pending.cancelled);
  sendBtn.disabled = busy || restoring || forgetting;
  forgetBtn.disabled = restoring || forgetting;
  // A button pressed from the keyboard, then disabled or hidden, dropped the focus to
  // the start of the page: it goes back to the question's box.
  if ([sendBtn, cancelBtn, forgetBtn].includes(focused) && (focused.disabled || focused.hidden)) {
    input.focus();
  }
}

// ---- actions ----------------------------------------------------------------

async function send(text) {
  const session = SESSION;
  const asked = place(makeUser(text));
  const li = place(makeAssistant(null, text, asked));
  part(li, "elapsed").textContent = "sending…";
  const placeholder = { placeholder: true, li };
  pending = placeholder;
  updateButtons();
  // Turns another tab added, still loading: the question carries them.
  while (syncing) await syncing;
  // Sent just before, its answer never came: sent again as it was, with its key, the
  // server answers the turn it took (if it did) instead of storing the question twice. Asked
  // again once the server's turns changed (any tab's), it is a new question, on the
  // conversation as it is now.
  const turns = log.querySelectorAll("li.msg.assistant");
  const newest = turns.length > 1 ? turns[turns.length - 2] : null;
  const seen = shownTurns();
  const lost = newest && lostBubbles().includes(newest) && newest.unanswered === text
    && newest.seen === seen ? newest : null;
  const unsent = () => {
    asked.remove();
    li.remove();
    if (pending === placeholder) pending = newestWaited();
    updateButtons();
  };
  if (session !== SESSION || (lost && !lost.isConnected)) { unsent(); return; }
  if (lost) {
    lost.asked?.remove();  // this bubble stands for it now
    lost.remove();
  }
  const key = lost ? lost.key : newId();
  // It names the newest turn it carries: once that is gone (a forget this page gave up on,
  // done late), the server refuses it rather than store the forgotten turns again.
  const follows = seen.split(" ").pop();
  const body = lost ? lost.body : { messages: messagesFor(log, text, session), session_id: session };
  if (!lost && follows) body.follows = follows;
  let sent;
  sending = new Promise((resolve) => { sent = resolve; });
  try {
    // No `source`: a one-off call says its failure in its bubble, not in the banner
    // (which would say "retrying" until the next message).
    const r = await askInTime("/api/ai_chat_async", {
      method: "POST", body, headers: { "Idempotency-Key": key },
    });
    if (session !== SESSION) {
      // Forgotten while it was being sent: it goes too (it may have landed after the erase).
      unsent();
      if (r.ok) apiJSON(`/api/sessions/${encodeURIComponent(session)}`, { method: "DELETE" });
      return;
    }
    if (pending === placeholder) pending = newestWaited();
    if (r.status === 410) {
      unsent();
      forgotten(session);
      // What a forget that ended in part kept (a full disk, a reply still stopping) goes now.
      apiJSON(`/api/sessions/${encodeURIComponent(session)}`, { method: "DELETE" });
      say("Forgotten after all: this conversation was forgotten (late, or in another tab), or "
        + "all its turns removed. A new conversation starts here; your question is kept in the box.");
      if (!input.value) input.value = text;
      return;
    }
    if (!r.ok || !r.data || !r.data.job_id) {
      const error = r.late ? `no answer from the server in ${ANSWER_WAIT_MS / 1000} s` : r.error;
      // No answer (the connection cut; a proxy's 502 or 504): the server may have taken it.
      const unanswered = !r.status || r.status === 502 || r.status === 504;
      setFinal(li, "failed", `Error: ${error || "no job id returned"}`,
        unanswered ? "Its reply shows here if the server took it; else send it again." : "");
      if (!input.value) input.value = text;  // to send again as it was, not typed again
      // Its key sent before may still make a turn (a server that took the first late).
      if (unanswered || lost) {
        Object.assign(li, { unanswered: text, key, body, seen });
        li.cancelled = placeholder.cancelled;  // and stopped once found
        lookFor(li);
      }
      updateButtons();
      return;
    }
    // Found meanwhile, as the turn of its key sent before: shown there already.
    if (log.querySelector(`li.msg.assistant[data-job-id="${r.data.job_id}"]`)) { unsent(); return; }
    li.dataset.jobId = r.data.job_id;
    say("");  // a forget said done or failed, a load failed: the conversation goes on
    const p = follow(li, r.data.job_id, "queued");
    announce(session);
    if (placeholder.cancelled) cancelReply(p).catch(() => {});
  } finally {
    sent();
  }
}

async function cancel() {
  if (!pending) return;
  if (pending.placeholder) {
    // No job id yet (a slow server still taking the question): the click did nothing, and
    // the reply came all the same. It is stopped as soon as it has one.
    pending.cancelled = true;
    part(pending.li, "elapsed").textContent = "cancelling…";
    updateButtons();
    return;
  }
  await cancelReply(pending);
}

async function cancelReply(p) {
  if (document.activeElement === cancelBtn) input.focus();  // as updateButtons says
  cancelBtn.disabled = true;
  if (p.unconfirmed) {
    part(p.li, "note").textContent = "";  // asked again: the last one's word is no more
    p.unconfirmed = false;
  }
  const r = await askInTime(`/api/jobs/${encodeURIComponent(p.jobId)}`, { method: "DELETE" });
  if (r.ok && r.data && r.data.state === "cancelled" && !p.done) {
    // The stream will normally report it too; finishing here is idempotent.
    p.finish("cancelled", p.output, "Cancelled.");
  } else if (!p.done) {
    cancelBtn.disabled = false; // 409: already finished; the stream will tell
    // Another refusal (a data folder that cannot be written) went unsaid: it answers on.
    // Taken but not stopped yet when answered (200, `running`): the stream says its end.
    // No answer (given up after 30 s, a cut connection): the reply went on, nothing said.
    const note = part(p.li, "note");
    // A full disk's 507 says whether the cancel goes ahead: the server's words alone.
    if (r.status === 507) note.textContent = r.error;
    else if (!r.ok && r.status && r.status !== 409) note.textContent = `Could not cancel it: ${r.error}`;
    else if (!r.ok && !r.status) {
      note.textContent = `Cancel not confirmed: ${noAnswer(r)}. Press Cancel again to be sure.`;
      p.unconfirmed = true;
    }
  }
}

/** What a call without an answer says: given up after ANSWER_WAIT_MS, or why it failed. */
const noAnswer = (r) => (r.late ? `no answer from the server in ${ANSWER_WAIT_MS / 1000} s` : r.error);

/** Delete this conversation from the server (its answering turns are stopped first),
 * then start a new one. */
async function forget() {
  if (!window.confirm("Delete this conversation's questions, replies and logs from the server?")) return;
  forgetting = true;
  updateButtons();
  say("Forgetting…");
  // 409: a turn still stopping, the others erased; left there, the page kept them, and
  // its next question stored them again. Asked again until every turn is gone.
  const session = SESSION;
  let r;
  for (let tries = 1; ; tries += 1) {
    r = await askInTime(`/api/sessions/${encodeURIComponent(session)}`, { method: "DELETE" });
    if (r.status !== 409 || tries >= FORGET_TRIES) break;
    say("Forgetting… (a reply is still stopping)");
    await new Promise((res) => setTimeout(res, FORGET_RETRY_MS));
  }
  forgetting = false;
  updateButtons();
  if (!r.status) {
    // Given up, it may be done all the same: the next question, which names the newest turn
    // it carries, is refused if so (it would store the forgotten turns again).
    say(`Forget not confirmed: ${noAnswer(r)}. Press Forget again to be sure.`);
    return;
  }
  // A full disk's 507 says what was erased and what waits for room: the server's words alone.
  if (r.status === 507) {
    say(r.error);
    await dropErased(session);
    return;
  }
  if (!r.ok) {
    say(`Could not forget it: ${r.error}`);
    return;
  }
  forgotten(session);
  say("Forgotten: a new conversation starts here.");
}

/** Turns of `session` the server erased (a forget done in part, on a full disk) leave this
 * page, so that its next question does not store them again. */
async function dropErased(session) {
  const r = await askInTime(`/api/sessions/${encodeURIComponent(session)}`);
  if (session !== SESSION || !r.ok || !r.data || !Array.isArray(r.data.turns)) return;
  const kept = new Set(r.data.turns.map((turn) => turn.job_id));
  for (const li of log.querySelectorAll("li.msg.assistant[data-job-id]")) {
    if (kept.has(li.dataset.jobId)) continue;
    li.asked?.remove();
    li.remove();
  }
}

/** `session` is gone from the server: a new conversation starts here and in the other tabs. */
function forgotten(session) {
  const next = newId();
  startOver(next);
  try {
    // The mark tells the other tabs: a new id alone is also what a tab whose storage was
    // emptied writes, and the conversation is still there.
    localStorage.setItem(FORGOTTEN_KEY, JSON.stringify({ session, next }));
    localStorage.setItem(SESSION_KEY, next);
  } catch { /* keep in memory only */ }
}

/** This page's copy of the conversation dropped: `session` is the one that goes on. */
function startOver(session) {
  dropping = true;
  try {
    for (const p of [...live]) p.finish("cancelled", "", "");
  } finally {
    dropping = false;
  }
  log.replaceChildren();
  SESSION = session;
}

const parsed = (value) => { try { return JSON.parse(value || "null"); } catch { return null; } };

/** Tell the other tabs of this session that a turn was sent or ended. */
function announce(session) {
  const news = { session, at: `${Date.now()}-${Math.random().toString(36).slice(2)}` };
  try { localStorage.setItem(TURN_KEY, JSON.stringify(news)); } catch { /* one tab only */ }
}

/** Another tab's news. Forgotten there: this one shows it no more, and its next question
 * does not send the forgotten turns back to the server (they were stored again, in a new
 * job). A turn there: shown here too, and carried by this tab's next question. Storage
 * emptied, or a new id without the forget's mark (the other tab's storage was cleared):
 * nothing was deleted, and this tab's conversation goes on. */
function onStorage(ev) {
  if (ev.key === FORGOTTEN_KEY) {
    const forgot = parsed(ev.newValue);
    if (!forgot || forgot.session !== SESSION || typeof forgot.next !== "string") return;
    startOver(forgot.next);
    say("Forgotten in another tab: a new conversation starts here.");
  } else if (ev.key === TURN_KEY) {
    const news = parsed(ev.newValue);
    if (news && news.session === SESSION) requestSync();
  }
}

/** Look for the turn of a question whose answer never came, now and a while after: one
 * the server took after the page gave up (30 s) is stored after the first look. */
async function lookFor(li) {
  for (const wait of [0, ...LOOK_AGAIN_MS]) {
    await new Promise((res) => setTimeout(res, wait));
    if (!li.isConnected) return;  // found, sent again (or forgotten)
    await findLost();
  }
}

/** Ask the server which turn each question whose answer never came made, by its key (its
 * text may be another tab's question too), then show the turns found in their place. */
async function findLost() {
  for (const li of lostBubbles()) {
    if (li.turnId) continue;
    const r = await askInTime("/api/ai_chat_async", { headers: { "Idempotency-Key": li.key } });
    if (r.ok && r.data && typeof r.data.job_id === "string") li.turnId = r.data.job_id;
  }
  requestSync();
}

/** The server's turns shown, by job id: what a question sent now carries. */
const shownTurns = () => [...log.querySelectorAll("li.msg.assistant[data-job-id]")]
  .map((el) => el.dataset.jobId).join(" ");

/** The reply's bubbles of questions sent here whose answer never came. */
const lostBubbles = () => [...log.querySelectorAll("li.msg.assistant:not([data-job-id])")]
  .filter((el) => el.unanswered);

/** Show the server's turns of this conversation the page does not show yet, each after
 * the turns before it, following those still answering; whether a lost question's key is
 * to be looked up again. */
function showTurns(turns) {
  const shown = new Map();
  for (const li of log.querySelectorAll("li.msg.assistant[data-job-id]")) shown.set(li.dataset.jobId, li);
  let after = null;  // the last of these turns placed
  const asked = new Set();  // the questions of the turns added
  for (const turn of turns) {
    const have = turn.job_id && shown.get(turn.job_id);
    if (have) {
      after = have;
      // Shown before its key told it was this page's lost question: that bubble goes.
      const twin = lostBubbles().find((el) => el.turnId === turn.job_id);
      if (twin) {
        twin.asked?.remove();
        twin.remove();
        if (input.value === turn.question) input.value = "";
        const p = twin.cancelled && live.find((q) => q.jobId === turn.job_id);
        if (p) cancelReply(p).catch(() => {});  // cancelled while it was being sent
      }
      continue;
    }
    const li = makeTurn(turn);
    const lost = turn.job_id && lostBubbles().find((el) => el.turnId === turn.job_id);
    if (lost) {
      // Sent here, its answer cut: the error it showed was this turn, which the server had.
      li.asked = lost.asked;
      lost.replaceWith(li);
      if (input.value === turn.question) input.value = "";
    } else {
      const nodes = li.asked ? [li.asked, li] : [li];
      if (after) after.after(...nodes);
      else log.prepend(...nodes);
    }
    after = li;
    asked.add(turn.question);
    if (turn.job_id && !FINAL_STATES.has(turn.state)) {
      const p = follow(li, turn.job_id, turn.state);
      if (lost && lost.cancelled) cancelReply(p).catch(() => {});
    }
  }
  if (!asked.size) return false;
  log.scrollTop = log.scrollHeight;  // the log's own box: the page stays put
  if (!forgetting) say("");  // as when a turn is sent here
  // A new turn asking what a lost question asked may be its turn, stored after the page's
  // last look: its key, looked up again, tells (another tab's of the same text is not).
  return lostBubbles().some((el) => !el.turnId && asked.has(el.unanswered));
}

/** Re-render the earlier turns of this session (oldest first). */
async function restore() {
  const turns = await restoreTurns(() => SESSION, say, () => forgetNote.textContent);
  if (turns) showTurns(turns);
}

/** Load the turns another tab added (after a question on its way here has its id). */
async function sync() {
  await sending;
  const asked = SESSION;
  const r = await askInTime(`/api/sessions/${encodeURIComponent(asked)}`);
  if (asked !== SESSION || forgetting) return;
  // Looked up before the sync ends: a question sent meanwhile waits for the answer.
  if (r.ok && r.data && Array.isArray(r.data.turns) && showTurns(r.data.turns)) await findLost();
}

/** Load the turns with `first`, then again while told of changes meanwhile. */
function startSync(first) {
  syncAgain = false;
  syncing = (async () => {
    await first();
    while (syncAgain) {
      syncAgain = false;
      await sync();
    }
  })().catch(() => { /* shown as it was */ }).finally(() => { syncing = null; });
  return syncing;
}

function requestSync() {
  if (syncing) syncAgain = true;
  else startSync(sync);
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
    const text = input.value.replace(/^\s*\n/, "").trimEnd();  // a first line's indent kept
    if (!text || pending || restoring || forgetting) return;
    const refusal = refusalOf(text);
    if (refusal) { say(refusal); return; }
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
  // A turn this page added elsewhere (a chat re-run from the jobs table).
  window.addEventListener("offload:turns", (ev) => {
    if (ev.detail && ev.detail.session === SESSION) requestSync();
  });
  // Back to this tab: what another tab added meanwhile (its news may have been missed).
  document.addEventListener("visibilitychange", () => { if (!document.hidden) requestSync(); });
  // Back online: a question taken as the network went down is looked for again.
  window.addEventListener("online", () => { findLost().catch(() => {}); });
  if (sessionExisted) {
    // Its turns first: a message sent meanwhile went without them (and showed twice).
    restoring = true;
    updateButtons();
    startSync(restore).finally(() => { restoring = false; updateButtons(); });
  }
}
