// api.js — every call to the Offload API goes through here.
// Adds the bearer token (kept in sessionStorage), asks for it when a call answers
// 401, reports network trouble in #net-error, and reads event streams with fetch().

const TOKEN_KEY = "offload-token";

/** Current token, or "" when none has been given. */
function getToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
}

function setToken(value) {
  try { sessionStorage.setItem(TOKEN_KEY, value); } catch { /* storage disabled */ }
}

function authHeaders(extra = {}) {
  const token = getToken();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
}

// ---- token dialog -------------------------------------------------------
// Several pollers may hit 401 at the same moment: they all wait on one shared
// promise, so the form is shown only once at a time.
let tokenPromise = null;
let declined = false;  // Escape: no more asking until the user asks for the form again
const tokenWaiters = [];  // each resolved by the next token entered in the form

/** Resolves once the user enters a token in the form (from now on). */
export function tokenGiven() {
  return new Promise((resolve) => { tokenWaiters.push(resolve); });
}

function askForToken(rejected) {
  if (tokenPromise) return tokenPromise;
  if (declined) return Promise.resolve(false);
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const note = document.getElementById("token-note");
  if (!dialog || !form || !input) return Promise.resolve(false);
  tokenPromise = new Promise((resolve) => {
    note.textContent = rejected
      ? "That token was not accepted. Please enter the API token again."
      : "This server needs an API token.";
    input.value = "";
    const finish = (ok) => {
      form.removeEventListener("submit", onSubmit);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      else dialog.removeAttribute("open");
      tokenPromise = null;
      resolve(ok);
    };
    const onSubmit = (ev) => {
      ev.preventDefault();
      const value = input.value.trim();
      if (!value) { input.focus(); return; }
      setToken(value);
      finish(true);
      for (const resolve of tokenWaiters.splice(0)) resolve();
    };
    // Escape closes the dialog: stop asking (the next poll's 401 opened it again, for
    // good), say so, and keep a way back to the form; calls fail with 401 meanwhile.
    const onCancel = () => {
      declined = true;
      const bar = document.getElementById("token-needed");
      if (bar) bar.hidden = false;
      finish(false);
    };
    form.addEventListener("submit", onSubmit);
    dialog.addEventListener("cancel", onCancel);
    if (typeof dialog.showModal === "function") {
      try { dialog.showModal(); } catch { dialog.setAttribute("open", ""); }
    } else {
      dialog.setAttribute("open", "");
    }
    input.focus();
  });
  return tokenPromise;
}

/** The "Enter the token" button of the bar shown once the form was dismissed. */
export function initTokenBar() {
  const button = document.getElementById("token-ask");
  if (!button) return;
  button.addEventListener("click", () => {
    declined = false;
    document.getElementById("token-needed").hidden = true;
    askForToken(false);
  });
}

// ---- network error banner -------------------------------------------------
// Each poller reports under its own key; the banner shows while any key fails.
const failures = new Map();

function renderNetError() {
  const el = document.getElementById("net-error");
  if (!el) return;
  if (failures.size === 0) {
    el.hidden = true;
    el.textContent = "";
  } else {
    el.hidden = false;
    el.textContent = [...failures.values()][0];
  }
}

export function reportFailure(source, message) {
  failures.set(source, message);
  renderNetError();
}

export function reportOk(source) {
  if (failures.delete(source)) renderNetError();
}

// ---- requests --------------------------------------------------------------

/**
 * fetch() with the token; on 401 asks for a token once and retries once.
 * Throws only on network failure (TypeError) or abort.
 */
export async function apiFetch(path, options = {}) {
  const send = () => fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  let hadToken = Boolean(getToken());
  let res = await send();
  if (res.status === 401) {
    const ok = await askForToken(hadToken);
    if (ok) res = await send();
  }
  return res;
}

