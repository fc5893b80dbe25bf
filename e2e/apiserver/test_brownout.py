"""Brown-out enforced live, closed on this machine: the real operator (with a ledger) against the API
stand-in, whose Deployment emulation turns replicas into pods with loopback IPs, a real
`soma-proxy` per pod (started from the ConfigMap the operator wrote, with the ledger's URL) in
front of `soma-fake-upstream`, and closed-loop clients, half sending `x-soma-priority: low` and
half `high`.

    pytest ──▶ soma_apiserver.py --deployment-pods ◀── soma-operator run --ledger-url --scaling-interval-seconds 1
      │                                                   │ GET /load  │ upsert soma_agent_live + NOTIFY soma_live
      └── soma-proxy per pod on 127.0.0.x ◀───────────────┘            ▼
            LISTEN soma_live ◀──────────────────────────────────── PostgreSQL

Checked: with maxReplicas too small for the load, the operator engages a brown-out: the Agent
shows BrownOut=True with the autoscaler's message and `status.scaling.brownOut`, a Warning
Event, the ledger row and the ConfigMap carry it, the operator exports the autoscaler series,
and the sidecars shed low-priority calls (503 `brown_out`, in OpenAI's format) and never
high-priority ones; when the load stops it clears everywhere (BrownOut=False, an Event, the row
and the ConfigMap without it) and low-priority calls are served again, with no sidecar
restarted. The time from the operator deciding the brown-out (its revision is the decision's
time) to each sidecar's first shed call is measured from the sidecars' logs and printed; nothing
compares it with a threshold.

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN and PostgreSQL (servers.py).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest
import requests

from harness import REPO, Kube, StandIn, free_port, stop_process, wait_for
from servers import Postgres
from test_convergence import AGENTS, Operator
from test_scaling import KEY, PROXY, TOKEN, UPSTREAM, condition, start_upstream

pytestmark = pytest.mark.skipif(
    not all(b and os.access(b, os.X_OK) for b in (os.environ.get("SOMA_OPERATOR_BIN", ""), PROXY, UPSTREAM)),
    reason="SOMA_OPERATOR_BIN, SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN must be executables")

NS = "browned"
NAME = "busy"
TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z)")


class Pods:
    """A real `soma-proxy` per pod of the Agent, on the pod's IP, with the ledger's URL; stopped
    when its pod goes. Each keeps the PID it started with, so a restart would show."""

    def __init__(self, work: pathlib.Path, standin: StandIn, upstream: str, admin_port: int, pg_url: str,
                 agent: str = NAME):
        self.work, self.kube, self.upstream, self.admin_port, self.pg_url = (
            work, Kube(standin.url), upstream, admin_port, pg_url)
        self.agent = agent
        self.proxy_port = free_port()
        self.sidecars: dict[str, tuple[subprocess.Popen[bytes], str, pathlib.Path]] = {}
        self.lock = threading.Lock()

    def sync(self) -> list[str]:
        with self.lock:
            pods = self.kube.list("v1", "pods", NS, labelSelector=f"soma.dev/agent={self.agent}")["items"]
            live = {p["metadata"]["uid"]: p["status"]["podIP"] for p in pods if (p.get("status") or {}).get("podIP")}
            for uid in [u for u in self.sidecars if u not in live]:
                stop_process(self.sidecars.pop(uid)[0])
            for uid, ip in live.items():
                if uid not in self.sidecars:
                    proc, log = self._start(uid, ip)
                    self.sidecars[uid] = (proc, f"http://{ip}:{self.proxy_port}/v1/chat/completions", log)
            return [url for _, url, _ in self.sidecars.values()]

    def _start(self, uid: str, ip: str) -> tuple[subprocess.Popen[bytes], pathlib.Path]:
        cm = self.kube.get("v1", "configmaps", NS, f"{self.agent}-sidecar")
        config = json.loads(cm["data"]["config.yaml"])
        d = self.work / uid
        d.mkdir(exist_ok=True)
        (d / "api-key").write_text(KEY)
        config.update(listen=f"{ip}:{self.proxy_port}", adminListen=f"{ip}:{self.admin_port}",
                      credentials={"file": str(d / "api-key")}, outboxPath=str(d / "outbox.db"))
        config["provider"]["upstream"] = self.upstream
        # The ledger is the fast path; the file is not followed here (a kubelet refresh takes a
        # minute), so whatever the sidecars enforce came through the ledger.
        config["live"] = {"fileCheckMs": 0, "ledgerPollMs": 600_000}
        (d / "config.yaml").write_text(json.dumps(config))
        env = dict(os.environ, SOMA_POD_UID=TOKEN, SOMA_DATABASE_URL=self.pg_url, RUST_LOG="info", NO_COLOR="1")
        log = d / "sidecar.log"
        proc = subprocess.Popen([PROXY, "--config", str(d / "config.yaml")], stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, env=env)
        return proc, log

    def loads(self) -> list[dict[str, Any]]:
        """Each running sidecar's `GET /load`."""
        with self.lock:
            urls = [url for _, url, _ in self.sidecars.values()]
        out = []
        for url in urls:
            ip = url.split("//", 1)[1].split(":", 1)[0]
            try:
                out.append(requests.get(f"http://{ip}:{self.admin_port}/load", timeout=5).json())
            except requests.RequestException:
                pass  # a sidecar stopping
        return out

    def logs(self) -> list[str]:
        with self.lock:
            return [log.read_text(errors="replace") for _, _, log in self.sidecars.values()]

    def pids(self) -> set[int]:
        with self.lock:
            return {p.pid for p, _, _ in self.sidecars.values()}

    def stop(self) -> None:
        with self.lock:
            for proc, _, _ in self.sidecars.values():
                stop_process(proc)
            self.sidecars.clear()


