"""Chat kind: one conversation turn through an OpenAI-compatible server, streamed.

Input: {"messages": [{"role": ..., "content": ...}, ...], "session_id": optional,
        "context": optional summary of the dashboard's recent history,
        "expert": optional bool (default true: answer as the dashboard's expert),
        "max_tokens": optional int, "temperature": optional float}
The server: OPENAI_BASE_URL (+ OPENAI_API_KEY, OFFLOAD_LLM_MODEL), or else the embedded
model that the supervisor runs (its address is in <data>/llm.json).

    python -m runners.chat "What does the CPU chart show?" [--system TEXT]
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time

from jobs import protocol as p
from jobs.protocol import embedded
from runners import base, llm_client

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator
    from typing import Any

EXPERT_PROMPT = (
    "You are the expert assistant of a monitoring dashboard. You explain what its CPU "
    "and memory charts and its background jobs show, and what to do about it. Answer "
    "briefly and concretely; when the data does not say, say so.")
EMBEDDED_WAIT_S = 120.0  # a chat sent while the embedded model loads waits this long
EMBEDDED_WAIT_MARGIN_S = 5.0  # and gives up this long before its deadline, saying why
EMBEDDED_MAX_TOKENS = 256  # eight chats in the seed frontend's 30 s of polling (docs/llm.md)
GONE_WITHIN_S = 2.0  # an embedded model that failed a chat is said stopped within this
RESTARTS_WAITED = 3  # a chat waits for at most this many starts of the embedded model
# max_tokens' lowest and highest: checked by hand here and, before a job is created, by
# the API's ChatInput (jobs/inputs.py), which is built from them.
MAX_TOKENS = (1, 32_768)
TEMPERATURE = (0.0, 2.0)  # and temperature's
# The settings that give every chat its default (the server's start refuses them out of
# these bounds; a runner by hand reads them from the environment or the .env itself).
DEFAULTS = (("max_tokens", "OFFLOAD_LLM_MAX_TOKENS", MAX_TOKENS, True),
            ("temperature", "OFFLOAD_LLM_TEMPERATURE", TEMPERATURE, False))
# A prompt longer than the embedded model's context, refused: how many tokens it had.
CONTEXT_REFUSED = re.compile(r"request \((\d+) tokens\) exceeds the available context"
                             r"|you requested \d+ tokens \((\d+) in the messages")
EARLIER_TURNS = 20  # at most this many earlier turns of a session recovered for a chat
INTERRUPTED = "[this answer was interrupted]"
ENGLISH_ONLY = (
    "(The embedded model, SmolLM2-135M, answers in English only. For other languages, "
    "connect a bigger local model: run Ollama or LM Studio and set OPENAI_BASE_URL, for "
    "example to http://127.0.0.1:11434/v1; see docs/llm.md.)\n")
OTHER_SCRIPT_SHARE = 0.3  # letters outside the Latin script beyond this: not English
# Common words of French, Spanish, German, Italian, Portuguese and Dutch that are no
# English words; English ones to weigh them against (names and quotes bring a few).
FOREIGN_WORDS = frozenset("""
    el los las una del que qué cómo cuál dónde por para está esto esta pero muy más también
    porque le les des une est sont pas dans pour avec qui quoi comment pourquoi je vous
    nous cette quel quelle très der das und ist nicht ein eine ich wie warum mit auf bitte
    sind wird il della che non sono gli perché cosa questo não você como é isso qual het een
    niet wat ik hoe waarom zijn""".split())
ENGLISH_WORDS = frozenset("""
    the is are what how why does do did you your a an of to in on and it this that can i
    my me with for about from be was there which should will would not""".split())


def execute(job: base.Job) -> dict[str, Any]:
    messages = job.input.get("messages")
    if not isinstance(messages, list) or not messages:
        raise base.RunnerError("the job input has no messages to send")
    options = _options(job.input)  # before any server is asked
    messages = [_without_notice(m) for m in _with_earlier_turns(job, messages)]
    waits_until = time.monotonic() + _patience(job)  # one patience over every wait
    config, server = _config(job, waits_until)
    embedded_used = server is not None
    # The packaged model only: OFFLOAD_LOCAL_MODEL may serve one that speaks the language.
    notice = ENGLISH_ONLY if embedded_used and not os.environ.get(
        "OFFLOAD_LOCAL_MODEL") and not is_english(_question(messages)) else ""
    if embedded_used and "max_tokens" not in options:
        # The small embedded model tends to ramble until its context is full.
        options["max_tokens"] = EMBEDDED_MAX_TOKENS
    full = _with_expert(job.input, messages)
    # The embedded model's context has a known size: a long conversation's first turns go.
    # A reply asked longer than the default takes no turn's room (a `max_tokens` of 32768
    # left out every turn): it gets what the context has left.
    wanted = int(options.get("max_tokens") or 0)  # set on the embedded model (above)
    least = min(wanted, EMBEDDED_MAX_TOKENS)  # the reply's room, whatever the turns take
    asked = _fitting(full, embedded.SLOT_CTX - least) if embedded_used else full
    _say_asking(job, config, len(full) - len(asked))
    job.emit(notice)
    spoken = [False]  # whether the model has said anything to this chat

    def emit(text: str) -> None:
        spoken[0] = spoken[0] or bool(text)
        job.emit(text)

    restarts_waited = 0
    while True:
        if embedded_used:  # a server refuses a prompt and reply its context cannot hold
            options["max_tokens"] = min(wanted, max(
                least, embedded.SLOT_CTX - sum(map(_tokens, asked))))
        try:
            reply = llm_client.chat(config, asked, emit, **options)
            break
        except base.RunnerError as exc:
            # The embedded model died as this chat was let go to it (its slot freed as the
            # chats it held died with it): the chat waits for its next start instead.
            if (server is not None and exc.transient and not spoken[0]
                    and restarts_waited < RESTARTS_WAITED and _gone(job, server)):
                restarts_waited += 1
                config, server = _config(job, waits_until)
                continue
            counted = _refused_as_too_long(exc.message)
            if counted is None:
                if not spoken[0]:
                    raise
                # Said of the reply cut short: the job's output, unless another attempt
                # starts it afresh.
                attempt, most = p.attempts(job.data)
                fate = ("it is not kept: the chat is tried again" if exc.transient
                        and attempt < most else "the partial reply is kept")
                raise base.RunnerError(f"{exc.message}; {fate}", exc.error_type,
                                       exc.transient) from exc
            if not embedded_used:  # its context's size unknown here: no turns left out
                raise base.RunnerError(
                    f"the conversation is too long for the model at {config.base_url}: it "
                    f"takes {counted} tokens, more than the model's context holds with its "
                    "answer; start a new conversation (Forget conversation on the dashboard) "
                    "or shorten the message, or use a model with a longer context",
                    "provider") from None
            # The guess was short (digits, code, emoji take more tokens than prose): the
            # server's own count says by how much; more of the earliest turns go.
            fewer = _fewer(full, asked, (embedded.SLOT_CTX - least) * sum(map(_tokens, asked))
                           // max(counted, 1))
            if fewer is None:
                raise base.RunnerError(
                    f"the message is too long for the embedded model: with the system prompt "
                    f"(and its context) it takes {counted} tokens, and a chat's context holds "
                    f"{embedded.SLOT_CTX}, its answer ({least} tokens at most) "
                    "included; shorten it, or set OPENAI_BASE_URL to a model with a longer "
                    "context",
                    "provider") from None
            asked = fewer
            _say_asking(job, config, len(full) - len(asked))
    job.progress(1.0, "reply complete")
    # The model's name is the server's word, as an error's is: never the key it was sent.
    model = config.model_named(reply.model) if isinstance(reply.model, str) else reply.model
    return {"reply": notice + reply.text, "model": model,
            "finish_reason": reply.finish_reason, "usage": reply.usage, "streamed": reply.streamed,
            "session_id": job.input.get("session_id")}


def _options(job_input: dict[str, Any]) -> dict[str, Any]:
    """max_tokens and temperature for the server: the input's, else the settings' (see
    DEFAULTS); one out of its bounds is a RunnerError that names it (the API refuses such
    an input, but a job file edited by hand, or a runner by hand, comes here)."""
    options: dict[str, Any] = {}
    for key, env, (low, high), whole in DEFAULTS:
        if job_input.get(key) is not None:  # null: the default, as the API takes it
            options[key] = base.number(job_input, key, (low, low, high), whole)
        elif os.environ.get(env):
            try:
                value = float(os.environ[env])
            except ValueError:
                value = math.nan  # no number: refused below, as one out of bounds
            try:
                options[key] = base.number({env: value}, env, (value, low, high), whole)
            except base.RunnerError as exc:
                raise base.RunnerError(f"{exc.message}, or unset (every chat's {key}; set "
                                       "in the environment or .env)") from None
    return options


def is_english(text: str) -> bool:
    """Whether a question reads as English: mostly Latin letters, and no more common
    words of other languages that use them than English ones. Code, numbers and a few
    accented names pass; a question with no letters passes."""
    letters = [c for c in text[:4000] if c.isalpha()]
    other = sum(1 for c in letters if not _latin(c))
    if other > OTHER_SCRIPT_SHARE * len(letters):
        return False
    words = re.findall(r"[^\W\d_]+", text[:4000].lower())
    foreign = sum(1 for w in words if w in FOREIGN_WORDS)
    return foreign < 2 or foreign <= sum(1 for w in words if w in ENGLISH_WORDS)


def _latin(letter: str) -> bool:
    code = ord(letter)
    # Basic Latin to Latin Extended-B, Latin Extended Additional, fullwidth Latin.
    return code < 0x250 or 0x1E00 <= code <= 0x1EFF or 0xFF21 <= code <= 0xFF5A


def _question(messages: list[dict[str, Any]]) -> str:
    """The last user message: the question being answered."""
    users = [m for m in messages if m.get("role") == "user"]
    return str(users[-1].get("content") or "") if users else ""


def _without_notice(message: dict[str, Any]) -> dict[str, Any]:
    """An earlier reply as the model said it: without the embedded model's word on its
    languages, which the model need not read back."""
    content = message.get("content")
    if message.get("role") == "assistant" and isinstance(content, str):
        return {**message, "content": content.removeprefix(ENGLISH_ONLY)}
    return message


def _with_earlier_turns(job: base.Job, messages: list[dict[str, Any]]
                        ) -> list[dict[str, Any]]:
    """The earlier turns of this chat's session that its messages lack, from their job
    files, before the new message: a client that sent this one while the previous answer
    was still coming built its history without that answer. Only turns still answering
    when this chat was sent: a client that leaves out earlier ones means to. An answer
    cut short (cancelled, timed out, failed) comes with what it had said, marked as
    interrupted; one that had said nothing is left out."""
    after = job.data.get(p.F_AFTER)
    if not isinstance(after, str) or job.data_dir is None:
        return messages
    jobs_dir = os.path.join(job.data_dir, "jobs")
    created = job.data.get(p.F_CREATED_AT)
    known = {str(m.get("content") or "").strip() for m in messages
             if m.get("role") == "assistant"}
    turns: list[dict[str, Any]] = []
    for _ in range(EARLIER_TURNS):
        if not isinstance(after, str) or not p.is_valid_id(after):
            break
        earlier = p.read_json_or_none(p.job_path(jobs_dir, after)) or {}
        if earlier.get(p.F_STATE) not in p.FINAL_STATES:
            break  # gone, or (started by hand) still answering
        if not _ended_after(earlier, created):
            break  # the client could have had it: left out on purpose, as those before
        reply = _reply_of(earlier)
        if reply is not None and reply.strip() in known:
            break  # the client has this turn, and those before it
        questions = [m for m in (earlier.get(p.F_INPUT) or {}).get("messages") or []
                     if isinstance(m, dict) and m.get("role") == "user"]
        if reply is not None and questions:
            turns[:0] = [{"role": "user", "content": str(questions[-1].get("content"))},
                         {"role": "assistant", "content": reply}]
        after = earlier.get(p.F_AFTER)
    if not turns:
        return messages
    return [*_without_questions_of(messages[:-1], turns), *turns, messages[-1]]


def _without_questions_of(history: list[dict[str, Any]], turns: list[dict[str, Any]]
                          ) -> list[dict[str, Any]]:
    """`history` less the questions of `turns` it ends with, unanswered: a client that
    keeps its history as OpenAI's API has it sent [Q1, Q2] while Q1 was answered, and the
    model would have been asked Q1 twice."""
    asked = [str(turn["content"]).strip() for turn in turns if turn["role"] == "user"]
    for count in range(min(len(asked), len(history)), 0, -1):
        tail = history[-count:]
        if (all(m.get("role") == "user" for m in tail)
                and [str(m.get("content") or "").strip() for m in tail] == asked[-count:]):
            return history[:-count]
    return history


def _ended_after(job_data: dict[str, Any], created_at: object) -> bool:
    """Whether a job ended after `created_at`: it was still answering then."""
    try:
        return p.parse_iso(str(job_data.get(p.F_FINISHED_AT))) > p.parse_iso(str(created_at))
    except ValueError:
        return True  # no times to tell by: the turn is kept


def _reply_of(job_data: dict[str, Any]) -> str | None:
    """A finished chat's reply; an interrupted one's partial reply, marked; else None."""
    result = job_data.get(p.F_RESULT)
    if job_data.get(p.F_STATE) == p.JobState.COMPLETED and isinstance(result, dict):
        return str(result.get("reply") or "")
    partial = str(job_data.get(p.F_OUTPUT) or "").removeprefix(ENGLISH_ONLY).strip()
    return f"{partial} {INTERRUPTED}" if partial else None


def _with_expert(job_input: dict[str, Any], messages: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    if job_input.get("expert", True) is False:
        return messages
    system = EXPERT_PROMPT
    context = job_input.get("context")
    if context:
        system += f"\n\nThe dashboard right now:\n{context}"
    if messages and messages[0].get("role") == "system":
        system += f"\n\n{messages[0].get('content', '')}"
        messages = messages[1:]
    return [{"role": "system", "content": system}, *messages]


def _fitting(messages: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """`messages` without their earliest turns (a system prompt and the last message
    stay) until they fit in about `tokens`: a server refuses a prompt longer than its
    context, and a conversation on the dashboard only grows."""
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system):]
    costs = [_tokens(message) for message in turns]
    total = sum(_tokens(message) for message in system) + sum(costs)
    first = 0
    while first < len(turns) - 1 and total > tokens:
        total -= costs[first]
        first += 1
    return system + turns[first:]


def _fewer(messages: list[dict[str, Any]], asked: list[dict[str, Any]], tokens: int
           ) -> list[dict[str, Any]] | None:
    """`messages` fitted to `tokens`, with fewer turns than `asked` in any case; None
    when `asked` has only the system prompt and the last message left."""
    fewer = _fitting(messages, tokens)
    if len(fewer) < len(asked):
        return fewer
    system = asked[:1] if asked and asked[0].get("role") == "system" else []
    turns = asked[len(system):]
    return system + turns[1:] if len(turns) > 1 else None


def _refused_as_too_long(message: str) -> int | None:
    """The prompt's tokens, as the server counted them, where it refused a prompt
    longer than its context (llama-server's words, then llama-cpp-python's); else None."""
    found = CONTEXT_REFUSED.search(message)
    return int(found.group(1) or found.group(2)) if found else None


def _say_asking(job: base.Job, config: llm_client.Config, left_out: int) -> None:
    job.progress(None, f"asking {config.model or 'the model'} at {config.base_url}" + (
        f" (the {left_out} earliest messages left out to fit its context)" if left_out else ""))


def _tokens(message: dict[str, Any]) -> int:
    """A generous guess at the tokens a message takes (no tokenizer here): one for each
    three ASCII characters, two for any other (a Chinese character is one or more), and a
    few for its framing."""
    text = str(message.get("content") or "")
    ascii_chars = len(text.encode("ascii", "ignore"))
    return ascii_chars // 3 + 2 * (len(text) - ascii_chars) + 8


def _config(job: base.Job, waits_until: float,
            ) -> tuple[llm_client.Config, dict[str, Any] | None]:
    """The server to ask, and the embedded model's status where it is that one's (waited
    for until the monotonic `waits_until` at most)."""
    if os.environ.get("OPENAI_BASE_URL"):
        return llm_client.Config.from_env(os.environ), None
    data_dir = job.data_dir
    if data_dir is None:
        raise base.RunnerError(
            "no LLM server: set OPENAI_BASE_URL, or start Offload (python launch.py) so "
            "its embedded model runs", "provider")
    key = os.environ.get(embedded.KEY_ENV)
    if not key:
        raise base.RunnerError(
            "the embedded model answers only the chats that Offload's supervisor starts (it "
            "hands them its key): submit this chat through Offload, or set OPENAI_BASE_URL",
            "provider")
    status = _wait_for_embedded(job, data_dir, key, waits_until)
    config = llm_client.Config.from_env(os.environ, base_url=str(status["base_url"]))
    config.api_key = key
    return config, status


def _gone(job: base.Job, status: dict[str, Any]) -> bool:
    """Whether the embedded model of `status` has stopped, or stops within GONE_WITHIN_S
    (its supervisor says so a moment after it dies)."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        now = embedded.read_status(str(job.data_dir)) or {}
        if any(now.get(key) != status.get(key) for key in ("ready", "base_url", "pid")):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _patience(job: base.Job) -> float:
    """How long in all a chat waits for the embedded model to be ready: EMBEDDED_WAIT_S,
    or less, so as to say why before its deadline."""
    timeout = job.data.get(p.F_TIMEOUT_S)
    if isinstance(timeout, (int, float)) and timeout > 0:
        return min(EMBEDDED_WAIT_S, max(1.0, timeout - EMBEDDED_WAIT_MARGIN_S))
    return EMBEDDED_WAIT_S


