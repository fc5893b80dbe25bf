"""Scale to zero, closed on this machine: a worker Agent (no `port`, `minReplicas: 0`) idles to
zero replicas, a Soma Job whose `spec.agentRef` names it wakes it, it stays up while the Job
runs, and it goes back to zero once the Job has finished and the idle period has passed.

    pytest ──▶ soma_apiserver.py --deployment-pods ◀──HTTP── soma-operator run --scaling-interval-seconds 1
      │          (Deployment → pods 127.0.0.x; batch/v1 Job → attempt pods, ended by POST /_jobs)
      └── a real soma-proxy per Agent pod (its /load is what the loop reads while pods exist)

Every wait is bounded; nothing compares wall-clock durations (the "stays up while the Job runs"
check waits until the operator's own step timestamps have passed the idle period).

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any, Iterator

import pytest
import requests

from harness import REPO, StandIn, free_port, stop_process, wait_for
from test_convergence import AGENTS, Operator
from test_scaling import Pods, condition, pytestmark, start_upstream  # noqa: F401 (pytestmark: same skip)

NS = "workers"
NAME = "digest"
IDLE = 4  # scaling.idleToZeroSeconds


def stamp(t: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))


def follow(pods: Pods, stop: threading.Event) -> None:
    """Sidecars follow the pods (a pod without one would be a pod with no load signal)."""
    while not stop.wait(0.2):
        try:
            pods.sync()
        except (requests.RequestException, KeyError, OSError):
            pass  # the ConfigMap not written yet, or the stand-in stopping: the next pass retries


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("scale-to-zero")
    standin = StandIn(work, "--deployment-pods", crds=REPO / "crds")
    upstream = pods = operator = None
    stop = threading.Event()
    admin_port = free_port()
    try:
        upstream, upstream_url = start_upstream(work)
        pods = Pods(work, standin, upstream_url, admin_port, ns=NS, name=NAME)
        syncer = threading.Thread(target=follow, args=(pods, stop), daemon=True)
        syncer.start()
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-zero",
                            "--no-leader-election", "--scaling-interval-seconds", "1",
                            "--sidecar-admin-port", str(admin_port))
        yield {"standin": standin, "pods": pods, "operator": operator}
    finally:
        stop.set()
        if pods is not None:
            pods.stop()
        if operator is not None:
            operator.stop()
        if upstream is not None:
            stop_process(upstream)
        standin.stop()


def replicas(standin: StandIn) -> int:
    return standin.kube.get("apps/v1", "deployments", NS, NAME)["spec"]["replicas"]


def scaling(standin: StandIn) -> dict[str, Any]:
    return (standin.kube.get(AGENTS, "agents", NS, NAME).get("status") or {}).get("scaling") or {}


def test_a_worker_idles_to_zero_and_a_job_wakes_it(worker: dict[str, Any]) -> None:
    standin, pods = worker["standin"], worker["pods"]
    k = standin.kube
    k.ensure_namespace(NS)
    k.apply({"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": "team", "namespace": NS},
             "spec": {"limits": {"costMicros": 500_000_000}, "period": {"calendar": "month", "timeZone": "UTC"}}},
            manager="kubectl")
    # A worker: no port (so no Service and nothing inbound to wake it), minimum zero.
    k.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": NAME, "namespace": NS},
             "spec": {"image": "registry.example.com/agents/digest@sha256:" + "cd" * 32,
                      "model": {"provider": "openai", "name": "gpt-4o-mini"}, "budgetRef": {"name": "team"},
                      "scaling": {"minReplicas": 0, "maxReplicas": 2, "idleToZeroSeconds": IDLE,
                                  "coldStartHoldSeconds": 2, "floorHoldSeconds": 0, "reversalHoldSeconds": 2}}},
            manager="kubectl")
    # It starts with one replica (a new Agent is not idle yet), then idles out.
    wait_for("the first pod's sidecar", lambda: pods.sync(), seconds=60)
    wait_for("the scale to zero", lambda: replicas(standin) == 0, seconds=120)
    s = wait_for("status.scaling at zero", lambda: (s := scaling(standin)).get("desiredReplicas") == 0 and s,
                 seconds=30)
    assert s["reason"] == "idle" and s["pendingJobs"] == 0, s
    agent = k.get(AGENTS, "agents", NS, NAME)
    c = condition(agent, "Scaling")
    assert c["status"] == "True" and c["reason"] == "ScaledToZero", c
    assert "spec.agentRef" in c["message"] and "idleToZeroSeconds" in c["message"], c
    ready = wait_for("Ready=True ScaledToZero", lambda: (c := condition(k.get(AGENTS, "agents", NS, NAME), "Ready"))
                     .get("reason") == "ScaledToZero" and c, seconds=30)
    assert ready["status"] == "True" and "Soma Job" in ready["message"], ready
    wait_for("no sidecar left", lambda: not pods.sync(), seconds=30)

    # A Job that names the Agent wakes it.
    k.apply({"apiVersion": AGENTS, "kind": "Job", "metadata": {"name": "digest-monday", "namespace": NS},
             "spec": {"agentRef": {"name": NAME}, "input": "digest the week", "deadlineSeconds": 3600}},
            manager="kubectl")
    wait_for("the wake-up", lambda: replicas(standin) == 1, seconds=60)
    woken = wait_for("status.scaling woken", lambda: (s := scaling(standin)).get("reason") == "queuedWork" and s,
                     seconds=30)
    assert woken["desiredReplicas"] == 1 and woken["pendingJobs"] == 1, woken
    c = condition(k.get(AGENTS, "agents", NS, NAME), "Scaling")
    assert c["reason"] == "WokenByJob" and "digest-monday" in c["message"], c
    events = [e for e in k.list("events.k8s.io/v1", "events", NS)["items"]
              if e.get("regarding", {}).get("name") == NAME and e.get("reason") in ("ScaledToZero", "WokenByJob")]
    assert {e["reason"] for e in events} >= {"ScaledToZero", "WokenByJob"}, events
    wait_for("the woken pod's sidecar", lambda: pods.sync(), seconds=60)

    # It stays up while the Job runs, well past the idle period (by the operator's own clock).
    woke_at = stamp(woken["lastScaleTime"])
    wait_for("steps past the idle period", lambda: stamp(scaling(standin)["lastStepTime"])
             > woke_at + datetime.timedelta(seconds=2 * IDLE), seconds=60)
    assert replicas(standin) == 1
    kept = scaling(standin)
    assert kept["desiredReplicas"] == 1 and kept["pendingJobs"] == 1, kept
    assert k.get(AGENTS, "jobs", NS, "digest-monday")["status"]["phase"] in ("Running", "Waiting", "Queued")

    # The Job finishes: after the idle period the Agent goes back to zero.
    r = requests.post(f"{standin.url}/_jobs/{NS}/digest-monday", json={"attempts": [{"exit": 0, "message": "done"}]},
                      timeout=10)
    assert r.ok, r.text
    wait_for("the Job's success", lambda: (k.get(AGENTS, "jobs", NS, "digest-monday").get("status") or {})
             .get("phase") == "Succeeded", seconds=60)
    wait_for("the scale back to zero", lambda: replicas(standin) == 0, seconds=120)
    s = wait_for("status.scaling at zero again", lambda: (s := scaling(standin)).get("desiredReplicas") == 0 and s,
                 seconds=30)
    assert s["reason"] == "idle" and s["pendingJobs"] == 0, s
