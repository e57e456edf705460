// chat_view.js — the conversation's bubbles: a question, a reply (its text, the time
// waited, a note), and the messages a new question carries, read from the replies shown.

import { FINAL_STATES } from "./api.js";

export const part = (li, cls) => li.querySelector(`.${cls}`);

/** A question's bubble, not placed yet. */
export function makeUser(text) {
  const li = document.createElement("li");
  li.className = "msg user";
  const body = document.createElement("span");
  body.className = "text";
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
  const body = document.createElement("span");
  body.className = "text";
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
      setFinal(li, turn.state, `Error: ${typeof msg === "string" ? msg : "the job failed"}`, "");
    }
  } else if (!turn.job_id) {
    part(li, "note").textContent = `(${turn.state || "unknown"})`;
  }
  return li;
}

/** The conversation so far, oldest first: each completed reply shown, after its question.
 * Read from the page, so it is what the page shows, whichever tab asked it. */
export function historyOf(log) {
  const messages = [];
  for (const li of log.querySelectorAll("li.msg.assistant[data-state='completed']")) {
    if (li.question) {
      messages.push({ role: "user", content: li.question }, { role: "assistant", content: li.reply || "" });
    }
  }
  return messages;
}