def _wait_for_embedded(job: base.Job, data_dir: str, key: str,
                       waits_until: float) -> dict[str, Any]:
    """The status of the embedded model once it is ready, and the one this chat's key is
    for: a status left by a supervisor killed outright names a port that anyone may hold
    now, and the chat's prompt and key must not go there."""
    started = time.time()
    waited = False
    while True:
        status = embedded.read_status(data_dir) or {}
        if status.get("ready") and status.get("base_url"):
            if status.get("key_id") == embedded.key_id(key):
                return status
            if _written_since(status, started):  # a supervisor started after this chat
                raise base.RunnerError(
                    "the embedded model was started again, with a key this chat was not "
                    "given (its supervisor was restarted); the chat runs again", "provider",
                    transient=True)
        elif status.get("available") is False:
            raise base.RunnerError(str(status.get("detail")), "provider")
        if time.monotonic() > waits_until:
            raise base.RunnerError(
                f"the embedded model is not ready within the {_patience(job):g} s a chat "
                "waits for it "
                f"({status.get('detail') or 'no supervisor is running it'}); see "
                "var/llm-server.log, or set OPENAI_BASE_URL to another server", "provider",
                transient=True)
        if not waited:
            job.progress(None, "waiting for the embedded model to load")
            waited = True
        time.sleep(0.25)


