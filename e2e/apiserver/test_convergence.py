"""The real operator binary, its kube-runtime controller loop over HTTP, against the API stand-in.

    pytest ──▶ soma_apiserver.py (kmock)  ◀──HTTP── soma-operator run (kube-rs Controller)
      │            ▲  /_stats: requests and changes per object          │
      └── seeds CRDs, examples, N Agents + Budget ────┘                  └─ /metrics: soma_reconcile_total

Checks: every Agent converges (children exist: ServiceAccount, Deployment, NetworkPolicy named
after the Agent, ConfigMap `<agent>-sidecar`, and a Service when the Agent has a `port`; status.observedGeneration == generation; Ready
True) within a bounded time; then a quiet period with no writes at all (no hot loop); the
number of reconciles and of writes per Agent stays small (a count, not a timing). With leader
election on, two replicas run and only the Lease holder reconciles; when it stops, the other
takes over.

Needs SOMA_OPERATOR_BIN (e.g. $HOME/.cache/soma/target/debug/soma-operator); skipped without.
SOMA_CONVERGENCE_AGENTS overrides the number of generated Agents (default 50).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import time
from typing import Any, Iterator

import pytest
import requests

from harness import REPO, StandIn, free_port, load_manifests, stop_process

BIN = os.environ.get("SOMA_OPERATOR_BIN", "")
pytestmark = pytest.mark.skipif(
    not BIN or not os.access(BIN, os.X_OK),
    reason="SOMA_OPERATOR_BIN is not set to an executable soma-operator "
           "(e.g. SOMA_OPERATOR_BIN=$HOME/.cache/soma/target/debug/soma-operator)")

N_AGENTS = int(os.environ.get("SOMA_CONVERGENCE_AGENTS", "50"))
NAMESPACE = "soma-conv"
CONVERGE_SECONDS = 120
QUIET_SECONDS = 10
MAX_RECONCILES_PER_AGENT = 5
MAX_WRITES_PER_AGENT = 10  # 5 children + status, with room for one Deployment-readiness round
WRITE_VERBS = {"create", "update", "patch", "apply", "delete", "deletecollection"}
# Writes that are not reconcile output: leader-election renewals and Events.
NOT_RECONCILE = {"coordination.k8s.io/v1/leases", "v1/events", "events.k8s.io/v1/events"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
AGENTS = "soma.dev/v1alpha1"


def budget(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": name, "namespace": namespace},
            "spec": {"period": {"calendar": "month", "timeZone": "UTC"}, "limits": {"costMicros": 500000000}}}


def generated_agent(i: int, namespace: str) -> dict[str, Any]:
    digest = f"{i:02x}" * 32
    return {"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": f"gen-{i:02d}", "namespace": namespace},
            "spec": {"image": f"registry.example.com/agents/echo@sha256:{digest}",
                     "model": {"provider": "openai", "name": "gpt-4o-mini"},
                     "budgetRef": {"name": "team-budget"}}}


class Operator:
    """One `soma-operator run` process; stopped by PID."""

    def __init__(self, workdir: pathlib.Path, kubeconfig: pathlib.Path, name: str, *args: str):
        self.name = name
        self.port = free_port()
        self.webhook_port = free_port()
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        env.update(KUBECONFIG=str(kubeconfig), POD_NAME=name, POD_NAMESPACE="default",
                   RUST_LOG=os.environ.get("SOMA_E2E_RUST_LOG", "info"), NO_COLOR="1")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [BIN, "run", "--metrics-addr", f"127.0.0.1:{self.port}",
             "--webhook-port", str(self.webhook_port), "--webhook-bind-address", "127.0.0.1", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2)
                break
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    stop_process(self.proc)
                    raise RuntimeError(f"{name} did not start:\n{self.log_tail()}")
                time.sleep(0.1)

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text

    def reconciles(self, controller: str | None = None) -> float:
        """`soma_reconcile_total` summed over its labels (optionally one controller's only)."""
        total = 0.0
        for line in self.metrics().splitlines():
            m = re.match(r"soma_reconcile_total(\{[^}]*\})?\s+([0-9.eE+-]+)", line)
            if m and (controller is None or f'controller="{controller}"' in (m.group(1) or "")):
                total += float(m.group(2))
        return total

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process(self.proc, grace=25)  # the operator drains in-flight reconciles for up to 20 s
        self.proc = None
        self._log.close()


def seed(standin: StandIn, n_agents: int) -> list[tuple[str, str]]:
    """Examples (when present) and `n_agents` generated Agents; returns every Agent's (ns, name)."""
    k = standin.kube
    k.ensure_namespace(NAMESPACE)
    agents: list[tuple[str, str]] = []
    examples = sorted((REPO / "examples").glob("*.yaml"))
    for path in examples:
        for doc in load_manifests(path):
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {}).setdefault("namespace", "default")
            resp = k.apply_manifest(doc)
            if doc["kind"] == "Agent" and doc["apiVersion"] == AGENTS:
                agents.append((doc["metadata"]["namespace"], doc["metadata"]["name"]))
            assert resp["metadata"]["uid"]
    k.apply(budget("team-budget", NAMESPACE), manager="kubectl")
    for i in range(n_agents):
        k.apply(generated_agent(i, NAMESPACE), manager="kubectl")
        agents.append((NAMESPACE, f"gen-{i:02d}"))
    return agents


