"""Ray's Jobs REST API over plain HTTP: submit, look up, read the log, stop, delete.

No `import ray`: the API side stays light and runs where Ray does not (Windows).
The address is the Ray dashboard's (`http://head:8265`), which serves the Jobs API.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import quote, urlsplit

from jobs.settings import RAY_HTTP_TIMEOUT_S


class RayJobStatus(str, Enum):
    """A Ray job's `status`, as its Jobs API spells it; the last three are final."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def __str__(self) -> str:  # the value, in f-strings and logs, as Ray says it
        return str(self.value)


TERMINAL = frozenset({RayJobStatus.STOPPED, RayJobStatus.SUCCEEDED, RayJobStatus.FAILED})


class RayError(OSError):
    """Ray answered something unusable (an error status, not JSON); the message says what."""


class RayRefused(RayError):
    """Ray answered a request with a 4xx (a job it will not take, say): asking again is
    refused again."""


class RayUnavailable(RayError):
    """Nothing answers at the address (refused, unresolved, timed out)."""


class RayJobNotFound(RayError):
    """Ray does not know this job: never submitted, deleted, or lost in a head restart."""


@dataclass(frozen=True)
class RayJob:
    submission_id: str
    status: str  # a RayJobStatus, or what a newer Ray says
    message: str
    exit_code: int | None
    start_time: float | None  # seconds since the epoch
    metadata: dict[str, str] = field(default_factory=dict)  # as submitted

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class RayJobsClient:
    def __init__(self, address: str, timeout_s: float = RAY_HTTP_TIMEOUT_S) -> None:
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a Ray dashboard address (http://host:port): {address!r}")
        self.address = address.rstrip("/")
        self._https = parts.scheme == "https"
        self.host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/")
        self.timeout_s = timeout_s

    def version(self) -> dict[str, Any]:
        return self._json("GET", "/api/version")

    def submit(self, submission_id: str, entrypoint: str, *, env_vars: dict[str, str],
               num_cpus: float, num_gpus: float, metadata: dict[str, str]) -> bool:
        """Submit a job; False when one with this submission id exists already."""
        body = {"entrypoint": entrypoint, "submission_id": submission_id,
                "runtime_env": {"env_vars": env_vars}, "metadata": metadata,
                "entrypoint_num_cpus": num_cpus, "entrypoint_num_gpus": num_gpus}
        try:
            self._json("POST", "/api/jobs/", body)
        except RayError as exc:
            if "already exists" in str(exc):
                return False
            raise
        return True

    def info(self, submission_id: str) -> RayJob:
        return _ray_job(self._json("GET", f"/api/jobs/{quote(submission_id)}"), submission_id)

    def jobs(self) -> list[RayJob]:
        answer = self._request("GET", "/api/jobs/")
        if not isinstance(answer, list):
            raise RayError(f"Ray at {self.address} listed jobs as {type(answer).__name__}")
        return [_ray_job(each, "") for each in answer if isinstance(each, dict)]

    def logs(self, submission_id: str) -> str:
        logs = self._json("GET", f"/api/jobs/{quote(submission_id)}/logs").get("logs")
        return logs if isinstance(logs, str) else ""

    def stop(self, submission_id: str) -> bool:
        return bool(self._json("POST", f"/api/jobs/{quote(submission_id)}/stop").get("stopped"))

    def delete(self, submission_id: str) -> bool:
        return bool(self._json("DELETE", f"/api/jobs/{quote(submission_id)}").get("deleted"))

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        answer = self._request(method, path, body)
        if not isinstance(answer, dict):
            raise RayError(f"Ray at {self.address} answered {method} {path} with "
                           f"{type(answer).__name__}, not a JSON object")
        return answer

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self.host, self._port, timeout=self.timeout_s)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, self._base + path, payload, headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RayUnavailable(f"Ray Jobs API not reachable at {self.address}: "
                                 f"{_reason(exc)}") from exc
        finally:
            conn.close()
        text = raw.decode("utf-8", errors="replace")
        if response.status == 404:
            raise RayJobNotFound(f"Ray at {self.address}: {_last_line(text) or 'not found'}")
        if response.status >= 400:
            error = RayRefused if response.status < 500 else RayError
            raise error(f"Ray at {self.address} answered {method} {path} with "
                        f"{response.status}: {_last_line(text)}")
        try:
            return json.loads(text)
        except ValueError as exc:
            raise RayError(f"Ray at {self.address} answered {method} {path} with "
                           f"something that is not JSON: {text[:200]!r}") from exc


def _ray_job(data: dict[str, Any], submission_id: str) -> RayJob:
    status = data.get("status")
    if not isinstance(status, str):
        raise RayError(f"Ray answered a job without a status: {str(data)[:200]}")
    code = data.get("driver_exit_code")
    start = data.get("start_time")
    metadata = data.get("metadata")
    return RayJob(
        submission_id=str(data.get("submission_id") or submission_id),
        status=status,
        message=str(data.get("message") or ""),
        exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        start_time=start / 1000 if isinstance(start, (int, float)) and start else None,
        metadata={str(k): str(v) for k, v in metadata.items()}
        if isinstance(metadata, dict) else {},
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, http.client.BadStatusLine):  # its bytes say nothing to a reader
        return ("what answers there is no HTTP server: give the address of the Ray "
                "dashboard (port 8265 unless `ray start --dashboard-port` moved it)")
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the Ray head running, with its dashboard?)"
    if isinstance(exc, socket.gaierror):
        return "host not found"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _last_line(text: str) -> str:
    """Ray answers errors with a whole traceback; its last line says what went wrong."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
