"""Runs Soma locally when no cluster is reachable: the operator against the Kubernetes API
stand-in (e2e/apiserver), with the CRDs and examples applied, then prints what it made.

    python scripts/local_up.py --operator PATH [--once] [--timeout SECONDS]

Everything listens on 127.0.0.1; the stand-in and the operator are stopped by PID on exit.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "e2e" / "apiserver"))

from harness import StandIn, free_port, load_manifests, stop_process  # noqa: E402

AGENTS = "soma.dev/v1alpha1"
CHILDREN = [
    ("v1", "serviceaccounts", "ServiceAccount", ""),
    ("v1", "configmaps", "ConfigMap", "-sidecar"),
    ("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", ""),
    ("apps/v1", "deployments", "Deployment", ""),
    ("v1", "services", "Service", ""),
]


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in obj.get("status", {}).get("conditions", []):
        if c.get("type") == type_:
            return c
    return {}


def settled(agent: dict[str, Any]) -> bool:
    """Status is current and says Ready, or says why it cannot be (Stalled)."""
    current = agent.get("status", {}).get("observedGeneration") == agent["metadata"].get("generation")
    return current and "True" in (condition(agent, "Ready").get("status"), condition(agent, "Stalled").get("status"))


def report(standin: StandIn) -> None:
    agents = standin.kube.list(AGENTS, "agents")["items"]
    print(f"\n{'AGENT':<30} {'READY':<6} {'REASON':<18} {'REPLICAS':<9} CHILDREN")
    for a in agents:
        ns, name = a["metadata"]["namespace"], a["metadata"]["name"]
        ready = condition(a, "Ready")
        kids = [kind for api, plural, kind, suffix in CHILDREN
                if standin.kube.get_opt(api, plural, ns, name + suffix)]
        print(f"{ns + '/' + name:<30} {ready.get('status', '?'):<6} {ready.get('reason', '?'):<18} "
              f"{a.get('status', {}).get('replicaSummary', '-'):<9} {', '.join(kids) or '(none)'}")
        if ready.get("status") != "True":
            print(f"{'':<30} {ready.get('message', '')}")
    for plural in ("budgets", "capsules"):
        items = standin.kube.list(AGENTS, plural)["items"]
        names = ", ".join(f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in items)
        print(f"{plural:<12} {names or '(none)'}")
    jobs = standin.kube.list(AGENTS, "jobs")["items"]
    if jobs:
        print(f"\n{'JOB':<38} {'PHASE':<10} REASON")
    for j in jobs:
        ready = condition(j, "Ready")
        print(f"{j['metadata']['namespace'] + '/' + j['metadata']['name']:<38} "
              f"{(j.get('status') or {}).get('phase', '?'):<10} {ready.get('reason', '?')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--operator", required=True, help="path to the soma-operator binary")
    parser.add_argument("--once", action="store_true", help="exit after printing the converged state")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="soma-up-"))
    standin = StandIn(work / "apiserver", crds=REPO / "crds")
    operator = None
    try:
        kubeconfig = standin.write_kubeconfig(work / "kubeconfig")
        print(f"API stand-in on {standin.url} (kubeconfig {kubeconfig})")
        for path in sorted((REPO / "examples").glob("*.yaml")):
            for doc in load_manifests(path):
                standin.kube.apply_manifest(doc)
                print(f"applied {doc['kind']} {doc['metadata'].get('namespace')}/{doc['metadata']['name']}")
        metrics = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "SOMA_LOG_FORMAT": "text",
               "RUST_LOG": os.environ.get("RUST_LOG", "info,kube=warn")}
        log = open(work / "operator.log", "wb")
        operator = subprocess.Popen([args.operator, "run", "--no-leader-election", "--metrics-addr", metrics],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"soma-operator running (pid {operator.pid}, metrics http://{metrics}/metrics, log {work / 'operator.log'})")
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if operator.poll() is not None:
                print((work / "operator.log").read_text()[-4000:])
                print("soma-operator exited early")
                return 1
            agents = standin.kube.list(AGENTS, "agents")["items"]
            if agents and all(settled(a) for a in agents):
                break
            time.sleep(0.5)
        else:
            print(f"not every Agent reported status within {args.timeout:.0f}s")
            report(standin)
            return 1
        report(standin)
        if args.once:
            return 0
        print("\nrunning; edit objects through the stand-in with kubectl --kubeconfig "
              f"{kubeconfig} ... (Ctrl-C stops)")
        while operator.poll() is None:
            time.sleep(1)
        return operator.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(operator)
        standin.stop()


if __name__ == "__main__":
    sys.exit(main())
