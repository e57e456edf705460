"""Property-based fuzzing of the whole OpenAPI schema against a real server: no 5xx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server import Server

EXAMPLES_PER_OPERATION = 130
calls: list[int] = []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "no-schedules.toml").write_text("# none\n")
    # As each test's own (conftest.data_dir): no `.env` or schedules of the project's folder.
    server = Server(folder / "data", folder / "server.log",
                    {"OFFLOAD_MAX_CONCURRENT": "4", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
                     "OFFLOAD_ENV_FILE": str(folder / "no.env"),
                     "OFFLOAD_SCHEDULES_FILE": str(folder / "no-schedules.toml")})
    server.start()
    yield server
    server.stop()
    from tests.conftest import _kill_leftover_runners

    _kill_leftover_runners(folder / "data" / "jobs")


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_input_makes_the_server_fail(api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9, "every route is in the schema"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call(timeout=30)
            calls.append(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path,
                                                 response.text)
            if response.status_code >= 400:
                assert response.json()["detail"], "every error says what went wrong"

        check()
    assert len(calls) >= 1000, f"only {len(calls)} generated requests"
    print(f"fuzz: {len(calls)} requests, statuses {sorted(Counter(calls).items())}")
