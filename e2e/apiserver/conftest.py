"""Fixtures: one API stand-in process per test module, stopped by PID even when a test fails."""

from __future__ import annotations

import pathlib
import sys
from typing import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from harness import REPO, StandIn  # noqa: E402


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    crds = REPO / "crds"
    server = StandIn(tmp_path_factory.mktemp("standin"), "--bookmark-interval", "0.5", "--history-limit", "50",
                     crds=crds if any(crds.glob("*.yaml")) else None)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ns(standin: StandIn, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test, named after it."""
    name = "t-" + request.node.name.removeprefix("test_").replace("_", "-")[:50].strip("-")
    standin.kube.ensure_namespace(name)
    return name


def pytest_configure(config: pytest.Config) -> None:
    """Every stand-in of the session logs the statuses the operator writes into one folder, for
    test_gitops_health.py (soma_apiserver.py reads SOMA_STATUS_LOG_DIR)."""
    import os
    import tempfile
    if not os.environ.get("SOMA_STATUS_LOG_DIR"):
        os.environ["SOMA_STATUS_LOG_DIR"] = tempfile.mkdtemp(prefix="soma-statuses-")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """test_gitops_health.py runs last: it checks what every other module's operators wrote."""
    items.sort(key=lambda item: item.path.name == "test_gitops_health.py")
