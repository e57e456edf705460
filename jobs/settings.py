"""Configuration from the environment (and a `.env` file in the working folder).

Every OFFLOAD_* variable the API and the supervisor read, and their tunable defaults. A
runner imports none of this: what it needs reaches it through its environment
(`Settings.runner_env`), and the defaults it applies itself (a chat's first-token wait,
its tokens on the embedded model) are in runners/.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import urllib.parse
from functools import cached_property, lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import InitErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.protocol import FINAL_WRITE_PATIENCE_ENV, FINAL_WRITE_PATIENCE_S, ROOT, embedded
from jobs.protocol.files import file_in_the_way
from jobs.protocol.trust import (
    UnsafeSettingsFile,
    env_file,
    read_settings_file,
    unreadable_as_settings,
    unsafe_way,
)
from jobs.protocol.urls import USERINFO_HELP, misplaced_userinfo, public_url, usable_key
from runners import chat

ENV_PREFIX = "OFFLOAD_"  # of every variable below but OpenAI's own two
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
STOP_GRACE_S = 3.0  # terminate, wait this long, then kill what is left
MAX_CONCURRENT = 8  # runners alive at once
RETENTION_HOURS = 72.0  # a finished job is kept this long
SUPERVISOR_INTERVAL_S = 0.25  # longest sleep between supervisor passes
# How often the supervisor looks for stop requests of every queued job (each full pass
# looks at the running ones): a cancel rings with its job's id, and is looked at then.
STOP_SWEEP_S = 5.0
SUPERVISOR_NICE = 10  # the supervisor's nice value: launching can wait, a request cannot
LEADER_RETRY_S = 1.0  # how often a non-leader tries to become the supervisor
WAKE_POLL_S = 0.02  # how often the leader looks for a poke from another process
PRUNE_INTERVAL_S = 300.0
PRUNE_OVER_CAP_S = 5.0  # how soon pruning runs again while more jobs than the cap are kept
RETRY_AFTER_S = 5  # a refused submission's Retry-After when no better guess is at hand
MIN_RETENTION_S = 600.0  # no finished job younger than this is pruned, even over the cap
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_PRIORITY = 1000  # a submission's priority is from -MAX_PRIORITY to MAX_PRIORITY
DEFAULT_PRIORITY = {"chat": 10}  # by kind; any other kind: 0
MAX_DELAY_S = 30 * 24 * 3600.0  # the latest run_at (or delay_s) a submission may ask for
RUN_AT_PAST_S = 3600.0  # a run_at older than this is refused (a time zone left out?)
MAX_ATTEMPTS = 10  # the most attempts a submission may ask for
MAX_DEPENDENCIES = 100  # the most jobs one may depend on (each is read at its start)
MAX_BATCH = 1000  # the most jobs one request submits (POST /api/jobs/batch)
DEFAULT_KIND_CAPS = "train=1"
DEFAULT_MAX_ATTEMPTS = "chat=2"  # by kind; any other kind: 1
RETRY_BASE_S = 2.0  # a retry waits up to base * 2^(attempt-1) s, at random (full jitter)
RETRY_MAX_S = 300.0  # and never more than this
CLAIM_RETRY_S = 30.0  # a job whose own folder refused its launch claim is tried again after
MAX_EVENT_STREAMS = 256  # open /events connections per worker, by default
INDEX_REFRESH_S = 0.1  # how often each API worker brings its job index up to date
GIL_SWITCH_S = 0.001  # the API process's GIL switch interval (Python's default: 5 ms)
EVENT_POLL_S = 0.04  # how often a followed job file is looked at without change notifications
EVENT_CHECK_S = 0.5  # and with them: a missed notification costs at most this
KEEPALIVE_S = 15.0
NOTIFIER_LINGER_S = 10.0  # an API worker's inotify descriptor outlives its last followed job
MAX_WAIT_S = 60.0  # the longest wait of `GET /api/jobs/{id}?wait_s=`: as proxies allow
DEFAULT_LLM_SLOTS = 4  # llama-server's slots at most, by default: each keeps a chat's context
CANCEL_WAIT_S = 10.0  # DELETE waits this long past the stop's grace for the final state
CANCEL_WAIT_JOB_S = 0.02  # and a cancel of several, this much more a job past the first
HISTORY_SAMPLE_S = 1.0
SUPERVISOR_STALLED_S = 15.0  # a leading supervisor without a sample this long is "stalled"
HISTORY_KEEP_S = 3 * 3600.0  # the metrics series kept on disk
DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"  # a Ray head's dashboard (Jobs REST API)
RAY_POLL_S = 0.2  # how often a remote job's poller asks Ray (the runner writes 5 a second)
RAY_UNREACHABLE_S = 60.0  # a remote job whose Ray stays unreachable this long is lost
RAY_HTTP_TIMEOUT_S = 10.0
RAY_DELETE_PAUSES_S = (1.0, 2.0, 4.0, 8.0)  # between tries to delete an ended job's record
# Ray writes a record again for a job deleted before its supervisor actor died (FAILED,
# "Job supervisor actor died"): looked for this long after each delete, and deleted again.
RAY_DELETED_LOOKS_S = (3.0, 10.0)
# Ray hands a job's environment to its worker as one argument of a command line, which
# Linux caps at 128 KiB: a job whose environment takes more never starts there.
RAY_ENV_MAX_CHARS = 100_000
RAY_PENDING_STOP_S = 3.0  # a stopped job Ray still has waiting for a place then ends here
RAY_END_WAIT_S = 1200.0  # its record is deleted once Ray has ended it, looked for this long
RAY_END_LOOK_S = 10.0  # every this often
LOG_BACKUPS = 3  # supervisor.log rotates at OFFLOAD_LOG_MAX_MB; this many older files kept
OUTPUT_CAP_S = 5.0  # how often the supervisor cuts the outputs of its helper processes
# Never sent to Ray: its job records keep runtime_env and entrypoint, and its dashboard
# shows them. Cluster nodes need these (and an OPENAI_BASE_URL with credentials in it)
# in their own environment.
SECRET_ENV = frozenset({"OPENAI_API_KEY"})
API_TOKEN_ENV = "OFFLOAD_API_TOKEN"  # the API's alone: no other process of Offload gets it
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
MIN_TOKEN_KINDS = 5  # different characters: 16 random hex digits have fewer 1 in 100,000 times
MIN_TOKEN_STEPS = 4  # different steps between neighbours; `0123456789abcdef` has 2


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    if ":" in host:  # only an IPv6 address has a zone ("::1%lo")
        host = host.split("%")[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def guessable(token: str) -> bool:
    """A token whose shape gives it away, however long: `tttt...`, `passwordpassword`,
    `0123456789abcdef`, `aaaabbbbccccdddd`. (A random one never is; a word is not seen.)"""
    repeated = any(token == (token[:size] * (len(token) // size + 1))[:len(token)]
                   for size in range(1, len(token) // 2 + 1))
    steps = {ord(after) - ord(before) for before, after in pairwise(token)}
    return repeated or len(set(token)) < MIN_TOKEN_KINDS or len(steps) < MIN_TOKEN_STEPS


def host_name(host: str) -> str:
    """A Host header's name: 'Example.org:8001' -> 'example.org', '[::1]:8001' -> '::1';
    '' for what is no name and port ('[::1].evil.com', 'localhost:evil')."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket:  # '[::1': no address closed
            return ""
    else:
        name, colon, port = host.partition(":")
        rest = colon + port
    if rest and not (rest[:1] == ":" and rest[1:].isdigit()):
        return ""
    return name


