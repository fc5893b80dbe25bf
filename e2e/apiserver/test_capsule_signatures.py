"""Capsule signatures end to end: the real operator binary verifies what the real cosign CLI
signed, in a real docker-registry, and rejects the rest with the reason.

    cosign generate-key-pair / sign --key / sign-blob ──▶ docker-registry (127.0.0.1, plain HTTP)
    pytest ──▶ soma_apiserver.py ◀── soma-operator run --insecure-registries 127.0.0.1:PORT
               Capsules, key ConfigMaps,        verifies spec.source.oci in the registry and
               content ConfigMaps, Agents       spec.source.configMapRef's `<key>.sig`

Checks: a signed OCI Capsule is Ready with the verified digest, the signer's key fingerprint and
the time, and an Agent using it starts; a wrong key, an unsigned digest, a signature replayed
from another artifact, a re-pushed (tampered) tag and a missing artifact are Ready=False with
the reason and a message, and a Warning Event; a Capsule applied before its artifact was signed
becomes Ready once it is; a ConfigMap Capsule is Ready, becomes Ready=False when its `.sig` is
swapped for another blob's or corrupted, or its content is tampered with, and Ready again when
restored, with the Agent that uses it following it; revoking a Capsule an Agent runs with
writes the revocation into the running pods' sidecar ConfigMap (no ledger) without rolling
them, the Agent saying so, and lifting it takes it out again.

Needs SOMA_OPERATOR_BIN and SOMA_COSIGN/SOMA_ORAS/SOMA_REGISTRY
(`bash scripts/test-deps/signing-tools.sh` prints them); skipped plainly without.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import pathlib
import time
from typing import Any, Iterator

import pytest

import signing
from harness import REPO, StandIn, wait_for
from signing import Registry, Workdir, condition, sha256
from test_convergence import AGENTS, Operator, budget, pytestmark as needs_operator

TOOLS = signing.tools()
pytestmark = [needs_operator, pytest.mark.skipif(
    TOOLS is None, reason="SOMA_COSIGN, SOMA_ORAS and SOMA_REGISTRY are not set to executables "
                          "(export what `bash scripts/test-deps/signing-tools.sh` prints)")]

NS = "sig"
REPO_KB = "capsules/kb"
POLICY_HASH = "sha256:" + "9b" * 32
IMAGE = "registry.example.com/agents/echo@sha256:" + "ab" * 32
RECHECK_SECONDS = 1  # how soon a rejected OCI Capsule is looked up in the registry again




def key_fingerprint(pem: str) -> str:
    """`key:sha256:<hex>` of the DER SubjectPublicKeyInfo, as the operator records the signer."""
    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    return "key:sha256:" + hashlib.sha256(base64.b64decode(body)).hexdigest()


class Env:
    def __init__(self, standin: StandIn, operator: Operator, registry: Registry, work: Workdir, pem: str):
        self.standin = standin
        self.kube = standin.kube
        self.operator = operator
        self.registry = registry
        self.work = work
        self.pem = pem

    def capsule(self, name: str, source: dict[str, Any], keys: str = "signers") -> dict[str, Any]:
        return self.kube.apply({
            "apiVersion": AGENTS, "kind": "Capsule", "metadata": {"name": name, "namespace": NS},
            "spec": {"version": "1", "policyHash": POLICY_HASH, "source": source,
                     "signature": {"publicKeyRef": {"name": keys, "key": "cosign.pub"}}}}, manager="kubectl")

    def push(self, tag: str, content: str, policy_hash: str = POLICY_HASH) -> str:
        """Pushes `content` as a Capsule bundle under `tag`; returns its digest."""
        return self.work.push_capsule(self.registry.addr, REPO_KB, tag, content, policy_hash)

    def oci(self, digest: str) -> dict[str, Any]:
        return {"oci": {"repository": f"{self.registry.addr}/{REPO_KB}", "digest": digest}}

    def get(self, name: str) -> dict[str, Any]:
        return self.kube.get(AGENTS, "capsules", NS, name)

    def set_revoked(self, name: str, revoked: bool) -> None:
        """Revokes the Capsule (or lifts its revocation) as its owner would, with kubectl."""
        spec = self.get(name)["spec"]
        spec["revoked"] = revoked
        self.kube.apply({"apiVersion": AGENTS, "kind": "Capsule", "metadata": {"name": name, "namespace": NS},
                         "spec": spec}, manager="kubectl")

    def sidecar_settings(self, config_map: str) -> dict[str, Any]:
        """The sidecar settings the ConfigMap `config_map` carries."""
        return json.loads(self.kube.get("v1", "configmaps", NS, config_map)["data"]["config.yaml"])

    def ready(self, name: str, status: str) -> dict[str, Any]:
        """Waits for the Capsule's Ready condition to have `status`; returns the Capsule."""
        def probe() -> dict[str, Any] | None:
            c = self.get(name)
            r = condition(c, "Ready")
            return c if r and r["status"] == status else None
        return wait_for(f"Capsule {name} Ready={status}", probe)

    def rejected(self, name: str, reason: str) -> dict[str, Any]:
        """Waits for Ready=False with `reason`; checks the rest of a rejection; returns Ready."""
        def probe() -> dict[str, Any] | None:
            r = condition(self.get(name), "Ready")
            return r if r and r["status"] == "False" and r["reason"] == reason else None
        ready = wait_for(f"Capsule {name} Ready=False {reason} (log: {self.operator.log_tail(5)})", probe)
        capsule = self.get(name)
        assert ready["message"], ready
        assert (condition(capsule, "Stalled") or {}).get("status") == "True", capsule["status"]
        for claim in ("verifiedDigest", "signer", "verifiedAt"):
            assert claim not in capsule["status"], capsule["status"]
        assert capsule["status"]["observedGeneration"] == capsule["metadata"]["generation"]
        return ready

    def event(self, name: str, reason: str) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            items = self.kube.list("events.k8s.io/v1", "events", NS)["items"]
            return next((e for e in items if (e.get("regarding") or {}).get("name") == name
                         and e.get("reason") == reason), None)
        return wait_for(f"a {reason} Event on Capsule {name}", probe)

    def agent(self, name: str, capsule: str) -> None:
        self.kube.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": name, "namespace": NS},
                         "spec": {"image": IMAGE, "model": {"provider": "openai", "name": "gpt-4o-mini"},
                                  "budgetRef": {"name": "team-budget"}, "capsules": [{"name": capsule}]}},
                        manager="kubectl")

    def agent_ready(self, name: str) -> dict[str, Any] | None:
        return condition(self.kube.get(AGENTS, "agents", NS, name), "Ready")

    def agent_blocked(self, name: str, capsule_reason: str) -> dict[str, Any]:
        """Waits for the Agent's Ready=False CapsuleNotReady naming the Capsule's reason."""
        def probe() -> dict[str, Any] | None:
            r = self.agent_ready(name)
            return r if (r and r["status"] == "False" and r["reason"] == "CapsuleNotReady"
                         and f"({capsule_reason}:" in r["message"]) else None
        return wait_for(f"Agent {name} Ready=False CapsuleNotReady ({capsule_reason})", probe)

    def content(self, name: str, data: dict[str, str]) -> None:
        """Writes (replaces) ConfigMap `name` with exactly `data`."""
        obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS}, "data": data}
        self.kube.apply(obj, manager="kubectl")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    assert TOOLS is not None
    workdir: pathlib.Path = tmp_path_factory.mktemp("signatures")
    registry = Registry(TOOLS, workdir / "registry")
    standin = None
    operator = None
    try:
        work = Workdir(TOOLS, workdir / "cosign")
        pem = work.key_pair("soma")
        wrong = work.key_pair("wrong")
        standin = StandIn(workdir / "standin", crds=REPO / "crds")
        k = standin.kube
        k.ensure_namespace(NS)
        k.apply(budget("team-budget", NS), manager="kubectl")
        for name, key in (("signers", pem), ("wrong-signers", wrong)):
            k.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS},
                     "data": {"cosign.pub": key}}, manager="kubectl")
        operator = Operator(workdir, standin.write_kubeconfig(workdir / "kubeconfig"), "soma-operator",
                            "--no-leader-election", "--insecure-registries", registry.addr,
                            "--capsule-recheck-seconds", str(RECHECK_SECONDS))
        yield Env(standin, operator, registry, work, pem)
    finally:
        if operator is not None:
            operator.stop()
        if standin is not None:
            standin.stop()
        registry.stop()


