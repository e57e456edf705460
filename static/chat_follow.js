// chat_follow.js — one reply followed to its end: its job's event stream (picked up
// again where it stopped after a dropped connection; polled a while when the server
// refuses it), the time waited shown, and a silence of 120 s said.

import { apiJSON, followJob, FINAL_STATES } from "./api.js";
import { keepingEnd, part, setFinal } from "./chat_view.js";

const STALL_MS = 120_000;   // say so after this long running with nothing from the server
const POLL_MS = 1000;
const POLLS_BETWEEN_STREAMS = 5;  // a refused stream is asked for again after these
const UNHEARD_POLL_MS = 5000;  // a reply waiting for a stream slot is asked its state after this

/** Follow the chat job `jobId` (last known `state`), shown in `li`, to its end. Returns
 * its follower ({jobId, li, output, stalled, done, finish(state, text, note)});
 * `stalled(p)` is told when it has said nothing for STALL_MS, `resumed(p)` when it speaks
 * again, `ended(p)` once it is final. */
export function followReply(li, jobId, state, { stalled, resumed, ended }) {
  const started = Date.now();
  const controller = new AbortController();
  const p = {
    jobId, li, controller, done: false, output: "", state: state || "queued",
    activity: Date.now(), stalled: false, heard: false,
  };
  li.setAttribute("aria-busy", "true");

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
    stalled(p);
  }

  function finish(state, text, note) {
    if (p.done) return;
    p.done = true;
    clearInterval(timer);
    controller.abort();
    li.classList.remove("stalled");
    keepingEnd(li, () => setFinal(li, state, text, note));
    ended(p);
  }
  p.finish = finish;

  const onActivity = () => { p.activity = Date.now(); p.heard = true; };

  /** Show the job's copy after an event of its stream. */
  function onJob(job) {
    if (p.done || !job) return;
    onActivity();
    if (p.stalled && !FINAL_STATES.has(job.state)) {
      p.stalled = false;  // it came after all
      li.classList.remove("stalled");
      part(li, "note").textContent = "";
      resumed(p);
    }
    if (job.state) p.state = job.state;
    sayAttempt(job);
    if (typeof job.output === "string" && job.output !== p.output) {
      p.output = job.output;
      keepingEnd(li, () => { part(li, "text").textContent = job.output; });
    }
    if (FINAL_STATES.has(job.state)) finishFromJob(job);
  }

  /** A reply tried again (its stream cut, the model restarted, Offload restarted) starts
   * over: its words so far went away without a word said. Say why, and that it comes
   * again. */
  function sayAttempt(job) {
    if (typeof job.attempt !== "number" || job.attempt === p.attempt) return;
    p.attempt = job.attempt;
    if (job.attempt < 2 || FINAL_STATES.has(job.state)) return;
    const errors = Array.isArray(job.earlier_errors) ? job.earlier_errors : [];
    const last = errors.length ? errors[errors.length - 1] : null;
    const why = last && typeof last.message === "string" ? `: ${last.message}` : "";
    const of = typeof job.max_attempts === "number" ? ` of ${job.max_attempts}` : "";
    part(li, "note").textContent = `Answering again (attempt ${job.attempt}${of})${why}`;
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
      // A reply cut midway is kept (the error says so): shown, with the error under it.
      if (out) finish(job.state, out, `Error: ${msg}`);
      else finish(job.state, `Error: ${msg}`, "");
    }
  }

  /** Ask for the reply once: its state learnt, and it finished if it has ended. */
  async function check() {
    const r = await apiJSON(`/api/ai_chat_result/${encodeURIComponent(jobId)}`, { source: "chat" });
    if (p.done || !r.ok || !r.data) return;
    const d = r.data;
    if (d.status === "processing" && d.state) {
      p.state = d.state;
    } else if (d.status === "completed") {
      finish("completed", d.reply || "", "");
    } else if (d.status === "error") {
      // Find out which final state it was (failed, cancelled, timeout).
      const j = await apiJSON(`/api/jobs/${encodeURIComponent(jobId)}`);
      const state = j.ok && j.data && FINAL_STATES.has(j.data.state) ? j.data.state : "failed";
      if (state === "cancelled") finish("cancelled", p.output, "Cancelled.");
      else finish(state, `Error: ${d.message || "the job failed"}`, "");
    } else if (d.status === "not_found") {
      finish("failed", "Error: the job was not found on the server", "");
    }
  }

  /** Ask for the reply `times` times, a second apart (or until it has ended). */
  async function poll(times) {
    for (let i = 0; i < times && !p.done; i += 1) {
      await check();
      if (!p.done) await new Promise((res) => setTimeout(res, POLL_MS));
    }
  }

  /** Waiting for one of the page's stream slots, it said "queued" though its job ran
   * (or had ended): its state is asked for until its stream speaks. */
  (async () => {
    for (;;) {
      await new Promise((res) => setTimeout(res, UNHEARD_POLL_MS));
      if (p.done || p.heard) return;
      if (!document.hidden) await check();
    }
  })().catch(() => { /* never surface to the console */ });

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
  return p;
}

function replyFromResult(result) {
  if (!result) return "";
  if (typeof result === "string") return result;
  return result.reply || result.text || result.content || "";
}
