// chat_view.js — the conversation's bubbles: a question, a reply (its text, the time
// waited, a note), and the messages a new question carries, read from the replies shown.

import { FINAL_STATES } from "./api.js";

// What the API takes in a chat's body (jobs/inputs.py, MAX_BODY_BYTES): 200 messages of
// 100,000 characters each, in at most 1 MB. A long conversation sends the latest turns
// that fit; the older ones are left out (a model's context holds no more anyway).
const MAX_MESSAGES = 200;
const MAX_CONTENT_CHARS = 100_000;
const MAX_BODY_BYTES = 1_000_000;
const BODY_ROOM = 4096;     // the body's other fields and its framing

export const part = (li, cls) => li.querySelector(`.${cls}`);

/** A bubble's text: its direction its own (Arabic, Hebrew right to left), as the box's. */
function textPart() {
  const body = document.createElement("span");
  body.className = "text";
  body.dir = "auto";
  return body;
}

/** A question's bubble, not placed yet. */
export function makeUser(text) {
  const li = document.createElement("li");
  li.className = "msg user";
  const body = textPart();
  body.textContent = text;
  li.append(body);
  return li;
}

/** A reply's bubble, not placed yet: .text (the reply), .elapsed (while waiting), .note.
 * `question` is what it answers; `asked`, the question's bubble (or null). */
export function makeAssistant(jobId, question, asked) {
  const li = document.createElement("li");
  li.className = "msg assistant";
  if (jobId) li.dataset.jobId = jobId;
  li.question = question;
  li.asked = asked;
  const body = textPart();
  const elapsed = document.createElement("span");
  elapsed.className = "elapsed";
  const note = document.createElement("span");
  note.className = "note";
  li.append(body, elapsed, note);
  return li;
}

/** Change a bubble; the conversation's box kept at its end if it was there (a reply that
 * grew past the bottom went on out of sight). */
export function keepingEnd(li, change) {
  const box = li.parentElement;
  const atEnd = box && box.scrollHeight - box.scrollTop - box.clientHeight < 24;
  change();
  if (atEnd) box.scrollTop = box.scrollHeight;
}

export function setFinal(li, state, text, note) {
  li.dataset.state = state;
  li.setAttribute("aria-busy", "false");
  li.reply = text;
  part(li, "text").textContent = text;
  part(li, "note").textContent = note || "";
  const el = part(li, "elapsed");
  if (el) el.remove();
  if (state === "failed" || state === "timeout") li.classList.add("error");
}

/** A turn as the server lists it: its reply's bubble (after its question's), final or
 * left for the caller to follow. */
export function makeTurn(turn) {
  const q = turn.question || "";
  const asked = q ? makeUser(q) : null;
  const li = makeAssistant(turn.job_id, q, asked);
  if (FINAL_STATES.has(turn.state)) {
    if (turn.state === "completed") {
      setFinal(li, "completed", turn.reply || "", "");
    } else if (turn.state === "cancelled") {
      setFinal(li, "cancelled", turn.reply || "", "Cancelled.");
    } else {
      const msg = turn.error && (turn.error.message || turn.error);
      const said = `Error: ${typeof msg === "string" ? msg : "the job failed"}`;
      if (turn.reply) setFinal(li, turn.state, turn.reply, said);  // its partial reply kept
      else setFinal(li, turn.state, said, "");
    }
  } else if (!turn.job_id) {
    part(li, "note").textContent = `(${turn.state || "unknown"})`;
  }
  return li;
}

/** The conversation so far, oldest first: each completed reply shown, after its question.
 * Read from the page, so it is what the page shows, whichever tab asked it. */
function historyOf(log) {
  const messages = [];
  for (const li of log.querySelectorAll("li.msg.assistant[data-state='completed']")) {
    if (li.question) {
      messages.push({ role: "user", content: li.question }, { role: "assistant", content: li.reply || "" });
    }
  }
  return messages;
}

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

/** Why the API would refuse `text` as a question, in words; "" if it takes it. Sent, it
 * was refused as "messages.4.content: String should have at most 100000 characters". */
export function refusalOf(text) {
  if (!tooLong(text)) return "";
  const chars = [...text].length.toLocaleString("en");
  return `This question is ${chars} characters long; at most ${MAX_CONTENT_CHARS.toLocaleString("en")} `
    + "are taken. Shorten it (it is kept in the box).";
}

/** The messages of a new question in `session`: the latest turns shown that fit the
 * API's bounds, then the question. A turn is a question and its reply, kept together. */
export function messagesFor(log, text, session) {
  const history = historyOf(log);
  const question = { role: "user", content: text };
  let bytes = BODY_ROOM + bytesOf(question) + utf8.encode(JSON.stringify(session)).length;
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