def _allowed_name(entry: str) -> str:
    """An OFFLOAD_ALLOWED_HOSTS entry's name ('' if it is none): as a Host header gives
    it, or a bare IPv6 address."""
    try:
        return str(ipaddress.IPv6Address(entry.strip().lower()))
    except ValueError:
        return host_name(entry)


def is_secret_env(name: str, value: str) -> bool:
    """A runner's variable that must not leave this machine (see SECRET_ENV)."""
    return name in SECRET_ENV or (name == "OPENAI_BASE_URL" and public_url(value) != value)


def normalize_ray_address(value: str) -> str:
    """The Ray dashboard's HTTP address: `host:port` gets `http://`; `ray://` is refused."""
    value = value.strip().rstrip("/")
    if "://" not in value:
        value = f"http://{value}"
    scheme = value.split("://", 1)[0].lower()
    if scheme not in ("http", "https") or not value.split("://", 1)[1]:
        raise ValueError(f"OFFLOAD_RAY_ADDRESS must be the Ray dashboard's HTTP address "
                         f"(e.g. {DEFAULT_RAY_ADDRESS}), not {value!r}")
    return value


def kind_numbers(value: str, variable: str, low: int, high: int) -> dict[str, int]:
    """`train=1,sleep=4` -> {"train": 1, "sleep": 4}; ValueError naming `variable` for
    anything else."""
    found: dict[str, int] = {}
    for piece in value.split(","):
        if not piece.strip():
            continue
        kind, equals, number = (part.strip() for part in piece.partition("="))
        if not (kind and equals and number.isdigit() and low <= int(number) <= high):
            raise ValueError(
                f"{variable} must be kind=number pairs separated by commas, each number "
                f"from {low} to {high} (for example train=1,sleep=4), not {piece.strip()!r}")
        if kind in found:  # the last would win unsaid
            raise ValueError(f"{variable} names {kind!r} twice; keep one of them")
        found[kind] = int(number)
    return found


