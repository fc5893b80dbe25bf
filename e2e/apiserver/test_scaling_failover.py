"""Leader failover in the middle of a ramp: two real operator processes contend for the Lease
(`coordination.k8s.io/v1` in the API stand-in); the holder runs the scaling loop and scales the
Agent up under a rising load; it is killed (SIGKILL: no Lease release, no last status write);
the other takes the Lease when it expires and continues from `status.scaling.state`.

    pytest ──▶ soma_apiserver.py --deployment-pods ◀── soma-operator A (Bearer op-a) ─┐ Lease
      │                              ▲              ◀── soma-operator B (Bearer op-b) ─┘ soma-operator
      └── a real soma-proxy per pod ─┘ ◀── closed-loop clients (2, then 6)

Checked: the writes to the Deployment and to the Agent's status come only from the Lease
holder (the stand-in counts writes by the bearer token each process sends); the new leader's
first decision is resumed from the old one's snapshot (its held loads and hold timers carry
over) and moves replicas by at most one step, never down while the load still rises. Every
wait is bounded; nothing compares wall-clock durations.

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN.
"""

from __future__ import annotations

import pathlib
import threading
from typing import Any, Iterator

import pytest
import yaml

from harness import REPO, StandIn, free_port, stop_process, wait_for
from test_convergence import AGENTS, Operator
from test_scaling import Load, Pods, pytestmark, start_upstream  # noqa: F401 (pytestmark: same skip)

NS = "ramp"
NAME = "bot"
MAX = 6


def kubeconfig(standin: StandIn, path: pathlib.Path, token: str) -> pathlib.Path:
    """A kubeconfig whose user sends `Authorization: Bearer <token>`: how the stand-in tells
    the two operator processes apart."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": standin.url}}],
        "users": [{"name": token, "user": {"token": token}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": token, "namespace": "default"}}],
    }))
    return path


def writes(standin: StandIn) -> dict[tuple[str, str], int]:
    """Writes to the Agent's Deployment and to the Agent (status included), by client token."""
    out: dict[tuple[str, str], int] = {}
    for w in standin.stats()["writes"]:
        target = (w["resource"], w["name"])
        if w["namespace"] == NS and target in (("apps/v1/deployments", NAME), (f"{AGENTS}/agents", NAME)):
            key = (w["resource"].split("/")[-1], w["client"])
            out[key] = out.get(key, 0) + w["count"]
    return out


def holder(standin: StandIn) -> str | None:
    lease = standin.kube.get("coordination.k8s.io/v1", "leases", "default", "soma-operator")
    return (lease.get("spec") or {}).get("holderIdentity")


@pytest.fixture(scope="module")
def ramp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("failover")
    standin = StandIn(work, "--deployment-pods", crds=REPO / "crds")
    upstream = pods = None
    operators: dict[str, Operator] = {}
    admin_port = free_port()
    try:
        upstream, upstream_url = start_upstream(work)
        pods = Pods(work, standin, upstream_url, admin_port, ns=NS, name=NAME)
        for name, token in (("soma-operator-a", "op-a"), ("soma-operator-b", "op-b")):
            operators[name] = Operator(work, kubeconfig(standin, work / f"kubeconfig-{token}", token), name,
                                       "--lease-namespace", "default", "--lease-seconds", "5",
                                       "--scaling-interval-seconds", "1", "--sidecar-admin-port", str(admin_port))
        yield {"standin": standin, "pods": pods, "operators": operators}
    finally:
        if pods is not None:
            pods.stop()
        for op in operators.values():
            if op.proc is not None:
                op.stop()
        if upstream is not None:
            stop_process(upstream)
        standin.stop()


TOKENS = {"soma-operator-a": "op-a", "soma-operator-b": "op-b"}


