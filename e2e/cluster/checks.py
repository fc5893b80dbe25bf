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
    """Invariant 6 (PRODUCT.md) on the pod template of an Agent's Deployment or a Job's
    batch/v1 Job (the same builder makes both)."""
    dep, problems = one(doc, "Deployment or batch/v1 Job")
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


def controlled_by(doc, uid, kind="Agent"):
    """Every listed object's controller ownerReference is the `kind` (Agent, Job) with this uid."""
    problems = []
    for o in items(doc):
        refs = [r for r in o["metadata"].get("ownerReferences") or [] if r.get("controller")]
        if not (refs and refs[0].get("uid") == uid and refs[0].get("kind") == kind):
            problems.append(f"{o.get('kind', '?')}/{o['metadata']['name']} is not controlled by the {kind}")
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


def job_waits(doc, reason):
    """A Job that has not started (Pending or Waiting) for `reason`, with a message."""
    status = doc.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    problems = []
    if status.get("phase") not in ("Pending", "Waiting"):
        problems.append(f"phase is {status.get('phase')!r}, not Pending or Waiting")
    if ready.get("reason") != reason or ready.get("status") != "False":
        problems.append(f"Ready is {ready.get('status')!r}/{ready.get('reason')!r}, want False/{reason}")
    if not ready.get("message"):
        problems.append("Ready has no message saying what to do")
    if status.get("observedGeneration") != doc["metadata"].get("generation"):
        problems.append("status.observedGeneration is not metadata.generation")
    return problems


def drill_state(doc):
    """A drill that cannot start here says why (the operator's NATS, ledger, or the scratch
    Secret); one that ran reports its figures."""
    status = doc.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    phase = status.get("phase")
    if phase == "Pending":
        if ready.get("reason") not in ("NoStream", "NoLedger", "SecretNotFound", "SecretKeyNotFound"):
            return [f"Pending for {ready.get('reason')!r}: {ready.get('message')}"]
        return [] if ready.get("message") else ["Pending without a message"]
    if phase in ("Succeeded", "Failed"):
        drill = status.get("drill") or {}
        problems = [] if {"outcome", "rpoSeconds", "rtoSeconds"} <= drill.keys() else [f"no drill figures: {drill}"]
        if phase == "Succeeded" and drill.get("outcome") != "Passed":
            problems.append(f"Succeeded, but the drill says {drill.get('outcome')!r}")
        return problems
    return [] if phase == "Running" else [f"unexpected phase {phase!r}"]


def job_failed(doc, reason):
    """A Job that finished Failed for `reason` (Failed=True, Ready=False)."""
    status = doc.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    problems = []
    if status.get("phase") != "Failed":
        problems.append(f"phase is {status.get('phase')!r}, not Failed")
    failed = conds.get("Failed") or {}
    if failed.get("status") != "True" or failed.get("reason") != reason:
        problems.append(f"Failed is {failed.get('status')!r}/{failed.get('reason')!r}, want True/{reason}")
    return problems


def vault_login_sidecar_only(doc):
    """The Vault login material (the projected token, or the AppRole Secret) is a volume of the
    pod that the metering sidecar alone mounts; the pod itself mounts no service-account token."""
    dep, problems = one(doc, "Deployment")
    if dep is None:
        return problems
    pod = dep["spec"]["template"]["spec"]
    login = {v["name"] for v in pod.get("volumes") or [] if v["name"] in ("vault-token", "vault-approle")}
    if not login:
        problems.append("no vault-token or vault-approle volume")
    for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        mounted = {m["name"] for m in c.get("volumeMounts") or []} & login
        if c["name"] == "soma-proxy" and mounted != login:
            problems.append(f"soma-proxy mounts {sorted(mounted)}, not {sorted(login)}")
        if c["name"] != "soma-proxy" and mounted:
            problems.append(f"{c['name']} mounts the Vault login {sorted(mounted)}")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("pod: automountServiceAccountToken is not false")
    return problems


def readyz(doc, reason=""):
    """A sidecar's /readyz answer: ready without a problem (no REASON), or not ready for REASON."""
    problem = (doc.get("problem") or {}).get("reason")
    if not reason:
        return [] if doc.get("ready") is True and problem is None else [f"not ready: {doc}"]
    return [] if doc.get("ready") is False and problem == reason else [f"want not ready for {reason}: {doc}"]


def recall_hit(doc, capsule, digest, chunk):
    """A recall answer whose best hit is CHUNK of CAPSULE at DIGEST, with the whole
    provenance (capsule, version, digest, chunk, document, offsets) and a score on every hit."""
    data = doc.get("data")
    if not isinstance(data, list) or not data:
        return [f"no hits: {doc}"]
    problems = []
    for i, hit in enumerate(data):
        missing = [k for k in ("score", "text", "capsule", "version", "digest", "chunk", "document",
                               "start", "end") if k not in hit]
        if missing:
            problems.append(f"hit {i} lacks {missing}: {hit}")
        elif hit["capsule"] == capsule and hit["digest"] != digest:
            problems.append(f"hit {i} is of digest {hit['digest']}, not {digest}")
    best = data[0]
    if (best.get("capsule"), best.get("digest"), best.get("chunk")) != (capsule, digest, chunk):
        problems.append(f"best hit is {best.get('capsule')}/{best.get('chunk')} at {best.get('digest')}, "
                        f"want {capsule}/{chunk} at {digest}")
    return problems


def recall_refused(doc, status, code):
    """A refused recall as run.sh records it: {"status": HTTP status, "body": the error body}."""
    got = (doc.get("status"), ((doc.get("body") or {}).get("error") or {}).get("code"))
    return [] if got == (int(status), code) else [f"want {status} {code}, got {got}: {doc}"]


def qdrant_loaded(doc, collection):
    """A Capsule whose status names its loaded Qdrant collection COLLECTION for its verified
    digest, with QdrantLoaded=True."""
    capsule, problems = one(doc, "Capsule")
    if capsule is None:
        return problems
    status = capsule.get("status") or {}
    q = status.get("qdrant") or {}
    if q.get("collection") != collection:
        problems.append(f"status.qdrant.collection is {q.get('collection')!r}, want {collection!r}")
    if not q.get("digest") or q.get("digest") != status.get("verifiedDigest"):
        problems.append(f"status.qdrant.digest {q.get('digest')!r} is not the verified {status.get('verifiedDigest')!r}")
    if not isinstance(q.get("points"), int) or q["points"] < 1:
        problems.append(f"status.qdrant.points is {q.get('points')!r}")
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "QdrantLoaded"), {})
    if cond.get("status") != "True":
        problems.append(f"QdrantLoaded is {cond}")
    return problems


CHECKS = {"sandboxed": sandboxed, "egress-restricted": egress_restricted,
          "controlled-by": controlled_by, "without-budget": without_budget, "job-waits": job_waits,
          "drill-state": drill_state, "job-failed": job_failed,
          "vault-login-sidecar-only": vault_login_sidecar_only, "readyz": readyz,
          "recall-hit": recall_hit, "recall-refused": recall_refused, "qdrant-loaded": qdrant_loaded}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: ... | {sys.argv[0]} {{{'|'.join(CHECKS)}}} [ARG...]")
    found = CHECKS[sys.argv[1]](json.load(sys.stdin), *sys.argv[2:])
    if found:
        print("\n".join(found), file=sys.stderr)
        sys.exit(1)