class Load:
    """Closed-loop clients, each with its priority; a shed or rate-limited call waits a moment before
    the next."""

    def __init__(self, pods: Pods, priorities: list[str], model: str = "gpt-4o-mini",
                 shed_says: str = "maxReplicas is 2"):
        self.pods, self.stopping, self.model, self.shed_says = pods, threading.Event(), model, shed_says
        self.counts: dict[tuple[str, int], int] = {}
        self.first_shed: float | None = None
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i, p), daemon=True)
                        for i, p in enumerate(priorities)]
        for t in self.threads:
            t.start()

    def _client(self, i: int, priority: str) -> None:
        body = {"model": self.model, "max_tokens": 20, "stream": True,
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
                                   headers={"authorization": f"Bearer {TOKEN}", "x-soma-priority": priority}) as r:
                    data = b"".join(r.iter_content(chunk_size=None))
                    with self.lock:
                        self.counts[(priority, r.status_code)] = self.counts.get((priority, r.status_code), 0) + 1
                        if r.status_code == 503:
                            e = json.loads(data)["error"]
                            if e.get("code") != "brown_out" or self.shed_says not in e.get("message", ""):
                                self.bad.append(data.decode(errors="replace"))
                            if self.first_shed is None:
                                self.first_shed = time.time()
                if r.status_code in (429, 503):
                    self.stopping.wait(0.5)
            except requests.RequestException:
                self.stopping.wait(0.1)  # a sidecar still starting or just stopped

    def count(self, priority: str, status: int) -> int:
        with self.lock:
            return self.counts.get((priority, status), 0)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.fixture(scope="module")
def browned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("brownout")
    standin = StandIn(work, "--deployment-pods", crds=REPO / "crds")
    pg = upstream = pods = operator = None
    admin_port = free_port()
    try:
        pg = Postgres(work)
        upstream, upstream_url = start_upstream(work)
        pods = Pods(work, standin, upstream_url, admin_port, pg.url)
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-brownout",
                            "--no-leader-election", "--ledger-url", pg.url, "--scaling-interval-seconds", "1",
                            "--sidecar-admin-port", str(admin_port))
        yield {"standin": standin, "pods": pods, "operator": operator, "pg": pg, "upstream_url": upstream_url,
               "admin_port": admin_port}
    finally:
        if pods is not None:
            pods.stop()
        if operator is not None:
            operator.stop()
        if upstream is not None:
            stop_process(upstream)
        if pg is not None:
            pg.stop()
        standin.stop()


def stamps(text: str, needle: str) -> list[float]:
    """The times (Unix seconds) of the log lines holding `needle`."""
    out = []
    for line in text.splitlines():
        if needle in line and (m := TIME.search(line)):
            out.append(datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp())
    return out