def test_signed_oci_capsule_is_ready_with_digest_signer_and_time(env: Env) -> None:
    digest = env.push("v1", '{"blocks":[{"id":"a","text":"refunds: 30 days"}]}')
    env.work.sign("soma", env.registry.addr, REPO_KB, digest)
    assert env.work.verify("soma", env.registry.addr, REPO_KB, digest), "the cosign CLI accepts it"
    env.capsule("kb", env.oci(digest))
    env.agent("uses-kb", "kb")

    capsule = env.ready("kb", "True")
    status = capsule["status"]
    assert condition(capsule, "Ready")["reason"] == "Verified"
    assert digest in condition(capsule, "Ready")["message"]
    assert status["verifiedDigest"] == digest
    assert status["signer"] == key_fingerprint(env.pem)
    at = datetime.datetime.fromisoformat(status["verifiedAt"].replace("Z", "+00:00"))
    assert at.tzinfo is not None
    assert status["observedGeneration"] == capsule["metadata"]["generation"]
    assert (condition(capsule, "Stalled") or {}).get("status") == "False"
    assert (condition(capsule, "PolicyAllowed") or {}).get("status") == "True"

    wait_for("Agent uses-kb Ready", lambda: (env.agent_ready("uses-kb") or {}).get("status") == "True")
    deployment = env.kube.get_opt("apps/v1", "deployments", NS, "uses-kb")
    assert deployment is not None
    # The pod fetches exactly the verified digest before anything starts, and the agent reads
    # it read-only at /capsules/kb.
    pod = deployment["spec"]["template"]["spec"]
    fetch = pod["initContainers"][0]
    assert fetch["name"] == "capsule-0", pod["initContainers"]
    args = fetch["args"]
    assert args[args.index("--digest") + 1] == digest, args
    assert args[args.index("--repository") + 1] == f"{env.registry.addr}/{REPO_KB}", args
    assert args[args.index("--policy-hash") + 1] == POLICY_HASH, args
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    # The agent mounts only the volume's visible/ folder (its /capsules/<name>/), read-only:
    # the sidecar withdraws a revoked Capsule's folder out of it.
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/capsules")
    assert mount["readOnly"] is True and mount["subPath"] == "visible", mount
    assert args[args.index("--into") + 1] == "/var/lib/soma-capsules/visible/kb", args