/** Pull a readable message out of an error response ({"detail": ...}). */
export async function errorDetail(res) {
  try {
    const body = await res.json();
    if (body && body.detail !== undefined) {
      return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch { /* not JSON */ }
  return `HTTP ${res.status}`;
}

/**
 * JSON request that never throws. Returns {ok, status, data, error}.
 * `source` names the caller for the #net-error banner (optional).
 */
export async function apiJSON(path, { method = "GET", body, source, signal, headers = {} } = {}) {
  const options = { method, signal, headers };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { ...headers, "Content-Type": "application/json" };
  }
  try {
    const res = await apiFetch(path, options);
    // A poll answered 5xx (a proxy whose server is down: 502, 504; the server's own 500 or
    // 503) fails as one that got no answer: it said nothing, and the page went stale.
    if (source && method === "GET" && res.status >= 500) {
      reportFailure(source, `The server failed (${source}: HTTP ${res.status}). Retrying…`);
    } else if (source) reportOk(source);
    if (!res.ok) {
      return { ok: false, status: res.status, data: null, error: await errorDetail(res) };
    }
    let data = null;
    try { data = await res.json(); } catch { data = null; }
    return { ok: true, status: res.status, data, error: null };
  } catch (err) {
    if (err && err.name === "AbortError") {
      return { ok: false, status: 0, data: null, error: "aborted" };
    }
    if (source) reportFailure(source, "Cannot reach the server. Retrying…");
    return { ok: false, status: 0, data: null, error: "network error" };
  }
}

/** Plain-text GET that never throws. */
export async function apiText(path) {
  try {
    const res = await apiFetch(path);
    if (!res.ok) return { ok: false, status: res.status, text: await errorDetail(res) };
    return { ok: true, status: res.status, text: await res.text() };
  } catch {
    return { ok: false, status: 0, text: "Network error: could not load." };
  }
}

/** An event stream answered with an HTTP error: following it again would not help. */
export class StreamRefused extends Error {
  constructor(status) {
    super(`stream HTTP ${status}`);
    this.status = status;
  }
}

/**
 * Read a text/event-stream with fetch so the Authorization header can be sent.
 * Calls onData(parsedJSON, id) for every "data:" event (id: its "id:" field, or null),
 * onActivity() for every chunk (keep-alives included). Resolves with "closed" when the
 * server ends the stream, "aborted" on abort; rejects with StreamRefused on an HTTP
 * error, and with another error when the connection fails or stays silent for idleMs
 * (a laptop back from sleep may hold a connection that is gone).
 */
export async function readEventStream(path, { onData, onActivity, signal, headers = {}, idleMs = 0 } = {}) {
  const attempt = new AbortController();
  const abort = () => attempt.abort();
  if (signal) {
    if (signal.aborted) return "aborted";
    signal.addEventListener("abort", abort, { once: true });
  }
  let idle = null;
  let silent = false;
  const watch = () => {
    if (!idleMs) return;
    clearTimeout(idle);
    idle = setTimeout(() => { silent = true; attempt.abort(); }, idleMs);
  };
  let buffer = "";
  let dataLines = [];
  let eventId = null;

  const dispatch = () => {
    const id = eventId;
    eventId = null;
    if (dataLines.length === 0) return;
    const payload = dataLines.join("\n");
    dataLines = [];
    let parsed;
    try { parsed = JSON.parse(payload); } catch { return; } // ignore malformed events
    if (onData) onData(parsed, id);
  };

  try {
    watch();
    const res = await apiFetch(path, {
      signal: attempt.signal, headers: { ...headers, Accept: "text/event-stream" },
    });
    if (!res.ok || !res.body) throw new StreamRefused(res.status);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      watch();
      if (onActivity) onActivity();
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") dispatch();                 // blank line ends an event
        else if (line.startsWith(":")) continue;     // keep-alive comment
        else if (line.startsWith("data:")) dataLines.push(line.slice(5).replace(/^ /, ""));
        else if (line.startsWith("id:")) eventId = line.slice(3).replace(/^ /, "");
        // other fields (event:, retry:) are not used by this API
      }
    }
    return "closed"; // an event without its blank line is cut: a resume sends it again
  } catch (err) {
    if (signal && signal.aborted) return "aborted";
    if (silent) throw new Error("the stream went silent");
    throw err;
  } finally {
    clearTimeout(idle);
    if (signal) signal.removeEventListener("abort", abort);
  }
}

/** A job's copy after one event: `output` replaces the output, `output_delta` extends it. */
export function applyEvent(job, event) {
  const next = { ...(job || {}), ...event };
  delete next.output_delta;
  if (typeof event.output_delta === "string") {
    next.output = ((job && job.output) || "") + event.output_delta;
  }
  return next;
}

