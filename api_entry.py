"""Offload's API: build the app, include the routes, serve.

    python api_entry.py [--host H] [--port P]
    uvicorn api_entry:app --workers 4
    gunicorn api_entry:app -k uvicorn.workers.UvicornWorker -w 4
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from jobs import routes
from jobs.lifespan import lifespan
from jobs.settings import get_settings

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app() -> FastAPI:
    app = FastAPI(title="Offload", version=routes.VERSION, lifespan=lifespan)
    app.include_router(routes.router)
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


app = create_app()


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python api_entry.py")
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    if not settings.api_token and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"refusing to listen on {args.host} without OFFLOAD_API_TOKEN: anyone on the "
              "network could run jobs. Set OFFLOAD_API_TOKEN or listen on 127.0.0.1.",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
