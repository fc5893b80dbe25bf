"""A short closed-loop run of `closed_loop.py` (what `bench/autoscaler-closed-loop` measures), to
check the wiring, not the figures: a synthetic ramp replayed 15 times faster through the real
operator, a real soma-proxy per pod and soma-fake-upstream. The replicas rise above the minimum
with the load and come down after it, every change of `spec.replicas` is explained by
`status.scaling` (desired count and reason), the reversals stay within the crate's bound, and
every request is served. Nothing compares wall-clock durations; every wait is bounded.

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN and SOMA_AUTOSCALE_WINDOW_BIN.
"""

from __future__ import annotations

import io
import os

import pytest

BINS = ("SOMA_OPERATOR_BIN", "SOMA_PROXY_BIN", "SOMA_FAKE_UPSTREAM_BIN", "SOMA_AUTOSCALE_WINDOW_BIN")
pytestmark = pytest.mark.skipif(
    not all(os.environ.get(b) and os.access(os.environ[b], os.X_OK) for b in BINS),
    reason=", ".join(BINS) + " must be executables")


def test_a_ramp_is_followed_up_and_down_and_every_step_is_explained(tmp_path) -> None:
    from closed_loop import Scenario, run

    sc = Scenario("ramp", None, to_min=12.0, compress=15.0, interval_s=1, floor_hold_s=150.0,
                  reversal_hold_s=120.0, max_replicas=12,
                  ramp={"base_rps": 0.3, "peak_rps": 5.0, "min": 3.0, "hold_min": 2.0, "tail_min": 4.0})
    log = io.StringIO()
    r = run(sc, tmp_path / "ramp", os.environ["SOMA_AUTOSCALE_WINDOW_BIN"], log=log)
    m = r["measured"]
    print(log.getvalue())
    assert m["peak_replicas"] > 1, m
    assert m["final_replicas"] < m["peak_replicas"], m
    assert m["peak_replicas"] <= sc.max_replicas, m
    assert m["scale_events"] >= 2 and m["steps_explained"] == m["scale_events"], m
    assert m["reversals"] <= m["max_reversals_allowed"], m
    assert m["events"] >= 1, "an Event when the Scaling reason changed"
    assert m["unserved"] == 0 and m["failed"] == 0, m
    assert set(m["reasons"]) <= {"conductance", "erlangFloor", "floorHold", "minReplicas", "cap",
                                 "reversalHold", "coldStartHold", "idle"}, m
    # The simulator ran on the same schedule.
    assert r["view"] == "reported", "the agents report their queue by default"
    assert r["sim"]["reported"]["minutes_with_traffic"] == m["minutes_with_traffic"], r["sim"]["reported"]
