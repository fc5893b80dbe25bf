"""GitOps health of every status the real operator writes: Argo CD's health checks (the chart's
Lua, in a real Lua 5.1) and kstatus, as Flux reads it.

    every stand-in in this pytest session ──(--status-log: each status a soma.dev/* manager wrote)──┐
    this module's own scenarios (signed and unsigned agent images, a revoked Capsule, a Budget     │
    loop, an invalid time zone, a Deployment losing its ready pods) ────────────────────────────────┤
                                                                                                   ▼
        each captured object ──▶ lua5.1 charts/soma/argocd/<kind>.lua ──▶ Healthy/Progressing/Degraded/Suspended
                             ──▶ kstatus.compute / kstatus.violations ──▶ Current/InProgress/Failed, conventions

The expected health follows from the kstatus conditions (below, `expected`); every combination of
`Ready`/`Reconciling`/`Stalled` (and a Budget's `Exhausted`) a controller writes, with the reasons
listed in REQUIRED, must have been captured. Each capture is also checked as if its spec had
changed since (`metadata.generation` one ahead): Progressing and InProgress. Jobs have no
controller yet: their statuses are CRD-shaped fixtures (the conditions the CRD documents), and so
are a few reasons the stand-in cannot produce (UNIT_ONLY). This module runs last in the session
(conftest.py) so that the other modules' captures are in.

Needs SOMA_OPERATOR_BIN, SOMA_LUA and the signing tools (SOMA_COSIGN, SOMA_ORAS, SOMA_REGISTRY).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import Any, Iterator

import pytest

import argocd
import kstatus
import signing
from harness import REPO, StandIn, free_port, wait_for
from signing import Registry, Workdir, condition
from test_convergence import AGENTS, Operator, budget, pytestmark as needs_operator

pytestmark = [needs_operator]

NS = "gitops"
IMG_NS = "gitops-img"

# (kind, Ready reason, Ready/Reconciling/Stalled as T/F[, "Exhausted"]) the captures must include.
REQUIRED = {
    ("Agent", "Available", "TFF"), ("Agent", "RolloutPending", "FTF"), ("Agent", "Progressing", "FTF"),
    ("Agent", "ImageNotVerified", "FTF"), ("Agent", "ImageNotVerified", "FFT"), ("Agent", "BudgetNotFound", "FFT"),
    ("Agent", "CapsuleNotReady", "FFT"), ("Agent", "PolicyDenied", "FFT"), ("Agent", "BudgetParentNotGranted", "FFT"),
    ("Agent", "BudgetChainInvalid", "FFT"), ("Agent", "ApplyFailed", "FFT"),
    ("Budget", "Active", "TFF"), ("Budget", "Active", "TFF Exhausted"), ("Budget", "NoLedger", "TFF"),
    ("Budget", "ParentNotFound", "FFT"), ("Budget", "ParentNotGranted", "FFT"), ("Budget", "BudgetChainInvalid", "FFT"),
    ("Budget", "InvalidSpec", "FFT"), ("Budget", "LedgerUnavailable", "FTF"),
    ("Capsule", "Verified", "TFF"), ("Capsule", "RegistryUnreachable", "FTF"), ("Capsule", "Unsigned", "FFT"),
    ("Capsule", "WrongKey", "FFT"), ("Capsule", "Revoked", "FFT"),
}
# Reasons a controller writes that the stand-in cannot bring about, checked on a captured status
# of the same kind with its conditions rewritten: (kind, from this capture, Ready reason, states).
UNIT_ONLY = [
    ("Agent", ("Agent", "Available", "TFF"), "ScaledToZero", "TFF"),  # no autoscaler sets 0 replicas yet
    ("Agent", ("Agent", "RolloutPending", "FTF"), "DeploymentPending", "FTF"),  # between apply and read
    ("Agent", ("Agent", "RolloutPending", "FTF"), "PolicyError", "FTF"),  # a decision past its deadline
    ("Capsule", ("Capsule", "RegistryUnreachable", "FTF"), "PolicyError", "FTF"),
]
HEALTH = {"TFF": "Healthy", "FTF": "Progressing", "FFT": "Degraded", "TFF Exhausted": "Suspended",
          # An exhausted Budget whose ledger cannot be read (or whose spec broke) is that first.
          "FTF Exhausted": "Progressing", "FFT Exhausted": "Degraded"}
KSTATUS = {"Healthy": kstatus.CURRENT, "Suspended": kstatus.CURRENT, "Progressing": kstatus.IN_PROGRESS,
           "Degraded": kstatus.FAILED}


def state(obj: dict[str, Any]) -> str:
    s = "".join("T" if kstatus.is_true(obj, t) else "F" for t in ("Ready", "Reconciling", "Stalled"))
    if obj["kind"] == "Budget" and kstatus.is_true(obj, "Exhausted"):
        s += " Exhausted"
    return s


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], (kstatus.conditions(obj).get("Ready") or {}).get("reason", ""), state(obj)


def expected(obj: dict[str, Any]) -> str:
    """Argo CD health from the conditions: what the Lua must answer."""
    return HEALTH.get(state(obj), "Degraded")


def rewritten(obj: dict[str, Any], reason: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    for c in out["status"]["conditions"]:
        if c["type"] in ("Ready", "Reconciling", "Stalled"):
            c["reason"] = reason
    return out


def job(name: str, conditions: list[tuple[str, str, str]], generation: int = 1, observed: int | None = 1,
        suspend: bool = False) -> dict[str, Any]:
    """A Job status shaped by the CRD: conditions (type, status, reason) with messages."""
    obj: dict[str, Any] = {"apiVersion": AGENTS, "kind": "Job",
                           "metadata": {"name": name, "namespace": NS, "generation": generation},
                           "spec": {"agentRef": {"name": "bot"}, "deadlineSeconds": 600, **({"suspend": True} if suspend else {})}}
    if observed is not None:
        obj["status"] = {"observedGeneration": observed, "attempts": 1, "conditions": [
            {"type": t, "status": s, "reason": r, "message": f"{t} is {s}: {r}", "observedGeneration": observed,
             "lastTransitionTime": "2026-12-01T10:00:00Z"} for t, s, r in conditions]}
    return obj


# name, object, Argo CD health, kstatus
JOBS = [
    ("pending", job("pending", [], observed=None), "Progressing", kstatus.CURRENT),
    ("running", job("running", [("Ready", "False", "Running"), ("Reconciling", "True", "Running"),
                                ("Stalled", "False", "Running"), ("Complete", "False", "Running"),
                                ("Failed", "False", "Running")]), "Progressing", kstatus.IN_PROGRESS),
    ("complete", job("complete", [("Ready", "True", "Succeeded"), ("Reconciling", "False", "Succeeded"),
                                  ("Stalled", "False", "Succeeded"), ("Complete", "True", "Succeeded"),
                                  ("Failed", "False", "Succeeded")]), "Healthy", kstatus.CURRENT),
    ("failed", job("failed", [("Ready", "False", "BackoffLimitExceeded"), ("Reconciling", "False", "BackoffLimitExceeded"),
                              ("Stalled", "True", "BackoffLimitExceeded"), ("Complete", "False", "BackoffLimitExceeded"),
                              ("Failed", "True", "BackoffLimitExceeded")]), "Degraded", kstatus.FAILED),
    ("deadline", job("deadline", [("Ready", "False", "DeadlineExceeded"), ("Reconciling", "False", "DeadlineExceeded"),
                                  ("Stalled", "True", "DeadlineExceeded"), ("Complete", "False", "DeadlineExceeded"),
                                  ("Failed", "True", "DeadlineExceeded")]), "Degraded", kstatus.FAILED),
    ("agent-missing", job("agent-missing", [("Ready", "False", "AgentNotFound"), ("Reconciling", "False", "AgentNotFound"),
                                            ("Stalled", "True", "AgentNotFound")]), "Degraded", kstatus.FAILED),
    ("queued", job("queued", [("Ready", "False", "Suspended"), ("Reconciling", "True", "Suspended"),
                              ("Stalled", "False", "Suspended")], suspend=True), "Suspended", kstatus.IN_PROGRESS),
    ("stale", job("stale", [("Ready", "False", "Running"), ("Reconciling", "True", "Running"),
                            ("Stalled", "False", "Running")], generation=2, observed=1), "Progressing", kstatus.IN_PROGRESS),
]


def agent(name: str, ns: str, image: str, budget_name: str = "team") -> dict[str, Any]:
    return {"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": name, "namespace": ns},
            "spec": {"image": image, "model": {"provider": "openai", "name": "gpt-4o-mini"},
                     "budgetRef": {"name": budget_name}}}


def ready_reason(k: Any, plural: str, ns: str, name: str) -> tuple[str, str] | None:
    obj = k.get_opt(AGENTS, plural, ns, name)
    c = condition(obj, "Ready") if obj else None
    return (c["status"], c["reason"]) if c else None


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Statuses no other module brings about, captured by this module's stand-in."""
    tools = signing.tools()
    assert tools is not None, "SOMA_COSIGN, SOMA_ORAS and SOMA_REGISTRY must be set (scripts/test-deps/signing-tools.sh)"
    work = tmp_path_factory.mktemp("gitops")
    dead = f"127.0.0.1:{free_port()}"
    standin = StandIn(work, crds=REPO / "crds")
    registry = operator = None
    try:
        registry = Registry(tools, work / "registry")
        w = Workdir(tools, work / "cosign")
        pem = w.key_pair("images")
        (work / "images.pub").write_text(pem)
        signed = w.push(registry.addr, "agents/signed", "v1", b'{"layer": "signed"}')
        w.sign("images", registry.addr, "agents/signed", signed)
        unsigned = w.push(registry.addr, "agents/unsigned", "v1", b'{"layer": "unsigned"}')
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-gitops",
                            "--no-leader-election", "--require-signed-images",
                            "--image-signature-keys", str(work / "images.pub"),
                            "--insecure-registries", f"{registry.addr},{dead}")
        k = standin.kube
        for ns in (NS, IMG_NS):
            k.ensure_namespace(ns)
        k.apply(budget("team", NS), manager="kubectl")
        k.apply(budget("team", IMG_NS), manager="kubectl")
        # Budgets: a loop, an unknown time zone.
        loop_a = budget("loop-a", NS)
        loop_a["spec"]["parentRef"] = {"name": "loop-b"}
        loop_b = budget("loop-b", NS)
        loop_b["spec"]["parentRef"] = {"name": "loop-a"}
        k.apply(loop_a, manager="kubectl")
        k.apply(loop_b, manager="kubectl")
        mars = budget("mars", NS)
        mars["spec"]["period"] = {"calendar": "day", "timeZone": "Mars/Olympus_Mons"}
        k.apply(mars, manager="kubectl")
        k.apply(agent("looped", NS, f"{registry.addr}/agents/signed@{signed}", "loop-a"), manager="kubectl")
        # Agent images: signed, unsigned, in a registry that does not answer.
        k.apply(agent("signed", IMG_NS, f"{registry.addr}/agents/signed@{signed}"), manager="kubectl")
        k.apply(agent("unsigned", IMG_NS, f"{registry.addr}/agents/unsigned@{unsigned}"), manager="kubectl")
        k.apply(agent("unreachable", IMG_NS, f"{dead}/agents/gone@sha256:" + "cd" * 32), manager="kubectl")
        # A revoked Capsule.
        k.apply({"apiVersion": AGENTS, "kind": "Capsule", "metadata": {"name": "withdrawn", "namespace": NS},
                 "spec": {"version": "1", "policyHash": "sha256:" + "9b" * 32, "revoked": True,
                          "source": {"inline": {"blocks": [{"id": "advice-1", "text": "old advice"}]}},
                          "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}}}, manager="kubectl")
        waits = [("agents", NS, "looped", ("False", "BudgetChainInvalid")),
                 ("budgets", NS, "loop-a", ("False", "BudgetChainInvalid")),
                 ("budgets", NS, "mars", ("False", "InvalidSpec")),
                 ("agents", IMG_NS, "signed", ("True", "Available")),
                 ("agents", IMG_NS, "unsigned", ("False", "ImageNotVerified")),
                 ("agents", IMG_NS, "unreachable", ("False", "ImageNotVerified")),
                 ("capsules", NS, "withdrawn", ("False", "Revoked"))]
        for plural, ns, name, want in waits:
            wait_for(f"{plural} {ns}/{name} {want} (operator: {operator.log_tail(3)})",
                     lambda: ready_reason(k, plural, ns, name) == want, seconds=60)
        # The Deployment loses its ready pods (a node went away): the Agent is Progressing.
        d = k.get("apps/v1", "deployments", IMG_NS, "signed")
        k.patch("apps/v1", "deployments", IMG_NS, "signed", {"status": {
            "observedGeneration": d["metadata"]["generation"], "replicas": 1, "updatedReplicas": 1,
            "readyReplicas": 0, "availableReplicas": 0}}, sub="status")
        wait_for("Agent signed Progressing", lambda: ready_reason(k, "agents", IMG_NS, "signed") == ("False", "Progressing"),
                 seconds=60)
        yield
    finally:
        if operator is not None:
            operator.stop()
        if registry is not None:
            registry.stop()
        standin.stop()


def captured() -> list[dict[str, Any]]:
    folder = os.environ.get("SOMA_STATUS_LOG_DIR")
    assert folder, "SOMA_STATUS_LOG_DIR is not set (e2e/apiserver/conftest.py sets it for the session)"
    objects = []
    for path in sorted(pathlib.Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                objects.append(json.loads(line)["object"])
    return objects


def test_every_status_the_operator_writes_reads_right_in_argo_cd_and_flux(scenarios: None) -> None:
    objects = captured()
    by_key: dict[tuple[str, str, str], dict[str, Any]] = {}
    for obj in objects:
        by_key.setdefault(key(obj), obj)
    missing = REQUIRED - set(by_key)
    assert not missing, (f"combinations no test brought about (run the whole e2e/apiserver suite): {sorted(missing)}; "
                         f"captured: {sorted(by_key)}")
    cases: list[tuple[str, dict[str, Any], str, str]] = []
    for obj in objects:
        want = expected(obj)
        cases.append((f"{key(obj)} {obj['metadata']['namespace']}/{obj['metadata']['name']}", obj, want, KSTATUS[want]))
        stale = copy.deepcopy(obj)
        stale["metadata"]["generation"] = obj["metadata"]["generation"] + 1
        cases.append((f"{key(obj)} one generation ahead", stale, "Progressing", kstatus.IN_PROGRESS))
    for kind, source, reason, states in UNIT_ONLY:
        obj = rewritten(by_key[source], reason)
        assert state(obj) == states
        cases.append((f"{kind} {reason} (rewritten from {source})", obj, HEALTH[states], KSTATUS[HEALTH[states]]))
    for name, obj, health, kst in JOBS:
        cases.append((f"Job {name} (CRD-shaped)", obj, health, kst))

    failures = []
    for kind in ("Agent", "Budget", "Capsule", "Job"):
        mine = [c for c in cases if c[1]["kind"] == kind]
        results = argocd.health(kind, [c[1] for c in mine])
        for (what, obj, want, want_k), (got, message) in zip(mine, results):
            if got != want:
                failures.append(f"Argo CD: {what}: {got} ({message}), want {want}")
            elif got != "Healthy" and not message:
                failures.append(f"Argo CD: {what}: {got} without a message")
            if kstatus.compute(obj) != want_k:
                failures.append(f"kstatus: {what}: {kstatus.compute(obj)}, want {want_k}")
    for what, obj, _, _ in cases:
        if obj.get("status") and obj["metadata"].get("generation") == obj["status"].get("observedGeneration"):
            for v in kstatus.violations(obj):
                failures.append(f"kstatus conventions: {what}: {v}")
    assert not failures, "\n".join(failures[:60]) + (f"\n... {len(failures) - 60} more" if len(failures) > 60 else "")
    print(f"{len(cases)} statuses checked ({len(objects)} captured from the operator, "
          f"{len(by_key)} distinct kind/reason/condition combinations)")
