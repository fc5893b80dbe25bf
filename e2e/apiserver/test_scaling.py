"""The scaling loop closed on this machine: the real operator against the API stand-in, whose
Deployment emulation turns replicas into pods with distinct loopback IPs (`--deployment-pods`),
each pod served by a real `soma-proxy` (started from the ConfigMap the operator wrote, on the
pod's IP) in front of `soma-fake-upstream`, and closed-loop clients sending slow streamed calls.

    pytest ──▶ soma_apiserver.py --deployment-pods ◀──HTTP── soma-operator run --scaling-interval-seconds 1
      │          (pods 127.0.0.2, .3, …)                         │ GET http://127.0.0.x:ADMIN/load
      └── a soma-proxy per pod on 127.0.0.x ◀────────────────────┘
            ▲ clients (round robin over the pods)    └──▶ soma-fake-upstream (SCENARIO:slow)

Checked: under load the Deployment's replicas rise above the minimum under the field manager
`soma-autoscaler` and `status.scaling` says why (reason, arrival rate, service time,
conductance, Erlang-C floor) with a `Scaling` condition and an Event; when the load stops they
come back to the minimum; an operator restarted mid-way continues from status without a jump;
`kubectl scale` (another owner of `spec.replicas`) is reported as a conflict and neither side
overwrites the other. Every wait is bounded; nothing compares wall-clock durations.

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
from typing import Any, Iterator

import pytest
import requests

from harness import REPO, Kube, StandIn, api_path, free_port, stop_process, wait_for
from test_convergence import AGENTS, Operator

PROXY = os.environ.get("SOMA_PROXY_BIN", "")
UPSTREAM = os.environ.get("SOMA_FAKE_UPSTREAM_BIN", "")
pytestmark = pytest.mark.skipif(
    not all(b and os.access(b, os.X_OK) for b in (os.environ.get("SOMA_OPERATOR_BIN", ""), PROXY, UPSTREAM)),
    reason="SOMA_OPERATOR_BIN, SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN must be executables")

KEY = "sk-scaling-e2e-51a9"
TOKEN = "pod-uid-scaling-e2e"
NS = "scaled"
NAME = "bot"


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


class Pods:
    """A real `soma-proxy` for each pod of the Agent, on the pod's IP; stopped when the pod goes."""

    def __init__(self, work: pathlib.Path, standin: StandIn, upstream: str, admin_port: int,
                 ns: str = NS, name: str = NAME):
        self.work, self.kube, self.upstream, self.admin_port = work, Kube(standin.url), upstream, admin_port
        self.ns, self.name = ns, name
        self.proxy_port = free_port()
        self.sidecars: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        self.lock = threading.Lock()

    def sync(self) -> list[str]:
        """Starts sidecars for new pods, stops those of deleted pods; returns the proxy URLs."""
        with self.lock:
            pods = self.kube.list("v1", "pods", self.ns, labelSelector=f"soma.dev/agent={self.name}")["items"]
            live = {p["metadata"]["uid"]: p["status"]["podIP"] for p in pods if (p.get("status") or {}).get("podIP")}
            for uid in [u for u in self.sidecars if u not in live]:
                stop_process(self.sidecars.pop(uid)[0])
            for uid, ip in live.items():
                if uid not in self.sidecars:
                    self.sidecars[uid] = (self._start(uid, ip), f"http://{ip}:{self.proxy_port}/v1/chat/completions")
            return [url for _, url in self.sidecars.values()]

    def _start(self, uid: str, ip: str) -> subprocess.Popen[bytes]:
        cm = self.kube.get("v1", "configmaps", self.ns, f"{self.name}-sidecar")
        config = json.loads(cm["data"]["config.yaml"])
        d = self.work / uid
        d.mkdir(exist_ok=True)
        (d / "api-key").write_text(KEY)
        config.update(listen=f"{ip}:{self.proxy_port}", adminListen=f"{ip}:{self.admin_port}",
                      credentials={"file": str(d / "api-key")}, outboxPath=str(d / "outbox.db"))
        config["provider"]["upstream"] = self.upstream
        (d / "config.yaml").write_text(json.dumps(config))
        env = dict(os.environ, SOMA_POD_UID=TOKEN, RUST_LOG="info")
        return subprocess.Popen([PROXY, "--config", str(d / "config.yaml")], stdout=open(d / "sidecar.log", "wb"),
                                stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        with self.lock:
            for proc, _ in self.sidecars.values():
                stop_process(proc)
            self.sidecars.clear()


class Load:
    """Closed-loop clients: each sends a slow streamed call, waits for its end, sends the next."""

    def __init__(self, pods: Pods, clients: int):
        self.pods, self.stopping, self.ok = pods, threading.Event(), 0
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        body = {"model": "gpt-4o-mini", "max_tokens": 20, "stream": True,
                "messages": [{"role": "user", "content": "SCENARIO:slow count"}]}
        n = i
        while not self.stopping.is_set():
            urls = self.pods.sync()
            if not urls:
                self.stopping.wait(0.1)
                continue
            n += 1
            try:
                with requests.post(urls[n % len(urls)], json=body, stream=True, timeout=30,
                                   headers={"authorization": f"Bearer {TOKEN}"}) as r:
                    for _ in r.iter_content(chunk_size=None):
                        pass
                    if r.status_code == 200:
                        self.ok += 1
            except requests.RequestException:
                self.stopping.wait(0.1)  # a sidecar still starting or just stopped

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)