def agent_state(standin: StandIn, namespace: str) -> dict[str, str]:
    """For each Agent in `namespace`: 'ok', or why it has not converged yet."""
    k = standin.kube
    names = {plural: {o["metadata"]["name"] for o in k.list(api, plural, namespace)["items"]}
             for api, plural in (("v1", "serviceaccounts"), ("apps/v1", "deployments"), ("v1", "services"),
                                 ("networking.k8s.io/v1", "networkpolicies"), ("v1", "configmaps"))}
    out = {}
    for a in k.list(AGENTS, "agents", namespace)["items"]:
        name = a["metadata"]["name"]
        # A Service exists only for an Agent that serves a port.
        wanted = ("serviceaccounts", "deployments", "networkpolicies") + (("services",) if a["spec"].get("port") else ())
        missing = [p for p in wanted if name not in names[p]]
        if f"{name}-sidecar" not in names["configmaps"]:
            missing.append("configmaps/-sidecar")
        status = a.get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        if missing:
            why = f"; Ready={ready['status']} {ready['reason']}" if ready else ""
            out[name] = f"missing children {missing}{why}"
        elif status.get("observedGeneration") != a["metadata"].get("generation"):
            out[name] = f"observedGeneration {status.get('observedGeneration')} != {a['metadata'].get('generation')}"
        elif not ready or ready.get("status") != "True":
            out[name] = f"Ready={ready and ready.get('status')} ({ready and ready.get('reason')}: " \
                        f"{ready and ready.get('message')})"
        else:
            out[name] = "ok"
    return out


def wait_converged(standin: StandIn, namespace: str, expected: int, operators: list[Operator],
                   seconds: float = CONVERGE_SECONDS) -> float:
    start = time.monotonic()
    state: dict[str, str] = {}
    while time.monotonic() - start < seconds:
        state = agent_state(standin, namespace)
        if len(state) == expected and all(v == "ok" for v in state.values()):
            return time.monotonic() - start
        for op in operators:
            assert op.proc is None or op.proc.poll() is None, f"{op.name} exited:\n{op.log_tail()}"
        time.sleep(1)
    pending = {k: v for k, v in state.items() if v != "ok"}
    logs = "\n".join(f"--- {op.name}\n{op.log_tail()}" for op in operators)
    pytest.fail(f"{len(pending)}/{expected} Agents not converged after {seconds}s, e.g. "
                f"{dict(list(pending.items())[:5])}\n{logs}")