def test_the_new_leader_continues_the_ramp_from_status(ramp: dict[str, Any]) -> None:
    standin, pods, operators = ramp["standin"], ramp["pods"], ramp["operators"]
    k = standin.kube
    k.ensure_namespace(NS)
    k.apply({"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": "team", "namespace": NS},
             "spec": {"limits": {"costMicros": 500_000_000}, "period": {"calendar": "month", "timeZone": "UTC"}}},
            manager="kubectl")
    # A long reversal hold: a leader that forgot the last scale-up could scale down at once;
    # one that resumed may not.
    k.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": NAME, "namespace": NS},
             "spec": {"image": "registry.example.com/agents/echo@sha256:" + "ab" * 32,
                      "model": {"provider": "openai", "name": "gpt-4o-mini"}, "budgetRef": {"name": "team"},
                      "scaling": {"minReplicas": 1, "maxReplicas": MAX, "targetP95WaitMs": 500,
                                  "floorHoldSeconds": 600, "reversalHoldSeconds": 600}}}, manager="kubectl")
    leader = wait_for("a Lease holder", lambda: holder(standin), seconds=60)
    assert leader in operators
    standby = next(n for n in operators if n != leader)
    wait_for("the first pod's sidecar", lambda: pods.sync(), seconds=60)
    wait_for("the autoscaler owning spec.replicas", lambda: any(
        m["manager"] == "soma-autoscaler" and "f:replicas" in (m.get("fieldsV1") or {}).get("f:spec", {})
        for m in k.get("apps/v1", "deployments", NS, NAME)["metadata"].get("managedFields") or []), seconds=60)

    loads: list[Load] = []
    try:
        loads.append(Load(pods, clients=2))
        wait_for("a first scale-up", lambda: k.get("apps/v1", "deployments", NS, NAME)["spec"]["replicas"] > 1,
                 seconds=120)
        loads.append(Load(pods, clients=4))  # the ramp goes on
        before = k.get(AGENTS, "agents", NS, NAME)["status"]["scaling"]
        wait_for("a step under the steeper load", lambda: k.get(AGENTS, "agents", NS, NAME)["status"]["scaling"]
                 ["lastStepTime"] != before["lastStepTime"], seconds=30)

        # Only the leader has written so far.
        seen = writes(standin)
        assert seen.get(("deployments", TOKENS[leader]), 0) > 0 and seen.get(("agents", TOKENS[leader]), 0) > 0, seen
        assert not any(client == TOKENS[standby] for _, client in seen), seen

        # Kill the leader mid-ramp: no release, no last write.
        proc = operators[leader].proc
        assert proc is not None
        proc.kill()
        proc.wait(timeout=10)
        last = k.get(AGENTS, "agents", NS, NAME)["status"]["scaling"]
        at_kill = k.get("apps/v1", "deployments", NS, NAME)["spec"]["replicas"]
        killed_writes = writes(standin)

        wait_for("the standby taking the Lease", lambda: holder(standin) == standby, seconds=60)
        first = wait_for("the new leader's first decision",
                         lambda: (s := k.get(AGENTS, "agents", NS, NAME)["status"]["scaling"])
                         ["lastStepTime"] != last["lastStepTime"] and s, seconds=60)
        # Resumed, not restarted from the priors: the old leader's held loads and its last
        # scale-up are in the new leader's state.
        old_state, new_state = last["state"], first["state"]
        assert new_state.get("lastScaleUpS", 0) >= old_state["lastScaleUpS"], (old_state, new_state)
        old_loads = {round(t, 3) for t, _ in old_state["loads"]}
        assert old_loads and old_loads <= {round(t, 3) for t, _ in new_state["loads"]}, (old_state, new_state)
        # No jump: never down while the load rises (the reversal hold carried over), and at most
        # one step from the count the old leader left.
        after = k.get("apps/v1", "deployments", NS, NAME)["spec"]["replicas"]
        assert first["currentReplicas"] == at_kill, (first, at_kill)
        assert at_kill <= after <= MAX and first["desiredReplicas"] >= at_kill, (at_kill, after, first)
        assert first["reason"] in ("erlangFloor", "conductance", "floorHold", "reversalHold", "cap"), first
        # The new leader keeps going: more steps, still never below the count at the kill.
        wait_for("a later step", lambda: k.get(AGENTS, "agents", NS, NAME)["status"]["scaling"]["lastStepTime"]
                 != first["lastStepTime"], seconds=30)
        assert k.get("apps/v1", "deployments", NS, NAME)["spec"]["replicas"] >= at_kill
    finally:
        for load in loads:
            load.stop()

    # Only the leader of the moment wrote: the killed one nothing after its death, the new one
    # nothing before it led.
    final = writes(standin)
    assert final.get(("deployments", TOKENS[leader]), 0) == killed_writes.get(("deployments", TOKENS[leader]), 0)
    assert final.get(("agents", TOKENS[leader]), 0) == killed_writes.get(("agents", TOKENS[leader]), 0)
    assert not any(client == TOKENS[standby] for _, client in killed_writes), killed_writes
    assert final.get(("agents", TOKENS[standby]), 0) > 0, final
    assert "autoscaling loop started" not in operators[standby].log_path.read_text().split("leading: starting")[0]