def test_signed_bundle_for_another_policy_or_not_a_bundle_is_rejected(env: Env) -> None:
    """The signature covers the manifest, and with it the bundle's policyHash: a Capsule
    claiming another review than its signed content is refused, as is a signed artifact that is
    not a Capsule bundle."""
    digest = env.push("other-review", '{"blocks":[{"id":"p","text":"p"}]}', policy_hash="sha256:" + "aa" * 32)
    env.work.sign("soma", env.registry.addr, REPO_KB, digest)
    env.capsule("other-review", env.oci(digest))
    ready = env.rejected("other-review", "PolicyHashMismatch")
    assert "sha256:" + "aa" * 32 in ready["message"] and POLICY_HASH in ready["message"], ready
    plain = env.work.push(env.registry.addr, REPO_KB, "plain", '{"blocks":[{"id":"x","text":"x"}]}')
    env.work.sign("soma", env.registry.addr, REPO_KB, plain)
    env.capsule("plain", env.oci(plain))
    ready = env.rejected("plain", "NotACapsuleBundle")
    assert "soma capsule pack" in ready["message"], ready


def test_wrong_key_is_rejected(env: Env) -> None:
    digest = env.push("wrong-key", '{"blocks":[{"id":"w","text":"w"}]}')
    env.work.sign("soma", env.registry.addr, REPO_KB, digest)
    env.capsule("by-other-key", env.oci(digest), keys="wrong-signers")
    ready = env.rejected("by-other-key", "WrongKey")
    assert "none made by the configured key" in ready["message"], ready
    assert env.event("by-other-key", "WrongKey")["type"] == "Warning"


def test_unsigned_digest_is_rejected_until_it_is_signed(env: Env) -> None:
    digest = env.push("later", '{"blocks":[{"id":"l","text":"later"}]}')
    env.capsule("signed-later", env.oci(digest))
    ready = env.rejected("signed-later", "Unsigned")
    assert signing.signature_tag(digest) in ready["message"], ready
    # CI signs after the Capsule was applied: the operator looks again and accepts it.
    env.work.sign("soma", env.registry.addr, REPO_KB, digest)
    capsule = env.ready("signed-later", "True")
    assert capsule["status"]["verifiedDigest"] == digest


def test_signature_replayed_from_another_artifact_is_rejected(env: Env) -> None:
    a = env.push("genuine", '{"blocks":[{"id":"g","text":"genuine"}]}')
    b = env.push("forged", '{"blocks":[{"id":"g","text":"forged"}]}')
    env.work.sign("soma", env.registry.addr, REPO_KB, a)
    env.work.copy_signature(env.registry.addr, REPO_KB, a, b)
    assert not env.work.verify("soma", env.registry.addr, REPO_KB, b), "the cosign CLI rejects it too"
    env.capsule("replayed", env.oci(b))
    ready = env.rejected("replayed", "DigestMismatch")
    assert a in ready["message"] and b in ready["message"], ready


