#!/usr/bin/env python3
"""JSON checks for e2e/cluster/run.sh: read `kubectl get -o json` output on stdin.

Usage: kubectl get ... -o json | checks.py CHECK [ARG...]
Exits 0 when the check holds, else prints every problem found and exits 1.
Only the standard library, so the suite runs wherever python3 does.
"""
import json
import sys


def items(doc):
    return doc["items"] if "items" in doc else [doc]


def one(doc, what):
    found = items(doc)
    if len(found) != 1:
        return None, [f"expected one {what}, found {len(found)}"]
    return found[0], []


def sandboxed(doc):
    """Invariant 6 (PRODUCT.md) on a Deployment's pod template."""
    dep, problems = one(doc, "Deployment")
    if dep is None:
        return problems
    pod = dep["spec"]["template"]["spec"]
    psc = pod.get("securityContext") or {}
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("pod: automountServiceAccountToken is not false")
    init = pod.get("initContainers") or []
    running = (pod.get("containers") or []) + [c for c in init if c.get("restartPolicy") == "Always"]
    if len(running) < 2:
        problems.append(f"pod: {len(running)} container(s); want the agent and the metering sidecar")
    for c in (pod.get("containers") or []) + init:
        sc = c.get("securityContext") or {}
        name = c["name"]

        def effective(key):
            return sc.get(key, psc.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile is not RuntimeDefault")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if not (c.get("resources") or {}).get("limits"):
            problems.append(f"{name}: no resource limits")
    return problems


def egress_restricted(doc):
    """The agent's NetworkPolicy selects its pods and makes egress default-deny."""
    np, problems = one(doc, "NetworkPolicy")
    if np is None:
        return problems
    spec = np["spec"]
    types = spec.get("policyTypes") or []
    if "Egress" not in types:
        problems.append(f"policyTypes {types} lacks Egress: egress is not default-deny")
    selector = spec.get("podSelector") or {}
    if not (selector.get("matchLabels") or selector.get("matchExpressions")):
        problems.append("podSelector is empty: it selects every pod in the namespace")
    return problems


def controlled_by(doc, uid):
    """Every listed object's controller ownerReference is the Agent with this uid."""
    problems = []
    for o in items(doc):
        refs = [r for r in o["metadata"].get("ownerReferences") or [] if r.get("controller")]
        if not (refs and refs[0].get("uid") == uid and refs[0].get("kind") == "Agent"):
            problems.append(f"{o.get('kind', '?')}/{o['metadata']['name']} is not controlled by the Agent")
    if not items(doc):
        problems.append("no children found")
    return problems


def without_budget(doc, name, budget="e2e-missing-budget"):
    """Print a copy of an Agent named NAME whose budgetRef names a Budget that does not exist."""
    spec = dict(doc["spec"])
    spec["budgetRef"] = {"name": budget}
    print(json.dumps({"apiVersion": doc["apiVersion"], "kind": "Agent",
                      "metadata": {"name": name, "namespace": doc["metadata"]["namespace"]},
                      "spec": spec}))
    return []


CHECKS = {"sandboxed": sandboxed, "egress-restricted": egress_restricted,
          "controlled-by": controlled_by, "without-budget": without_budget}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: ... | {sys.argv[0]} {{{'|'.join(CHECKS)}}} [ARG...]")
    found = CHECKS[sys.argv[1]](json.load(sys.stdin), *sys.argv[2:])
    if found:
        print("\n".join(found), file=sys.stderr)
        sys.exit(1)