def _unprefixed(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


def _field_name(name: str) -> str:
    """`OFFLOAD_PORT` -> `port`: a variable's name as its field's."""
    if name.upper().startswith(ENV_PREFIX):
        return name[len(ENV_PREFIX):].lower()
    return name


def _web_address(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0)
    except ValueError:  # a port that is no number, say
        return False


class Settings(BaseSettings):
    # hide_input_in_errors: a refused OFFLOAD_API_TOKEN is never printed.
    # No `inf` or `nan` for a number: `OFFLOAD_JOB_TIMEOUT_S=inf` started, and every job
    # was lost at its runner's start (a deadline timer cannot be set that far).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      populate_by_name=True, hide_input_in_errors=True,
                                      allow_inf_nan=False)

    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    data_dir: Path = Path("var")
    max_concurrent: int = Field(MAX_CONCURRENT, ge=1, le=1024)
    job_timeout_s: float = Field(120.0, gt=0, le=MAX_TIMEOUT_S)
    retention_hours: float = Field(RETENTION_HOURS, ge=0)
    max_jobs: int = Field(10_000, ge=1)
    max_queued: int = Field(1000, ge=1)
    min_retention_s: float = Field(MIN_RETENTION_S, ge=0)
    cors_origins: str = ""
    allowed_hosts: str = ""
    max_event_streams: int = Field(MAX_EVENT_STREAMS, ge=1)
    # False: /events polls job files every EVENT_POLL_S instead of taking change notifications.
    event_notify: bool = True
    log_max_mb: float = Field(10.0, ge=0.01)
    api_token: SecretStr | None = None
    # The OpenAI client's own names, without the prefix.
    openai_base_url: str | None = Field(None, validation_alias=_unprefixed("OPENAI_BASE_URL"))
    openai_api_key: SecretStr | None = Field(None,
                                             validation_alias=_unprefixed("OPENAI_API_KEY"))
    llm_model: str | None = None
    llm_max_tokens: int | None = Field(None, ge=chat.MAX_TOKENS[0], le=chat.MAX_TOKENS[1])
    llm_temperature: float | None = Field(None, ge=chat.TEMPERATURE[0], le=chat.TEMPERATURE[1])
    llm_first_token_s: float | None = Field(None, gt=0)
    # Chats the embedded model decodes at once (llama-server's slots); None: as many as
    # OFFLOAD_MAX_CONCURRENT, at most DEFAULT_LLM_SLOTS.
    llm_slots: int | None = Field(None, ge=1, le=64)
    llm_engine: Literal["auto", "llama-server", "llama-cpp-python"] = "auto"
    local_model: str | None = None  # a GGUF file for the embedded model, not the packaged one
    stop_grace_s: float = Field(STOP_GRACE_S, gt=0)
    # How long a runner waits for room (a writable folder) for its final state.
    final_write_patience_s: float = Field(FINAL_WRITE_PATIENCE_S, gt=0, le=86400)
    launcher: Literal["local", "ray"] = "local"
    ray_address: str = DEFAULT_RAY_ADDRESS
    ray_python: str | None = Field(None, min_length=1)
    ray_num_cpus: float = Field(1.0, ge=1, le=1024)
    ray_train_gpus: float = Field(0.0, ge=0, le=64)
    supervisor_nice: int = SUPERVISOR_NICE
    # False: every runner starts as a new interpreter, also where the fork server runs.
    fork_server: bool = True
    # How a runner starts (jobs/launch/local.py); auto: as fork_server says.
    launch_mode: Literal["auto", "fork", "spares", "spawn"] = "auto"
    kinds: str = ""  # job kinds of one's own, `name=module,...` (jobs/kinds.py)
    # Runners of a kind at once, within max_concurrent: `kind=n,...`.
    kind_caps: str = DEFAULT_KIND_CAPS
    # Attempts a job of a kind gets by default (transient failures only): `kind=n,...`.
    max_attempts: str = DEFAULT_MAX_ATTEMPTS
    retry_base_s: float = Field(RETRY_BASE_S, ge=0)
    retry_max_s: float = Field(RETRY_MAX_S, ge=0)
    # Periodic jobs (jobs/schedules.py); a missing file is no schedules, unless named here.
    schedules_file: Path = Path("schedules.toml")

    def __init__(self, **values: Any) -> None:
        # Also by the variables' names, as in the environment: Settings(OFFLOAD_PORT=8002).
        try:
            super().__init__(**{_field_name(name): value for name, value in values.items()})
        except ValidationError as exc:
            raise _naming_variables(exc) from None

    @field_validator("data_dir", mode="before")
    @classmethod
    def _named(cls, value: object) -> object:
        # Empty (`OFFLOAD_DATA_DIR=` in a .env) it was the working folder: launch.py's is
        # the project's, whose jobs/ package then held the jobs.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: leave it out for ./var, or name a folder")
        return value

    @field_validator("data_dir", "schedules_file")
    @classmethod
    def _absolute(cls, value: Path, info: ValidationInfo) -> Path:
        # Runners get absolute paths, whatever folder they run in.
        path = value.expanduser().absolute()
        if info.field_name == "data_dir" and (problem := unsafe_way(str(path))) is not None:
            raise ValueError(f"{problem}: set OFFLOAD_DATA_DIR to a folder of your own")
        try:
            path = path.resolve()
        except (OSError, RuntimeError) as exc:  # links in a loop (a RuntimeError until 3.13)
            raise ValueError(f"{path} cannot be followed to a folder: {exc}") from None
        if info.field_name == "data_dir" and (path == Path(ROOT) or path in Path(ROOT).parents):
            # Its jobs/ would be the code's, and all of it made private to its owner.
            raise ValueError(f"{path} holds Offload's own files: set OFFLOAD_DATA_DIR to a "
                             "folder of its own, such as ./var")
        if info.field_name == "data_dir" and (file := file_in_the_way(path)) is not None:
            # It could never be made: every request would fail, and the start said nothing.
            raise ValueError(f"{file} is a file, not a folder: set OFFLOAD_DATA_DIR to a "
                             "folder (one not there yet is made)")
        return path

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        for entry in value.split(","):
            if entry.strip() and not _allowed_name(entry):
                raise ValueError(f"{entry.strip()!r} is no host name: give names such as "
                                 "offload.example or 192.0.2.5, with a port or without, "
                                 "separated by commas")
        return value

    @field_validator("fork_server", mode="before")
    @classmethod
    def _off_words(cls, value: object) -> object:
        # As before the prefix: only words that say "off" turn it off, nothing refuses.
        if isinstance(value, str):
            return value.strip().lower() not in {"0", "false", "no", "off"}
        return value

    @field_validator("api_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token (an unset variable in a compose file) matched an empty header.
        if value is None:
            return None
        token = value.get_secret_value().strip()
        if len(token) < MIN_TOKEN_CHARS:
            what = f"{len(token)} characters" if token else "empty or blank"
            raise ValueError(
                f"OFFLOAD_API_TOKEN is too weak ({what}; at least {MIN_TOKEN_CHARS} needed). "
                f"Make one with: {MAKE_TOKEN} (or unset OFFLOAD_API_TOKEN to serve on "
                "127.0.0.1 only)")
        if guessable(token):
            raise ValueError(
                "OFFLOAD_API_TOKEN is too weak: it is a pattern (one character or a short "
                "piece repeated, a run such as 0123... or abcd..., or fewer than "
                f"{MIN_TOKEN_KINDS} different characters) that is guessed long before its "
                f"length would say. Make a random one with: {MAKE_TOKEN}")
        if not all("!" <= char <= "~" for char in token):
            # A header carries it: the CLI and browsers send other characters as Latin-1,
            # the guard compares UTF-8, so a token like `pässwort...` never matched.
            raise ValueError("OFFLOAD_API_TOKEN holds a space, a control character or a "
                             f"letter beyond ASCII: a header cannot carry it as it is. Make "
                             f"one with: {MAKE_TOKEN}")
        return SecretStr(token)

    @field_validator("openai_api_key")
    @classmethod
    def _sendable_key(cls, value: SecretStr | None) -> SecretStr | None:
        key = usable_key(value.get_secret_value() if value is not None else None)
        return SecretStr(key) if key is not None else None

    @field_validator("openai_base_url")
    @classmethod
    def _credentials_encoded(cls, value: str | None) -> str | None:
        if value and misplaced_userinfo(value):
            raise ValueError(USERINFO_HELP)  # else they would be shown, and not sent
        if value and not _web_address(value):  # never quoted: it may hold a password
            raise ValueError("not an http:// or https:// address with a host; set it to an "
                             "OpenAI-compatible API's, ending in /v1 (say "
                             "http://127.0.0.1:8080/v1), or leave it unset for the embedded model")
        return value

    @field_validator("kind_caps")
    @classmethod
    def _caps(cls, value: str) -> str:
        kind_numbers(value, "OFFLOAD_KIND_CAPS", 1, 1024)
        return value

    @field_validator("max_attempts")
    @classmethod
    def _attempts(cls, value: str) -> str:
        kind_numbers(value, "OFFLOAD_MAX_ATTEMPTS", 1, MAX_ATTEMPTS)
        return value

    @property
    def kind_cap_map(self) -> dict[str, int]:
        return kind_numbers(self.kind_caps, "OFFLOAD_KIND_CAPS", 1, 1024)

    def shared(self, kinds: list[str]) -> dict[str, Any]:
        """What every process on one data folder must agree on, by the variables' names
        (no secret among them; `kinds`: the job kinds it knows): an API started with
        other settings than the leading supervisor's says one thing while the supervisor
        does another."""
        return {"OFFLOAD_LAUNCHER": self.launcher,
                "OFFLOAD_MAX_CONCURRENT": self.max_concurrent,
                "OFFLOAD_KIND_CAPS": self.kind_cap_map, "OFFLOAD_KINDS": kinds,
                "OPENAI_BASE_URL": public_url(self.openai_base_url) if self.openai_base_url
                else None, "OFFLOAD_LLM_MODEL": self.llm_model,
                # the chats at once, as the engine chosen at start gives them
                "OFFLOAD_LLM_ENGINE": self.model_engine, "OFFLOAD_LLM_SLOTS": self.model_slots}

    @property
    def attempts_map(self) -> dict[str, int]:
        return kind_numbers(self.max_attempts, "OFFLOAD_MAX_ATTEMPTS", 1, MAX_ATTEMPTS)

    def attempts_for(self, kind: str) -> int:
        """How many attempts a job of `kind` gets unless its submission says."""
        return self.attempts_map.get(kind, 1)

    @field_validator("ray_address")
    @classmethod
    def _http_address(cls, value: str) -> str:
        return normalize_ray_address(value)

    @property
    def embedded_slots(self) -> int:
        return self.llm_slots or min(self.max_concurrent, DEFAULT_LLM_SLOTS)

    @cached_property
    def embedded_engine(self) -> str:
        """The embedded model's server, chosen once, as the API starts: the chats' cap is
        its slots, so a restart of the model keeps to it, and so does every supervisor the
        API starts (ENGINE_ENV), even one started while llama-server is missing."""
        chosen = os.environ.get(embedded.ENGINE_ENV)
        if chosen in (embedded.LLAMA_SERVER, embedded.LLAMA_CPP_PYTHON):
            return chosen
        return embedded.engine(self.llm_engine)

    @property
    def model_slots(self) -> int | None:
        """Chats at once on the embedded model, the most the supervisor starts; None:
        chats go to the server OPENAI_BASE_URL names, which says nothing of its own."""
        if self.model_engine is None:
            return None
        return embedded.chat_slots(self.embedded_slots, self.model_engine)

    @property
    def model_engine(self) -> str | None:
        """The embedded model's server; None: chats go to the server OPENAI_BASE_URL names."""
        return None if self.openai_base_url else self.embedded_engine

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def cors_origin_list(self) -> list[str]:
        """Lowercased, as browsers send an `Origin` (`NULL` passed the start's check of
        `null`, and matched its header)."""
        return [o.strip().rstrip("/").lower() for o in self.cors_origins.split(",")
                if o.strip()]

    @property
    def allowed_host_list(self) -> list[str]:
        """Host names (any port) served without a token besides loopback ones."""
        return [_allowed_name(h) for h in self.allowed_hosts.split(",") if h.strip()]

    @property
    def host_is_loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def log_max_bytes(self) -> int:
        """The size any one log file Offload writes is kept under (`OFFLOAD_LOG_MAX_MB`)."""
        return int(self.log_max_mb * 2**20)

    def runner_env(self) -> dict[str, str]:
        """What a runner needs of the settings, passed through its environment only: every
        launcher (exec, fork server, Ray) starts its runners with this."""
        env: dict[str, str] = {"OFFLOAD_LOG_MAX_BYTES": str(self.log_max_bytes),
                               FINAL_WRITE_PATIENCE_ENV: str(self.final_write_patience_s)}
        if self.openai_base_url:
            env["OPENAI_BASE_URL"] = self.openai_base_url
        if self.openai_api_key:
            env["OPENAI_API_KEY"] = self.openai_api_key.get_secret_value()
        if self.llm_model:
            env["OFFLOAD_LLM_MODEL"] = self.llm_model
        if self.local_model:  # a chat then adds no notice that the packaged model answers
            env["OFFLOAD_LOCAL_MODEL"] = self.local_model
        for name, value in (("OFFLOAD_LLM_MAX_TOKENS", self.llm_max_tokens),
                            ("OFFLOAD_LLM_TEMPERATURE", self.llm_temperature),
                            ("OFFLOAD_LLM_FIRST_TOKEN_S", self.llm_first_token_s)):
            if value is not None:
                env[name] = str(value)
        return env


def _naming_variables(exc: ValidationError) -> ValidationError:
    """The same errors, each under the variable a user sets (OFFLOAD_PORT, not port)."""
    prefixed = {name for name, field in Settings.model_fields.items()
                if field.validation_alias is None}
    details = [InitErrorDetails(
        type=error["type"], input=error["input"], ctx=error.get("ctx", {}),
        loc=tuple(ENV_PREFIX + str(part).upper() if i == 0 and part in prefixed else part
                  for i, part in enumerate(error["loc"])))
        for error in exc.errors()]
    return ValidationError.from_exception_data(exc.title, details, hide_input=True)


class UnusableSettings(Exception):
    """Settings a process cannot start with, said as what to mend (not as a traceback)."""


def problem_said(error: Any) -> str:
    """A validation error of pydantic's, in words: a check of ours says it all, without
    pydantic's "Value error, " before it."""
    ours = (error.get("ctx") or {}).get("error") if error.get("type") == "value_error" else None
    return str(ours) if ours is not None else str(error.get("msg"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings, read once; UnusableSettings if they cannot be used."""
    path = env_file()
    try:
        data = read_settings_file(path)
    except UnsafeSettingsFile as exc:
        raise UnusableSettings(
            f"refusing to read {path}: {exc}. It could send the server's token, or the "
            "chats, to another account. Start from a folder of your own, or set "
            "OFFLOAD_ENV_FILE to a file of yours") from None
    except OSError as exc:
        raise UnusableSettings(f"cannot read {path}: {exc}") from None
    if data is not None and (problem := unreadable_as_settings(data)):
        # python-dotenv: a traceback, or a warning that names no file and a line left out
        raise UnusableSettings(f"cannot read {path}: {problem}")
    try:
        if data is None:
            return Settings(_env_file=None)
        # What was read and looked at, from a private copy: pydantic-settings reads a path,
        # and the one at `path` could be swapped meanwhile.
        with tempfile.TemporaryDirectory(prefix="offload-env-") as folder:
            copy = Path(folder, ".env")
            copy.write_bytes(data)
            return Settings(_env_file=copy)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, error['loc']))}: {problem_said(error)}"
                 for error in exc.errors()]
        where = "the environment" if data is None else f"the environment or in {path}"
        raise UnusableSettings("\n".join(
            [f"a setting is wrong (set in {where}):", *lines])) from None
