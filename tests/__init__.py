import os

# The test-only kind `probe` (tests/probe_runner.py), registered before anything imports
# jobs.kinds (which reads OFFLOAD_KINDS once); servers and runners the tests start inherit it.
os.environ["OFFLOAD_KINDS"] = "probe=tests.probe_runner"