def test_brown_out_engages_on_the_sidecars_and_clears_when_the_load_stops(browned: dict[str, Any]) -> None:
    standin, pods, operator, pg = browned["standin"], browned["pods"], browned["operator"], browned["pg"]
    k = standin.kube
    k.ensure_namespace(NS)
    k.apply({"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": "team", "namespace": NS},
             "spec": {"limits": {"costMicros": 500_000_000}, "period": {"calendar": "month", "timeZone": "UTC"}}},
            manager="kubectl")
    # Two replicas at most, a 100 ms wait target: eight clients of slow streams need far more.
    k.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": NAME, "namespace": NS},
             "spec": {"image": "registry.example.com/agents/echo@sha256:" + "cd" * 32,
                      "model": {"provider": "openai", "name": "gpt-4o-mini"}, "budgetRef": {"name": "team"},
                      "scaling": {"minReplicas": 1, "maxReplicas": 2, "targetP95WaitMs": 100,
                                  "floorHoldSeconds": 0, "reversalHoldSeconds": 2}}}, manager="kubectl")
    wait_for("the first pod's sidecar", lambda: pods.sync(), seconds=60)
    wait_for("the first decision (BrownOut=False)",
             lambda: condition(k.get(AGENTS, "agents", NS, NAME), "BrownOut").get("reason") == "NoBrownOut", seconds=60)

    load = Load(pods, ["low", "high"] * 4)
    started = time.time()
    try:
        agent = wait_for("BrownOut=True", lambda: (a := k.get(AGENTS, "agents", NS, NAME))
                         and condition(a, "BrownOut").get("status") == "True" and a, seconds=120)
        engaged = time.time()
        c = condition(agent, "BrownOut")
        assert c["reason"] == "Shedding", c
        assert "maxReplicas is 2" in c["message"] and "shedding" in c["message"] and "req/s" in c["message"], c
        b = agent["status"]["scaling"]["brownOut"]
        assert 0 < b["fraction"] <= 1 and b["action"] == "shed" and "maxReplicas is 2" in b["message"], b
        revision = agent["status"]["scaling"]["brownOutRevision"]
        assert revision > 0
        # The ledger's row (the sidecars' fast path) and the ConfigMap (the file path) carry it.
        row = pg.sql(f"SELECT brown_out::text FROM soma_agent_live WHERE namespace = '{NS}' AND agent = '{NAME}'")
        assert '"action": "shed"' in row, row
        wait_for("the ConfigMap with the brown-out", lambda: "brownOut" in json.loads(
            k.get("v1", "configmaps", NS, f"{NAME}-sidecar")["data"]["config.yaml"]), seconds=30)
        # The sidecars shed low-priority calls; high-priority ones are never shed.
        wait_for("low-priority calls shed", lambda: load.count("low", 503) >= 5, seconds=60)
        before = {s: load.count("high", s) for s in (200, 503)}
        wait_for("more high-priority calls served", lambda: load.count("high", 200) > before[200] + 10, seconds=60)
        metrics = operator.metrics()
        for series in ("soma_autoscaler_brownout", "soma_autoscaler_desired_replicas",
                       "soma_autoscaler_conductance", "soma_autoscaler_decisions_total"):
            assert f'{series}{{namespace="{NS}",agent="{NAME}"' in metrics, f"{series} missing:\n{metrics}"
        assert re.search(rf'soma_autoscaler_brownout\{{namespace="{NS}",agent="{NAME}"\}} 0\.[0-9]*[1-9]', metrics) or \
            re.search(rf'soma_autoscaler_brownout\{{namespace="{NS}",agent="{NAME}"\}} 1', metrics), metrics
    finally:
        load.stop()
    assert load.count("high", 503) == 0, f"high-priority calls shed: {load.counts}"
    assert not load.bad, load.bad[:3]
    pids = pods.pids()

    # Deciding to enforcing, per sidecar that was running before the decision: the revision is
    # the operator's clock (ms) when it decided, just before it wrote the ledger's row; the
    # sidecar's log stamps its first shed call (an upper bound: the next low call may come a
    # little later). The operator's and the sidecars' clocks are this machine's.
    decided = revision / 1000
    lags = []
    for text in pods.logs():
        started_at = stamps(text, "soma-proxy serving")
        sheds = [t for t in stamps(text, "shed by brown-out") if t >= decided - 1]
        if started_at and started_at[0] < decided and sheds:
            lags.append(sheds[0] - decided)
    assert lags, "no sidecar running before the decision logged a shed call"
    print(f"brown-out: load start → BrownOut=True {engaged - started:.1f} s (scaling interval 1 s); "
          f"decided → first call shed by each sidecar running then: {', '.join(f'{x * 1000:.0f} ms' for x in lags)}; "
          f"first shed call {((load.first_shed or engaged) - started):.1f} s after the load started; "
          f"calls: {dict(sorted(load.counts.items()))}")

    # The load has stopped: the brown-out clears everywhere, and low-priority calls are served.
    agent = wait_for("BrownOut=False", lambda: (a := k.get(AGENTS, "agents", NS, NAME))
                     and condition(a, "BrownOut").get("status") == "False" and a, seconds=120)
    assert condition(agent, "BrownOut")["reason"] == "NoBrownOut"
    assert "brownOut" not in agent["status"]["scaling"], agent["status"]["scaling"]
    wait_for("the ledger row cleared", lambda: pg.sql(
        f"SELECT brown_out IS NULL FROM soma_agent_live WHERE namespace = '{NS}' AND agent = '{NAME}'") == "t",
        seconds=30)
    wait_for("the ConfigMap without the brown-out", lambda: "brownOut" not in json.loads(
        k.get("v1", "configmaps", NS, f"{NAME}-sidecar")["data"]["config.yaml"]), seconds=30)

    def served(url: str) -> bool:
        for _ in range(5):
            r = requests.post(url, json={"model": "gpt-4o-mini", "max_tokens": 5,
                                         "messages": [{"role": "user", "content": "hello"}]},
                              headers={"authorization": f"Bearer {TOKEN}", "x-soma-priority": "low"}, timeout=30)
            if r.status_code != 200:
                assert r.status_code == 503 and r.json()["error"]["code"] == "brown_out", r.text
                return False
        return True

    wait_for("low-priority calls served again by every sidecar", lambda: all(served(u) for u in pods.sync()),
             seconds=30)
    assert pods.pids() <= pids, "no sidecar was restarted (a scale-down may have stopped one)"
    events = [e for e in k.list("events.k8s.io/v1", "events", NS)["items"]
              if e.get("regarding", {}).get("name") == NAME and e.get("action") == "BrownOut"]
    reasons = [e["reason"] for e in events]
    assert "Shedding" in reasons and "BrownOutCleared" in reasons, reasons
    assert metrics_value(operator.metrics(), "soma_autoscaler_brownout", NAME) == 0.0