def start_upstream(work: pathlib.Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([UPSTREAM, "--listen", "127.0.0.1:0", "--key", KEY],
                            stdout=subprocess.PIPE, stderr=open(work / "upstream.log", "wb"))
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on "), line
    return proc, "http://" + line.removeprefix("listening on ").strip()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("scaling")
    standin = StandIn(work, "--deployment-pods", crds=REPO / "crds")
    upstream = pods = None
    operators: list[Operator] = []
    admin_port = free_port()
    args = ("--no-leader-election", "--scaling-interval-seconds", "1", "--sidecar-admin-port", str(admin_port))
    try:
        upstream, upstream_url = start_upstream(work)
        pods = Pods(work, standin, upstream_url, admin_port)

        def operator(name: str) -> Operator:
            op = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), name, *args)
            operators.append(op)
            return op

        yield {"standin": standin, "pods": pods, "operator": operator, "operators": operators}
    finally:
        if pods is not None:
            pods.stop()
        for op in operators:
            op.stop()
        if upstream is not None:
            stop_process(upstream)
        standin.stop()


def replicas(standin: StandIn) -> int:
    return standin.kube.get("apps/v1", "deployments", NS, NAME)["spec"]["replicas"]


def managers(standin: StandIn) -> list[str]:
    d = standin.kube.get("apps/v1", "deployments", NS, NAME)
    return [m["manager"] for m in d["metadata"].get("managedFields") or []
            if "f:replicas" in (m.get("fieldsV1") or {}).get("f:spec", {})]