def write_counts(stats: dict[str, Any], namespace: str | None = None) -> dict[tuple[str, str, str, str], int]:
    """Write requests by (verb, resource, name, subresource), leases and Events excluded."""
    out: dict[tuple[str, str, str, str], int] = {}
    for r in stats["requests"]:
        if r["verb"] in WRITE_VERBS and r["resource"] not in NOT_RECONCILE and \
                (namespace is None or r["namespace"] == namespace):
            key = (r["verb"], r["resource"], r["name"], r["subresource"])
            out[key] = out.get(key, 0) + r["count"]
    return out


def delta(after: dict[Any, int], before: dict[Any, int]) -> dict[Any, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("convergence")


@pytest.fixture(scope="module")
def single(workdir: pathlib.Path) -> Iterator[tuple[StandIn, Operator, list[tuple[str, str]]]]:
    """Stand-in seeded with examples and N Agents, one operator without leader election."""
    standin = StandIn(workdir / "single", crds=REPO / "crds")
    operator = None
    try:
        agents = seed(standin, N_AGENTS)
        kubeconfig = standin.write_kubeconfig(workdir / "single" / "kubeconfig")
        operator = Operator(workdir / "single", kubeconfig, "soma-operator-0", "--no-leader-election")
        yield standin, operator, agents
    finally:
        if operator is not None:
            operator.stop()
        standin.stop()


def test_converges_without_hot_loop(single: tuple[StandIn, Operator, list[tuple[str, str]]]) -> None:
    standin, operator, agents = single
    took = wait_converged(standin, NAMESPACE, N_AGENTS, [operator])
    # Quiet period: nothing changes, so nothing may be written (Lease renewals and Events aside).
    time.sleep(2)  # let the last Deployment-status round settle
    before = standin.stats()
    reconciles_before = operator.reconciles()
    time.sleep(QUIET_SECONDS)
    after = standin.stats()
    quiet_writes = delta(write_counts(after), write_counts(before))
    quiet_changes = delta({(c["resource"], c["namespace"], c["name"]): c["count"] for c in after["changes"]},
                          {(c["resource"], c["namespace"], c["name"]): c["count"] for c in before["changes"]})
    quiet_reconciles = operator.reconciles() - reconciles_before

    total_reconciles = operator.reconciles()
    agent_reconciles = operator.reconciles("agent")
    # The operator's writes: everything in the namespace but the seeding of Agents and the Budget.
    writes = {k: v for k, v in write_counts(after, NAMESPACE).items()
              if not (k[1] in (f"{AGENTS}/agents", f"{AGENTS}/budgets") and k[3] == "")}
    per_agent_writes = sum(writes.values()) / N_AGENTS
    examples = {f"{ns}/{n}": s for ns, n in agents if ns != NAMESPACE
                for s in [agent_state(standin, ns).get(n, "absent")]}
    print(f"\nconverged: {N_AGENTS} generated Agents in {took:.1f}s "
          f"({len(agents)} Agents in all; examples: {examples or 'none'})")
    print(f"reconciles: soma_reconcile_total={total_reconciles:.0f} (controller=agent: {agent_reconciles:.0f}) "
          f"-> {total_reconciles / len(agents):.2f} per Agent")
    print(f"writes by the operator in {NAMESPACE}: {sum(writes.values())} "
          f"-> {per_agent_writes:.2f} per Agent "
          f"(by kind: {summarize(writes)})")
    print(f"quiet {QUIET_SECONDS}s: writes={sum(quiet_writes.values())} changes={sum(quiet_changes.values())} "
          f"reconciles={quiet_reconciles:.0f}")
    assert not quiet_writes, f"writes during the quiet period (hot loop?): {quiet_writes}"
    assert not {k: v for k, v in quiet_changes.items() if k[0] not in NOT_RECONCILE}, \
        f"objects changed during the quiet period: {quiet_changes}"
    assert total_reconciles / len(agents) <= MAX_RECONCILES_PER_AGENT, \
        f"{total_reconciles:.0f} reconciles for {len(agents)} Agents"
    assert per_agent_writes <= MAX_WRITES_PER_AGENT


def summarize(writes: dict[tuple[str, str, str, str], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (verb, res, _name, sub), v in writes.items():
        key = f"{verb} {res.rsplit('/', 1)[-1]}{'/' + sub if sub else ''}"
        out[key] = out.get(key, 0) + v
    return dict(sorted(out.items()))


def test_spec_change_is_rolled_out(single: tuple[StandIn, Operator, list[tuple[str, str]]]) -> None:
    standin, operator, _ = single
    wait_converged(standin, NAMESPACE, N_AGENTS, [operator])
    k = standin.kube
    edited = generated_agent(0, NAMESPACE)
    edited["spec"]["image"] = "registry.example.com/agents/echo@sha256:" + "ab" * 32
    assert k.apply(edited, manager="kubectl")["metadata"]["generation"] == 2
    wait_converged(standin, NAMESPACE, N_AGENTS, [operator], seconds=30)
    dep = k.get("apps/v1", "deployments", NAMESPACE, "gen-00")
    images = [c["image"] for c in dep["spec"]["template"]["spec"]["containers"]]
    assert edited["spec"]["image"] in images


def test_deleted_child_is_restored(single: tuple[StandIn, Operator, list[tuple[str, str]]]) -> None:
    standin, operator, _ = single
    k = standin.kube
    k.delete("v1", "configmaps", NAMESPACE, "gen-01-sidecar")
    k.patch("networking.k8s.io/v1", "networkpolicies", NAMESPACE, "gen-02", {"spec": {"policyTypes": ["Ingress"]}})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cm = k.get_opt("v1", "configmaps", NAMESPACE, "gen-01-sidecar")
        np = k.get("networking.k8s.io/v1", "networkpolicies", NAMESPACE, "gen-02")
        if cm is not None and "Egress" in np["spec"].get("policyTypes", []):
            break
        time.sleep(0.5)
    assert cm is not None, f"deleted child not restored:\n{operator.log_tail()}"
    assert "Egress" in np["spec"].get("policyTypes", []), f"edited child not restored: {np['spec']}"


def test_leader_election_only_the_holder_reconciles(workdir: pathlib.Path) -> None:
    n = 10
    base = workdir / "leader"
    standin = StandIn(base, crds=REPO / "crds")
    operators: list[Operator] = []
    try:
        k = standin.kube
        k.ensure_namespace(NAMESPACE)
        k.apply(budget("team-budget", NAMESPACE), manager="kubectl")
        for i in range(n):
            k.apply(generated_agent(i, NAMESPACE), manager="kubectl")
        kubeconfig = standin.write_kubeconfig(base / "kubeconfig")
        lease_args = ("--lease-namespace", "default", "--lease-seconds", "5")
        operators = [Operator(base, kubeconfig, f"soma-operator-{i}", *lease_args) for i in range(2)]
        wait_converged(standin, NAMESPACE, n, operators, seconds=90)
        time.sleep(3)
        counts = {op.name: op.reconciles() for op in operators}
        holder = k.get("coordination.k8s.io/v1", "leases", "default", "soma-operator")["spec"].get("holderIdentity")
        print(f"\nleader election: holder={holder} reconciles={counts}")
        assert holder in counts, f"Lease holder {holder!r} is not one of {list(counts)}"
        assert [name for name, c in counts.items() if c > 0] == [holder], f"reconciles by replica: {counts}"

        # The holder stops (SIGTERM releases the Lease): the standby takes over and reconciles.
        leader = next(op for op in operators if op.name == holder)
        standby = next(op for op in operators if op.name != holder)
        leader.stop()
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and standby.reconciles() == 0:
            assert standby.proc is not None and standby.proc.poll() is None, standby.log_tail()
            time.sleep(0.5)
        new_holder = k.get("coordination.k8s.io/v1", "leases", "default", "soma-operator")["spec"].get("holderIdentity")
        print(f"after {holder} stopped: holder={new_holder} standby reconciles={standby.reconciles():.0f}")
        assert standby.reconciles() > 0, f"standby never took over:\n{standby.log_tail()}"
        assert new_holder == standby.name
    finally:
        for op in operators:
            if op.proc is not None:
                op.stop()
        standin.stop()