def test_tampered_tag_and_missing_artifact_are_rejected(env: Env) -> None:
    signed = env.push("moving", '{"blocks":[{"id":"t","text":"refunds: 30 days"}]}')
    env.work.sign("soma", env.registry.addr, REPO_KB, signed)
    # Someone re-pushes the tag with other bytes: another digest, which nobody signed.
    tampered = env.push("moving", '{"blocks":[{"id":"t","text":"refunds: never"}]}')
    assert tampered != signed
    env.capsule("tampered", env.oci(tampered))
    env.rejected("tampered", "Unsigned")
    env.capsule("missing", env.oci("sha256:" + "0" * 64))
    env.rejected("missing", "ArtifactNotFound")


def test_config_map_capsule_follows_its_signature(env: Env) -> None:
    """A swapped or corrupted `.sig` is rejected even though the content was verified before
    (the verification cache is keyed by the signature too), and a restored one accepted again;
    the Agent using the Capsule follows it."""
    text = '{"blocks":[{"id":"faq","text":"refunds within 30 days"}]}'
    signature = env.work.sign_blob("soma", text, "kb.json")
    other = env.work.sign_blob("soma", '{"blocks":[{"id":"faq","text":"something else"}]}', "other.json")
    good = {"kb.json": text, "kb.json.sig": signature}
    env.content("kb-content", good)
    env.capsule("kb-cm", {"configMapRef": {"name": "kb-content", "key": "kb.json", "digest": sha256(text)}})
    env.agent("uses-kb-cm", "kb-cm")
    capsule = env.ready("kb-cm", "True")
    assert capsule["status"]["verifiedDigest"] == sha256(text)
    assert capsule["status"]["signer"] == key_fingerprint(env.pem)
    wait_for("Agent uses-kb-cm Ready", lambda: (env.agent_ready("uses-kb-cm") or {}).get("status") == "True")

    # Another blob's genuine signature.
    env.content("kb-content", {**good, "kb.json.sig": other})
    env.rejected("kb-cm", "WrongKey")
    blocked = env.agent_blocked("uses-kb-cm", "WrongKey")
    assert '"kb-cm"' in blocked["message"], blocked

    env.content("kb-content", good)
    env.ready("kb-cm", "True")
    wait_for("Agent uses-kb-cm Ready again",
             lambda: (env.agent_ready("uses-kb-cm") or {}).get("status") == "True")

    # The signature corrupted: one base64 character changed.
    flipped = ("B" if signature[10] != "B" else "C").join((signature[:10], signature[11:]))
    env.content("kb-content", {**good, "kb.json.sig": flipped})
    reason = env.rejected("kb-cm", "WrongKey")
    assert "none made by the configured key" in reason["message"], reason

    # Not a signature at all.
    env.content("kb-content", {**good, "kb.json.sig": "not a signature!"})
    env.rejected("kb-cm", "MalformedSignature")

    # The content tampered with, the signature left alone.
    env.content("kb-content", {**good, "kb.json": text.replace("30", "300")})
    reason = env.rejected("kb-cm", "DigestMismatch")
    assert sha256(text) in reason["message"], reason

    env.content("kb-content", good)
    env.ready("kb-cm", "True")


def test_agent_using_a_rejected_capsule_does_not_start(env: Env) -> None:
    digest = env.push("never-signed", '{"blocks":[{"id":"n","text":"n"}]}')
    env.capsule("never-signed", env.oci(digest))
    env.agent("uses-unsigned", "never-signed")
    env.rejected("never-signed", "Unsigned")
    blocked = env.agent_blocked("uses-unsigned", "Unsigned")
    assert '"never-signed"' in blocked["message"], blocked
    assert env.kube.get_opt("apps/v1", "deployments", NS, "uses-unsigned") is None


