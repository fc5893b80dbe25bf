"""Runs Soma locally when no cluster is reachable: the operator against the Kubernetes API
stand-in (e2e/apiserver), with the CRDs and examples applied, then prints what it made.

    python scripts/local_up.py --operator PATH --cli PATH [--once] [--timeout SECONDS]

The example Capsule is published for real first: a local docker-registry, a fresh cosign key
pair (its public key in the `capsule-signers` ConfigMap), `soma capsule pack` of
examples/capsules/support-kb, `soma capsule push`, `cosign sign`; the Capsule is applied with
the pushed digest, so the operator verifies a real signature and the example Agent starts with
the Capsule mounted. Needs SOMA_COSIGN, SOMA_ORAS and SOMA_REGISTRY
(scripts/test-deps/signing-tools.sh).

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
import signing  # noqa: E402

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
        deployment = standin.kube.get_opt("apps/v1", "deployments", ns, name)
        pod = ((deployment or {}).get("spec") or {}).get("template", {}).get("spec", {})
        fetched = {c["name"]: c["args"][c["args"].index("--digest") + 1]
                   for c in pod.get("initContainers", []) if "--digest" in c.get("args", [])}
        for c in pod.get("containers", []):
            for m in c.get("volumeMounts", []):
                if m["name"] in fetched:
                    print(f"{'':<30} {m['mountPath']} (read-only: {m.get('readOnly', False)}) "
                          f"= {fetched[m['name']][:19]}…")
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


def publish_capsule(cli: str, work: pathlib.Path, registry: signing.Registry, capsule: dict[str, Any],
                    tools: signing.Tools) -> tuple[dict[str, Any], dict[str, Any]]:
    """Packs, pushes and signs the example Capsule's documents; returns the Capsule pointing at
    the signed digest and the `capsule-signers` ConfigMap holding the public key."""
    name, ns = capsule["metadata"]["name"], capsule["metadata"]["namespace"]
    spec = capsule["spec"]
    keys = signing.Workdir(tools, work / "cosign")
    pem = keys.key_pair("capsule-signers")
    layout = work / f"{name}.oci"
    repo = f"capsules/{name}"
    target = f"{registry.addr}/{repo}:{spec['version']}"

    def soma(*args: str) -> str:
        out = subprocess.run([cli, "capsule", *args], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"soma capsule {args[0]} failed: {out.stderr}")
        return out.stdout.strip()

    soma("pack", str(REPO / "examples" / "capsules" / name), "--out", str(layout),
         "--version", spec["version"], "--policy-hash", spec["policyHash"])
    digest = soma("push", str(layout), target, "--insecure-registry", registry.addr).rsplit("@", 1)[1]
    keys.sign("capsule-signers", registry.addr, repo, digest)
    print(f"published Capsule {ns}/{name}: {registry.addr}/{repo}@{digest}, signed by a new key")
    published = {**capsule, "spec": {**spec, "source": {"oci": {"repository": f"{registry.addr}/{repo}",
                                                                  "digest": digest}}}}
    signers = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": spec["signature"]["publicKeyRef"]["name"], "namespace": ns},
               "data": {spec["signature"]["publicKeyRef"]["key"]: pem}}
    return published, signers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--operator", required=True, help="path to the soma-operator binary")
    parser.add_argument("--cli", required=True, help="path to the soma binary (packs the example Capsule)")
    parser.add_argument("--once", action="store_true", help="exit after printing the converged state")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    tools = signing.tools()
    if tools is None:
        print("SOMA_COSIGN, SOMA_ORAS and SOMA_REGISTRY must name executables "
              "(export what scripts/test-deps/signing-tools.sh prints)")
        return 2
    work = pathlib.Path(tempfile.mkdtemp(prefix="soma-up-"))
    standin = StandIn(work / "apiserver", crds=REPO / "crds")
    registry = signing.Registry(tools, work / "registry")
    operator = None
    try:
        kubeconfig = standin.write_kubeconfig(work / "kubeconfig")
        print(f"API stand-in on {standin.url} (kubeconfig {kubeconfig})")
        for path in sorted((REPO / "examples").glob("*.yaml")):
            for doc in load_manifests(path):
                if doc["kind"] == "Capsule" and doc.get("spec", {}).get("source", {}).get("oci"):
                    doc, signers = publish_capsule(args.cli, work, registry, doc, tools)
                    standin.kube.ensure_namespace(signers["metadata"]["namespace"])
                    standin.kube.apply_manifest(signers)
                standin.kube.apply_manifest(doc)
                print(f"applied {doc['kind']} {doc['metadata'].get('namespace')}/{doc['metadata']['name']}")
        metrics = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "SOMA_LOG_FORMAT": "text",
               "RUST_LOG": os.environ.get("RUST_LOG", "info,kube=warn")}
        log = open(work / "operator.log", "wb")
        operator = subprocess.Popen([args.operator, "run", "--no-leader-election", "--metrics-addr", metrics,
                                     "--insecure-registries", registry.addr],
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
        registry.stop()


if __name__ == "__main__":
    sys.exit(main())
