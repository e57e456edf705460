import os

# No setting exported for one's own server (a deadline, a cap, a token, a model) reaches the
# suite: cleared before anything imports jobs (some modules read theirs once) and before
# any server a module or the session shares starts; each test clears them again
# (conftest.data_dir). Kept: the suite's own kind, launch.py's build cache, its knobs.
KEPT_FROM_OUTSIDE = frozenset({
    "OFFLOAD_KINDS", "OFFLOAD_CACHE_DIR", "OFFLOAD_CHROMIUM", "OFFLOAD_SOAK_JOBS"})
for _name in [n for n in os.environ if (n.startswith("OFFLOAD_") and n not in KEPT_FROM_OUTSIDE)
              or n in ("OPENAI_BASE_URL", "OPENAI_API_KEY")]:
    del os.environ[_name]

# The test-only kind `probe` (tests/probe_runner.py), registered before anything imports
# jobs.kinds (which reads OFFLOAD_KINDS once); servers and runners the tests start inherit it.
os.environ["OFFLOAD_KINDS"] = "probe=tests.probe_runner"