def metrics_value(text: str, name: str, agent: str) -> float | None:
    m = re.search(rf'{name}\{{namespace="{NS}",agent="{agent}"\}} ([0-9.eE+-]+)', text)
    return float(m.group(1)) if m else None


def test_a_budget_rate_caps_the_replicas_and_the_brown_out_downgrades(browned: dict[str, Any], tmp_path) -> None:
    """A Budget that lets 1 call/s through caps the replicas below `maxReplicas` (eight clients of
    slow streams want more), so the brown-out names the Budget, and with `brownOutAction:
    downgrade` the sidecars send the low-priority share to `brownOutModel` instead of shedding
    it. (Whether the rate cap itself refuses calls within the run depends on its calendar
    minute; calls it refuses count as demand, `tests/load.rs` and the crate's tests.)"""
    standin, pg = browned["standin"], browned["pg"]
    k = standin.kube
    k.ensure_namespace(NS)
    agent_name = "capped"
    k.apply({"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": "rated", "namespace": NS},
             "spec": {"limits": {"costMicros": 500_000_000, "requestsPerMinute": 60},
                      "period": {"calendar": "month", "timeZone": "UTC"}}}, manager="kubectl")
    k.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": agent_name, "namespace": NS},
             "spec": {"image": "registry.example.com/agents/echo@sha256:" + "ce" * 32,
                      "model": {"provider": "openai", "name": "gpt-4o"}, "budgetRef": {"name": "rated"},
                      "scaling": {"minReplicas": 1, "maxReplicas": 20, "targetP95WaitMs": 100,
                                  "floorHoldSeconds": 0, "reversalHoldSeconds": 2,
                                  "brownOutAction": "downgrade", "brownOutModel": "gpt-4o-mini"}}},
            manager="kubectl")
    pods = Pods(tmp_path, standin, browned["upstream_url"], browned["admin_port"], pg.url, agent=agent_name)
    try:
        wait_for("the first pod's sidecar", lambda: pods.sync(), seconds=60)
        load = Load(pods, ["low", "high"] * 4, model="gpt-4o", shed_says="the Budget")
        try:
            agent = wait_for("BrownOut=True", lambda: (a := k.get(AGENTS, "agents", NS, agent_name))
                             and condition(a, "BrownOut").get("status") == "True" and a, seconds=120)
            c = condition(agent, "BrownOut")
            assert c["reason"] == "Downgrading", c
            assert "the Budget allows only" in c["message"], c
            scaling = agent["status"]["scaling"]
            b = scaling["brownOut"]
            assert b["action"] == "downgrade" and b["model"] == "gpt-4o-mini", b
            assert scaling["desiredReplicas"] < 20, scaling
            wait_for("calls downgraded by the sidecars",
                     lambda: sum(r.get("downgraded", 0) for r in pods.loads()) >= 3, seconds=60)
        finally:
            load.stop()
        assert load.count("high", 503) == 0 and load.count("low", 503) == 0, f"shed, not downgraded: {load.counts}"
        assert not load.bad, load.bad[:3]
        print(f"budget cap: status.scaling {json.dumps({x: scaling.get(x) for x in ('desiredReplicas', 'reason', 'arrivalRate')})}; "
              f"calls: {dict(sorted(load.counts.items()))}")
        wait_for("BrownOut=False", lambda: condition(k.get(AGENTS, "agents", NS, agent_name),
                                                      "BrownOut").get("status") == "False", seconds=120)
    finally:
        pods.stop()