def _written_since(status: dict[str, Any], moment: float) -> bool:
    try:
        return p.parse_iso(str(status.get("updated_at"))) > moment
    except ValueError:
        return False


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="?",
                        help="what to ask; - reads it from stdin, where other local accounts "
                             "cannot see it (they can see a command line)")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--max-tokens", type=int, default=None)


def _direct_input(args: argparse.Namespace) -> dict[str, Any]:
    if args.question == "-":
        args.question = sys.stdin.read().strip()
    if not args.question:
        raise ValueError("give a question, e.g. echo \"Hello?\" | python -m runners.chat -")
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.question})
    job_input: dict[str, Any] = {"messages": messages, "expert": False}
    if args.max_tokens is not None:
        job_input["max_tokens"] = args.max_tokens
    _options(job_input)  # out of bounds (or a setting): bad usage, before a model starts
    return job_input


@contextlib.contextmanager
def _server_for_direct_run(args: argparse.Namespace) -> Iterator[None]:
    """By hand with no server configured: the embedded model, started for this question
    alone (a running Offload's answers only the runners it starts)."""
    if os.environ.get("OPENAI_BASE_URL"):
        yield
        return
    from runners.local_llm import temporary_server

    with temporary_server() as (base_url, key):
        os.environ["OPENAI_BASE_URL"] = base_url
        os.environ["OPENAI_API_KEY"] = key  # this process only: never a command line
        yield


def main(argv: list[str] | None = None) -> int:
    return base.main("chat", execute, _add_arguments, _direct_input, argv,
                     direct_context=_server_for_direct_run)


if __name__ == "__main__":
    sys.exit(main())