def test_replicas_follow_the_load_up_and_down_and_status_explains_why(scaled: dict[str, Any]) -> None:
    standin, pods = scaled["standin"], scaled["pods"]
    k = standin.kube
    operator = scaled["operator"]("soma-operator-scaling")
    k.ensure_namespace(NS)
    # The built-in policies want every Agent to charge a Budget.
    k.apply({"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": "team", "namespace": NS},
             "spec": {"limits": {"costMicros": 500_000_000}, "period": {"calendar": "month", "timeZone": "UTC"}}},
            manager="kubectl")
    k.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": NAME, "namespace": NS},
             "spec": {"image": "registry.example.com/agents/echo@sha256:" + "ab" * 32,
                      "model": {"provider": "openai", "name": "gpt-4o-mini"}, "budgetRef": {"name": "team"},
                      "scaling": {"minReplicas": 1, "maxReplicas": 4, "targetP95WaitMs": 500,
                                  "floorHoldSeconds": 0, "reversalHoldSeconds": 2}}}, manager="kubectl")
    wait_for("the first pod's sidecar", lambda: pods.sync(), seconds=60)
    # Idle: the autoscaler takes over spec.replicas (co-owning it first) and keeps the minimum.
    wait_for("soma-autoscaler to own spec.replicas", lambda: managers(standin) == ["soma-autoscaler"], seconds=60)
    assert replicas(standin) == 1

    load = Load(pods, clients=4)
    try:
        up = wait_for("a scale-up", lambda: (n := replicas(standin)) > 1 and n, seconds=120)
        agent = wait_for("status.scaling for the scale-up", lambda: (a := k.get(AGENTS, "agents", NS, NAME))
                         and (a["status"].get("scaling") or {}).get("desiredReplicas", 0) > 1 and a, seconds=60)
    finally:
        load.stop()
    s = agent["status"]["scaling"]
    assert s["reason"] in ("erlangFloor", "conductance", "floorHold", "cap"), s
    assert s["arrivalRate"] > 0 and s["serviceTimeS"] > 0 and s["reportingPods"] >= 1, s
    assert s["arrivalScv"] >= 1, s  # burstiness is never taken below Poisson's
    assert s["erlangFloor"] >= 1 and s["lastScaleTime"] and s["state"]["replicas"] >= 1, s
    assert up <= 4, "never above maxReplicas"
    c = condition(agent, "Scaling")
    assert c["status"] == "True" and "req/s" in c["message"] and "Erlang-C floor" in c["message"], c
    events = [e for e in k.list("events.k8s.io/v1", "events", NS)["items"]
              if e.get("regarding", {}).get("name") == NAME and e.get("action") == "Scale"]
    assert events, "an Event when the Scaling reason changed"
    assert load.ok > 0

    # A new operator process continues from status: the first steps keep the replicas it finds.
    before = replicas(standin)
    operator.stop()
    scaled["operators"].remove(operator)
    operator = scaled["operator"]("soma-operator-scaling-2")
    wait_for("the new operator's first step", lambda: "scaled" in operator.log_tail(400) or
             (k.get(AGENTS, "agents", NS, NAME)["status"]["scaling"]["lastStepTime"] != s["lastStepTime"]), seconds=60)
    assert abs(replicas(standin) - before) <= 1, "no jump after a restart"

    # No load: back to the minimum, and status says the floor (or minReplicas) set it.
    wait_for("the scale-down to minReplicas", lambda: replicas(standin) == 1, seconds=300)
    agent = wait_for("status.scaling at the minimum", lambda: (a := k.get(AGENTS, "agents", NS, NAME))
                     and a["status"]["scaling"]["desiredReplicas"] == 1 and a, seconds=60)
    assert agent["status"]["scaling"]["reason"] in ("minReplicas", "erlangFloor", "conductance"), agent["status"]
    wait_for("one sidecar left", lambda: len(pods.sync()) == 1, seconds=30)


def test_kubectl_scale_is_reported_as_a_conflict_not_fought_over(scaled: dict[str, Any]) -> None:
    standin = scaled["standin"]
    k = standin.kube
    # kubectl scale: an Update of spec.replicas under the field manager kubectl.
    k.request("PATCH", api_path("apps/v1", "deployments", NS, NAME), params={"fieldManager": "kubectl"},
              data=json.dumps({"spec": {"replicas": 3}}), headers={"Content-Type": "application/merge-patch+json"},
              expect=200)
    c = wait_for("Scaling=False ReplicasConflict", lambda: (c := condition(k.get(AGENTS, "agents", NS, NAME),
                                                                           "Scaling")).get("reason") == "ReplicasConflict" and c,
                 seconds=60)
    assert c["status"] == "False" and "kubectl" in c["message"], c
    # Neither the autoscaler nor the Agent reconcile overwrote it.
    assert replicas(standin) == 3
    assert "kubectl" in managers(standin)
