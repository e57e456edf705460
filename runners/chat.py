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
import os
import sys
import time

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
EMBEDDED_MAX_TOKENS = 512


def execute(job: base.Job) -> dict[str, Any]:
    messages = job.input.get("messages")
    if not isinstance(messages, list) or not messages:
        raise base.RunnerError("the job input has no messages to send")
    config = _config(job)
    embedded_used = not os.environ.get("OPENAI_BASE_URL")
    options: dict[str, Any] = {key: job.input[key] for key in ("max_tokens", "temperature")
                               if key in job.input}
    for key, env in (("max_tokens", "OFFLOAD_LLM_MAX_TOKENS"),
                     ("temperature", "OFFLOAD_LLM_TEMPERATURE")):
        if key not in options and os.environ.get(env):
            options[key] = float(os.environ[env]) if key == "temperature" else int(
                os.environ[env])
    if embedded_used and "max_tokens" not in options:
        # The small embedded model tends to ramble until its context is full.
        options["max_tokens"] = EMBEDDED_MAX_TOKENS
    job.progress(None, f"asking {config.model or 'the model'} at {config.base_url}")
    reply = llm_client.chat(config, _with_expert(job.input, messages), job.emit, **options)
    job.progress(1.0, "reply complete")
    return {"reply": reply.text, "model": reply.model, "finish_reason": reply.finish_reason,
            "usage": reply.usage, "streamed": reply.streamed,
            "session_id": job.input.get("session_id")}


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


def _config(job: base.Job) -> llm_client.Config:
    if os.environ.get("OPENAI_BASE_URL"):
        return llm_client.Config.from_env(os.environ)
    data_dir = job.data_dir
    if data_dir is None:
        raise base.RunnerError(
            "no LLM server: set OPENAI_BASE_URL, or start Offload (python launch.py) so "
            "its embedded model runs", "provider")
    status = _wait_for_embedded(job, data_dir)
    config = llm_client.Config.from_env(os.environ, base_url=str(status["base_url"]))
    config.api_key = os.environ.get(embedded.KEY_ENV)
    if not config.api_key:
        raise base.RunnerError(
            "the embedded model answers only the chats that Offload's supervisor starts (it "
            "hands them its key): submit this chat through Offload, or set OPENAI_BASE_URL",
            "provider")
    return config


def _wait_for_embedded(job: base.Job, data_dir: str) -> dict[str, Any]:
    deadline = time.monotonic() + EMBEDDED_WAIT_S
    waited = False
    while True:
        status = embedded.read_status(data_dir) or {}
        if status.get("ready") and status.get("base_url"):
            return status
        if status.get("available") is False:
            raise base.RunnerError(str(status.get("detail")), "provider")
        if time.monotonic() > deadline:
            raise base.RunnerError(
                f"the embedded model is not ready after {EMBEDDED_WAIT_S:g} s "
                f"({status.get('detail') or 'no supervisor is running it'}); see "
                "var/llm-server.log, or set OPENAI_BASE_URL to another server", "provider")
        if not waited:
            job.progress(None, "waiting for the embedded model to load")
            waited = True
        time.sleep(0.25)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="?", help="what to ask")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--max-tokens", type=int, default=None)


def _direct_input(args: argparse.Namespace) -> dict[str, Any]:
    if not args.question:
        raise ValueError("give a question, e.g. python -m runners.chat \"Hello?\"")
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.question})
    job_input: dict[str, Any] = {"messages": messages, "expert": False}
    if args.max_tokens:
        job_input["max_tokens"] = args.max_tokens
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