def test_revoking_a_capsule_reaches_the_running_pods_configuration(env: Env) -> None:
    """Without a ledger: the Agent's sidecar ConfigMap carries the revocation (the sidecar
    follows its file), the pods are not rolled, the Agent says so; lifted, it is gone."""
    digest = env.push("rev", '{"blocks":[{"id":"r","text":"revocable"}]}')
    env.work.sign("soma", env.registry.addr, REPO_KB, digest)
    env.capsule("rev-kb", env.oci(digest))
    env.agent("uses-rev", "rev-kb")
    env.ready("rev-kb", "True")
    wait_for("Agent uses-rev Ready", lambda: (env.agent_ready("uses-rev") or {}).get("status") == "True")

    def settings() -> dict[str, Any]:
        return env.sidecar_settings("uses-rev-sidecar")

    def template() -> dict[str, Any]:
        d = env.kube.get("apps/v1", "deployments", NS, "uses-rev")
        return d["spec"]["template"]

    assert "revokedCapsules" not in settings()
    before = template()

    # The same name revoked in another namespace reaches nobody here.
    env.kube.ensure_namespace("elsewhere")
    env.kube.apply({"apiVersion": AGENTS, "kind": "Capsule", "metadata": {"name": "rev-kb", "namespace": "elsewhere"},
                    "spec": {"version": "1", "policyHash": POLICY_HASH, "revoked": True, "source": env.oci(digest),
                             "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}}},
                   manager="kubectl")
    wait_for("the other namespace's Capsule revoked", lambda: (condition(
        env.kube.get(AGENTS, "capsules", "elsewhere", "rev-kb"), "Ready") or {}).get("reason") == "Revoked")
    assert "revokedCapsules" not in settings()

    env.set_revoked("rev-kb", True)
    entries = wait_for("revokedCapsules in the sidecar's ConfigMap",
                       lambda: settings().get("revokedCapsules"))
    assert entries == [{"name": "rev-kb", "digest": digest,
                        "reason": f"Capsule {NS}/rev-kb is revoked (spec.revoked)"}], entries
    blocked = env.agent_blocked("uses-rev", "Revoked")
    assert "Running pods are told to stop using" in blocked["message"], blocked
    assert template() == before, "a live part of the configuration: the pods are not rolled"

    env.set_revoked("rev-kb", False)
    env.ready("rev-kb", "True")
    wait_for("Agent uses-rev Ready again", lambda: (env.agent_ready("uses-rev") or {}).get("status") == "True")
    wait_for("revokedCapsules gone", lambda: "revokedCapsules" not in settings())
    assert template() == before


def test_revoking_a_capsule_reaches_a_running_jobs_pods_configuration(env: Env) -> None:
    """The Job controller does what the Agent's does: a task Job still running on a Capsule
    that is revoked gets the revocation in its sidecar ConfigMap (woken by the Capsule's
    change), its run untouched; lifted, the entry is removed again (a Job's ConfigMap is
    not re-applied after the run starts, so the Job controller writes that too)."""
    digest = env.push("rev-job", '{"blocks":[{"id":"j","text":"for a task"}]}')
    env.work.sign("soma", env.registry.addr, REPO_KB, digest)
    env.capsule("rev-job-kb", env.oci(digest))
    env.agent("uses-rev-job", "rev-job-kb")
    env.ready("rev-job-kb", "True")
    env.kube.apply({"apiVersion": AGENTS, "kind": "Job", "metadata": {"name": "rev-task", "namespace": NS},
                    "spec": {"agentRef": {"name": "uses-rev-job"}, "input": "summarise",
                             "deadlineSeconds": 600}}, manager="kubectl")
    run = wait_for("the Job's run", lambda: env.kube.get_opt("batch/v1", "jobs", NS, "rev-task"), seconds=60)

    def settings() -> dict[str, Any]:
        return env.sidecar_settings("sjob-rev-task-sidecar")

    assert settings()["capsules"] == [{"name": "rev-job-kb", "digest": digest}], settings()["capsules"]
    assert "revokedCapsules" not in settings()

    env.set_revoked("rev-job-kb", True)
    entries = wait_for("revokedCapsules in the running Job's sidecar ConfigMap",
                       lambda: settings().get("revokedCapsules"))
    assert entries == [{"name": "rev-job-kb", "digest": digest,
                        "reason": f"Capsule {NS}/rev-job-kb is revoked (spec.revoked)"}], entries
    after = env.kube.get("batch/v1", "jobs", NS, "rev-task")
    assert after["spec"]["template"] == run["spec"]["template"], "the run is not restarted or changed"
    job = env.kube.get(AGENTS, "jobs", NS, "rev-task")
    assert job["status"]["phase"] == "Running", job["status"]

    env.set_revoked("rev-job-kb", False)
    env.ready("rev-job-kb", "True")
    wait_for("revokedCapsules gone from the running Job's ConfigMap",
             lambda: not settings().get("revokedCapsules"))
    assert env.kube.get("batch/v1", "jobs", NS, "rev-task")["spec"]["template"] == run["spec"]["template"]
