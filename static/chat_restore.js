// chat_restore.js — the chat's calls given up when the server does not answer them, and
// a conversation's earlier turns loaded on page load: asked again while the server cannot
// answer, and once an API token is given.

import { apiJSON, tokenGiven } from "./api.js";

const RESTORE_RETRY_MS = 1000;      // the conversation's turns asked again after this,
const RESTORE_RETRY_MAX_MS = 10_000; // doubling up to this
const RESTORE_SLOW_MS = 1000;        // then "Loading this conversation…" is said
export const ANSWER_WAIT_MS = 30_000;  // a call of the chat's unanswered after this is given up

/** An API call given up after ANSWER_WAIT_MS (`late` then): a server that took it and
 * never answered held the chat ("sending…", Send disabled) until a reload. The time the
 * token's form is open is the user's, not the server's: it is not counted. */
export async function askInTime(path, options = {}) {
  const stop = new AbortController();
  const tokenAsked = () => Boolean(document.getElementById("token-dialog")?.open);
  let late;
  const wait = () => {
    late = setTimeout(() => (tokenAsked() ? wait() : stop.abort()), ANSWER_WAIT_MS);
  };
  wait();
  try {
    const r = await apiJSON(path, { ...options, signal: stop.signal });
    const offline = !r.status && navigator.onLine === false;  // said as "network error"
    const error = stop.signal.aborted ? "no answer" : offline ? "this browser is offline" : r.error;
    return { ...r, late: stop.signal.aborted, error };
  } finally {
    clearTimeout(late);
  }
}

/** The turns of the conversation `current()` names, oldest first, or null (not loaded:
 * said with `say`; or forgotten in another tab meanwhile). `say(text)` tells what
 * happens under the chat; `said()` is what it tells now. */
export async function restoreTurns(current, say, said) {
  // A slow server: Send stayed disabled over an empty conversation, and nothing said why.
  const slow = setTimeout(() => { if (!said()) say("Loading this conversation…"); }, RESTORE_SLOW_MS);
  try {
    return await loadTurns(current, say);
  } finally {
    clearTimeout(slow);
  }
}

/** Asked again while the server cannot answer: a page that went on without them showed
 * an empty conversation, and its next question went without the earlier turns. */
async function loadTurns(current, say) {
  let r;
  for (let delay = RESTORE_RETRY_MS; ; delay = Math.min(delay * 2, RESTORE_RETRY_MAX_MS)) {
    const asked = current();
    r = await askInTime(`/api/sessions/${encodeURIComponent(asked)}`);
    // Forgotten in another tab meanwhile: these turns are gone, and the new conversation
    // has none (shown, they went back to the server with the next question).
    if (asked !== current()) return null;
    if (r.status === 401) {
      // Refused until a token is given (the form dismissed, a wrong token): the page
      // went on without the conversation until it was reloaded.
      say("This conversation loads once the API token is given.");
      await tokenGiven();
      say("Loading this conversation…");
      continue;
    }
    if (r.ok || (r.status && r.status < 500)) break;
    say(`Could not load this conversation (${r.error}); trying again…`);
    await new Promise((res) => setTimeout(res, delay));
  }
  if (!r.ok || !r.data || !Array.isArray(r.data.turns)) {
    say(`Could not load this conversation: ${r.error || "no turns in the answer"}`);
    return null;
  }
  say("");
  return r.data.turns;
}
