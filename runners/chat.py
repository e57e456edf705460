"""Chat kind: one conversation turn through an OpenAI-compatible server, streamed.

Input: {"messages": [{"role": ..., "content": ...}, ...], "session_id": optional,
        "max_tokens": optional int, "temperature": optional float}
Environment: OPENAI_BASE_URL (".../v1"), OPENAI_API_KEY, OFFLOAD_LLM_MODEL.

    python -m runners.chat "What does the CPU chart show?" [--system TEXT]
"""

from __future__ import annotations

import os
import sys

from runners import base, llm_client

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def execute(job: base.Job) -> dict[str, Any]:
    messages = job.input.get("messages")
    if not isinstance(messages, list) or not messages:
        raise base.RunnerError("the job input has no messages to send")
    config = llm_client.Config.from_env(os.environ)
    options = {key: job.input[key] for key in ("max_tokens", "temperature") if key in job.input}
    job.progress(None, f"asking {config.model or 'the default model'} at {config.base_url}")
    reply = llm_client.stream_chat(config, messages, job.emit, **options)
    job.progress(1.0, "reply complete")
    return {"reply": reply.text, "model": reply.model, "finish_reason": reply.finish_reason,
            "usage": reply.usage}


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
    job_input: dict[str, Any] = {"messages": messages}
    if args.max_tokens:
        job_input["max_tokens"] = args.max_tokens
    return job_input


def main(argv: list[str] | None = None) -> int:
    return base.main("chat", execute, _add_arguments, _direct_input, argv)


if __name__ == "__main__":
    sys.exit(main())