const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 5000;
const STREAM_IDLE_MS = 45_000;  // three of the server's 15 s keep-alives missed

/** Wait `ms`, less if the browser comes back online or `signal` aborts. */
function pause(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      window.removeEventListener("online", done);
      if (signal) signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    window.addEventListener("online", done);
    if (signal) signal.addEventListener("abort", done);
  });
}

// ---- stream slots ----------------------------------------------------------
// A browser opens at most six connections to a host, for all its tabs together, and
// each stream holds one: a few tabs each following a chat and a training took them
// all, and every page's requests waited. So a page streams at most MAX_STREAMS jobs at
// once (the rest wait their turn), and none while it is hidden (another tab in front).
const MAX_STREAMS = 2;
let streamsOpen = 0;
const streamWaiters = [];     // each returns true once it has taken a slot (or gave up)
const openReads = new Set();  // AbortControllers of the streams open now

function takeStream(signal) {
  return new Promise((resolve) => {
    const tryTake = () => {
      if (signal && signal.aborted) { resolve(false); return true; }
      if (streamsOpen >= MAX_STREAMS || document.hidden) return false;
      streamsOpen += 1;
      if (signal) signal.removeEventListener("abort", wakeStreamWaiters);
      resolve(true);
      return true;
    };
    if (tryTake()) return;
    streamWaiters.push(tryTake);
    if (signal) signal.addEventListener("abort", wakeStreamWaiters, { once: true });
  });
}

function wakeStreamWaiters() {
  for (let i = 0; i < streamWaiters.length;) {
    if (streamWaiters[i]()) streamWaiters.splice(i, 1);
    else i += 1;
  }
}

function giveStream() {
  streamsOpen -= 1;
  wakeStreamWaiters();
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) for (const read of openReads) read.abort();  // follow again once shown
  else wakeStreamWaiters();
});

/** One read of a stream in a slot of its own; "hidden" if the page was hidden meanwhile. */
async function readInASlot(path, options, signal) {
  if (!(await takeStream(signal))) return "aborted";
  const read = new AbortController();
  const stop = () => read.abort();
  if (signal) signal.addEventListener("abort", stop, { once: true });
  openReads.add(read);
  try {
    const ended = await readEventStream(path, { ...options, signal: read.signal });
    return ended === "aborted" && !(signal && signal.aborted) ? "hidden" : ended;
  } finally {
    openReads.delete(read);
    if (signal) signal.removeEventListener("abort", stop);
    giveStream();
  }
}

/**
 * Follow a job's event stream to its final state. Keeps a copy of the job, calls
 * onJob(copy) after each event and onActivity() for anything the server sends
 * (keep-alives too), and when the connection drops (or ends early, or the page was
 * hidden) follows again with Last-Event-ID, so the output goes on where it stopped:
 * nothing missed, nothing twice. Resolves with the final copy, or "aborted"; rejects
 * with StreamRefused when the server answers an HTTP error (callers then poll).
 */
export async function followJob(path, { onJob, onActivity, signal, source } = {}) {
  let job = null;
  let lastId = null;
  let delay = RECONNECT_MIN_MS;
  for (;;) {
    const headers = lastId === null ? {} : { "Last-Event-ID": lastId };
    let ended;
    try {
      ended = await readInASlot(path, {
        headers, idleMs: STREAM_IDLE_MS, onActivity,
        onData: (event, id) => {
          job = applyEvent(job, event);
          if (id !== null) lastId = id;
          delay = RECONNECT_MIN_MS;
          if (source) reportOk(source);
          if (onJob) onJob(job);
        },
      }, signal);
    } catch (err) {
      if (err instanceof StreamRefused) throw err;
      ended = "dropped";
      if (source) reportFailure(source, `Lost the stream (${source}). Reconnecting…`);
    }
    if (ended === "aborted") return "aborted";
    if (ended === "hidden") continue;  // its slot waits for the page to show again
    if (job && FINAL_STATES.has(job.state)) return job;
    await pause(delay, signal);
    if (signal && signal.aborted) return "aborted";
    delay = Math.min(delay * 2, RECONNECT_MAX_MS);
  }
}

export const FINAL_STATES = new Set(["completed", "failed", "cancelled", "timeout"]);
