"""The real operator binary's admission webhook and policies, against the API stand-in.

    pytest ──HTTPS AdmissionReview (CA from the ValidatingWebhookConfiguration's caBundle,
      │       server name <service>.<namespace>.svc)──▶ soma-operator run :webhook-port
      └──▶ soma_apiserver.py ◀── the operator: Secret with the serving certificate,
                                 ValidatingWebhookConfiguration, policy ConfigMaps, Agents

Checks: the operator creates the certificate Secret and the configuration (failurePolicy Fail,
rules, namespace exemption, caBundle = the Secret's CA); a valid Agent is allowed and an invalid
one denied with every violated policy's message; a policy ConfigMap added later re-checks an
existing Agent (PolicyAllowed=False, Ready=False PolicyDenied) and removing it lets the Agent
through again; a broken policy ConfigMap gets a Warning Event and a metric while the webhook
keeps serving the last good set; policies read the inventory; an unverifiable Capsule keeps its
Agent from starting; a restarted operator reuses the Secret and writes nothing; in cert-manager
mode the operator waits for the Secret, never writes it, and follows its rotation.

Needs SOMA_OPERATOR_BIN; skipped without.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import pathlib
import socket
import ssl
import time
import uuid
from typing import Any, Iterator

import pytest

from harness import REPO, StandIn, wait_for
from test_convergence import AGENTS, Operator, budget, pytestmark  # noqa: F401  (skip without the binary)

OPERATOR_NS = "default"  # the operator's POD_NAMESPACE in the harness
TEAM = "team"
SERVICE = "soma-operator-webhook"
VWC = ("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations")
SECRET = "soma-operator-webhook-cert"
DIGEST = "sha256:" + "ab" * 32


def agent(name: str, image: str, budget_ref: str | None = "team-budget") -> dict[str, Any]:
    spec: dict[str, Any] = {"image": image, "model": {"provider": "openai", "name": "gpt-4o-mini"}}
    if budget_ref:
        spec["budgetRef"] = {"name": budget_ref}
    return {"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": name, "namespace": TEAM}, "spec": spec}




class _ServiceConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 that verifies the certificate for the Service's DNS name, as the API
    server does when it calls the webhook through the Service."""

    def __init__(self, port: int, server_name: str, context: ssl.SSLContext):
        super().__init__("127.0.0.1", port, context=context, timeout=10)
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)  # type: ignore[attr-defined]


class Env:
    def __init__(self, standin: StandIn, operator: Operator, workdir: pathlib.Path):
        self.standin = standin
        self.operator = operator
        self.workdir = workdir

    def configuration(self) -> dict[str, Any] | None:
        return self.standin.kube.get_opt(*VWC, None, "soma-policy")

    def ca_pem(self) -> str:
        cfg = wait_for("the ValidatingWebhookConfiguration", self.configuration)
        return base64.b64decode(cfg["webhooks"][0]["clientConfig"]["caBundle"]).decode()

    def review(self, obj: dict[str, Any], server_name: str | None = None) -> dict[str, Any]:
        """POST one AdmissionReview to the operator's webhook; returns its `response`."""
        ctx = ssl.create_default_context(cadata=self.ca_pem())
        conn = _ServiceConnection(self.operator.webhook_port,
                                  server_name or f"{SERVICE}.{OPERATOR_NS}.svc", ctx)
        uid = str(uuid.uuid4())
        body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": uid, "kind": {"group": "soma.dev", "version": "v1alpha1", "kind": obj["kind"]},
            "resource": {"group": "soma.dev", "version": "v1alpha1", "resource": obj["kind"].lower() + "s"},
            "namespace": obj["metadata"]["namespace"], "name": obj["metadata"]["name"],
            "operation": "CREATE", "userInfo": {"username": "e2e"}, "object": obj, "dryRun": False}}
        try:
            conn.request("POST", "/validate", body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            answer = json.loads(resp.read())
        finally:
            conn.close()
        assert answer["response"]["uid"] == uid
        return answer["response"]

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        a = self.standin.kube.get(AGENTS, "agents", TEAM, name)
        return next((c for c in (a.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)

    def writes(self, resource: str, name: str | None = None) -> int:
        return sum(r["count"] for r in self.standin.stats()["requests"]
                   if r["resource"] == resource and r["verb"] in ("create", "apply", "patch", "update")
                   and (name is None or r["name"] == name))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("webhook")
    standin = StandIn(workdir / "standin", crds=REPO / "crds")
    env = None
    try:
        k = standin.kube
        k.ensure_namespace(TEAM)
        k.apply(budget("team-budget", TEAM), manager="kubectl")
        k.apply(agent("good", f"registry.example.com/agents/echo@{DIGEST}"), manager="kubectl")
        kubeconfig = standin.write_kubeconfig(workdir / "kubeconfig")
        env = Env(standin, Operator(workdir, kubeconfig, "soma-operator-0", "--no-leader-election"), workdir)
        wait_for("the webhook port", lambda: listening(env.operator.webhook_port))
        yield env
    finally:
        # Tests restart the operator (env.operator is replaced), so stop whichever runs now.
        if env is not None:
            env.operator.stop()
        standin.stop()


def test_operator_creates_the_secret_and_the_configuration(env: Env) -> None:
    cfg = wait_for("the ValidatingWebhookConfiguration", env.configuration)
    hook = cfg["webhooks"][0]
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["timeoutSeconds"] == 3  # the 1.5 s default deadline, rounded up, plus one
    assert hook["rules"] == [{"apiGroups": ["soma.dev"], "apiVersions": ["v1alpha1"],
                              "operations": ["CREATE", "UPDATE"],
                              "resources": ["agents", "budgets", "capsules", "jobs"], "scope": "Namespaced"}]
    assert hook["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [OPERATOR_NS]}]
    assert hook["clientConfig"]["service"] == {"name": SERVICE, "namespace": OPERATOR_NS,
                                               "path": "/validate", "port": 443}
    secret = env.standin.kube.get("v1", "secrets", OPERATOR_NS, SECRET)
    assert secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["ca.crt"]).decode() == env.ca_pem()


def test_valid_agent_allowed_invalid_denied_with_every_message(env: Env) -> None:
    ok = env.review(agent("fine", f"registry.example.com/agents/echo@{DIGEST}"))
    assert ok["allowed"] is True, ok
    bad = env.review(agent("sloppy", "registry.example.com/agents/echo:latest", budget_ref=None))
    assert bad["allowed"] is False
    message = bad["status"]["message"]
    assert "[SomaImages/soma-images]" in message and "not pinned by digest" in message, message
    assert "[SomaBudgetRef/soma-budget-ref]" in message, message


def test_certificate_is_only_for_the_service_name(env: Env) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        env.review(agent("fine", f"registry.example.com/agents/echo@{DIGEST}"), server_name="evil.example.com")


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def policy_configmap(name: str, text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": OPERATOR_NS, "labels": {"soma.dev/policy": "true"}},
            "data": {"policy.yaml": text}}


ONLY_GHCR = """apiVersion: constraints.gatekeeper.sh/v1beta1
kind: SomaImages
metadata: {name: only-ghcr}
spec:
  enforcementAction: deny
  match: {kinds: [{apiGroups: [soma.dev], kinds: [Agent, Job]}]}
  parameters: {requireDigest: true, allowedRegistries: ["ghcr.io/acme/"]}
"""


def test_a_new_policy_rechecks_an_existing_agent(env: Env) -> None:
    k = env.standin.kube
    wait_for("Agent good Ready", lambda: (env.condition("good", "Ready") or {}).get("status") == "True")
    assert (env.condition("good", "PolicyAllowed") or {}).get("reason") == "Allowed"

    k.apply(policy_configmap("only-ghcr", ONLY_GHCR), manager="kubectl")
    denied = wait_for("PolicyAllowed=False on Agent good",
                      lambda: (c := env.condition("good", "PolicyAllowed")) and c["status"] == "False" and c)
    assert denied["reason"] == "Denied"
    assert "[SomaImages/only-ghcr]" in denied["message"]
    ready = env.condition("good", "Ready") or {}
    assert (ready.get("status"), ready.get("reason")) == ("False", "PolicyDenied")
    # The webhook serves the same set.
    assert env.review(agent("again", f"registry.example.com/agents/echo@{DIGEST}"))["allowed"] is False

    k.delete("v1", "configmaps", OPERATOR_NS, "only-ghcr")
    wait_for("Agent good Ready again", lambda: (env.condition("good", "Ready") or {}).get("status") == "True")
    assert (env.condition("good", "PolicyAllowed") or {}).get("status") == "True"


def test_broken_policy_is_reported_and_the_last_good_set_kept(env: Env) -> None:
    k = env.standin.kube
    k.apply(policy_configmap("team-policy", ONLY_GHCR), manager="kubectl")
    wait_for("the ConfigMap's constraint served", lambda: env.review(
        agent("probe", f"registry.example.com/agents/echo@{DIGEST}"))["allowed"] is False)
    # Someone breaks the ConfigMap.
    k.apply(policy_configmap("team-policy", "kind: [unclosed"), manager="kubectl")

    def event() -> dict[str, Any] | None:
        items = k.list("events.k8s.io/v1", "events", OPERATOR_NS)["items"]
        return next((e for e in items if (e.get("regarding") or {}).get("name") == "team-policy"), None)

    ev = wait_for("a Warning Event on ConfigMap team-policy", event)
    assert ev["type"] == "Warning" and ev["reason"] == "InvalidPolicyDocument", ev
    assert "last good version" in ev["note"]
    wait_for("soma_policy_load_errors_total", lambda: re.search(
        r'soma_policy_load_errors_total\{reason="InvalidPolicyDocument"\} [1-9]', env.operator.metrics()))
    # Still serving, and still with the last good version of the broken document.
    denied = env.review(agent("probe", f"registry.example.com/agents/echo@{DIGEST}"))
    assert denied["allowed"] is False and "[SomaImages/only-ghcr]" in denied["status"]["message"], denied
    assert env.review(agent("fine", f"ghcr.io/acme/echo@{DIGEST}"))["allowed"] is True
    k.delete("v1", "configmaps", OPERATOR_NS, "team-policy")
    wait_for("the constraint gone", lambda: env.review(
        agent("probe", f"registry.example.com/agents/echo@{DIGEST}"))["allowed"] is True)
    wait_for("Agent good Ready again", lambda: (env.condition("good", "Ready") or {}).get("status") == "True")


REQUIRE_EXISTING_BUDGET = """apiVersion: constraints.gatekeeper.sh/v1beta1
kind: SomaBudgetRef
metadata: {name: existing-budgets}
spec:
  match: {kinds: [{apiGroups: [soma.dev], kinds: [Agent, Job]}]}
  parameters: {requireExisting: true}
"""


def test_policies_see_the_inventory(env: Env) -> None:
    """A policy that reads data.inventory (Budgets here) decides from the operator's caches."""
    k = env.standin.kube
    k.apply(policy_configmap("existing-budgets", REQUIRE_EXISTING_BUDGET), manager="kubectl")
    try:
        missing = agent("orphan", f"registry.example.com/agents/echo@{DIGEST}", budget_ref="no-such-budget")
        denied = wait_for("a denial naming the missing Budget", lambda: (r := env.review(missing))
                          and not r["allowed"] and r)
        assert 'references Budget "no-such-budget", which does not exist' in denied["status"]["message"], denied
        charged = env.review(agent("charged", f"registry.example.com/agents/echo@{DIGEST}"))
        assert charged["allowed"] is True, charged
        k.apply(budget("no-such-budget", TEAM), manager="kubectl")
        wait_for("the new Budget in the inventory", lambda: env.review(missing)["allowed"] is True)
    finally:
        k.delete("v1", "configmaps", OPERATOR_NS, "existing-budgets")


def test_unverifiable_capsule_keeps_its_agent_from_starting(env: Env) -> None:
    """A Capsule whose public key is not a usable PEM key is not Ready, with the reason, and an
    Agent that uses it is not started (test_capsule_signatures.py verifies real signatures)."""
    k = env.standin.kube
    k.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "signers", "namespace": TEAM},
             "data": {"cosign.pub": "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"}},
            manager="kubectl")
    k.apply({"apiVersion": AGENTS, "kind": "Capsule", "metadata": {"name": "kb", "namespace": TEAM},
             "spec": {"version": "1", "policyHash": "sha256:" + "9b" * 32,
                      "source": {"oci": {"repository": "registry.example.com/capsules/kb", "digest": DIGEST}},
                      "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}}}, manager="kubectl")
    with_kb = agent("with-kb", f"registry.example.com/agents/echo@{DIGEST}")
    with_kb["spec"]["capsules"] = [{"name": "kb"}]
    k.apply(with_kb, manager="kubectl")

    def capsule_ready() -> dict[str, Any] | None:
        c = k.get(AGENTS, "capsules", TEAM, "kb")
        return next((x for x in (c.get("status") or {}).get("conditions") or [] if x["type"] == "Ready"), None)

    ready = wait_for("the Capsule's Ready condition", capsule_ready)
    assert (ready["status"], ready["reason"]) == ("False", "InvalidPublicKey"), ready
    assert "verifiedDigest" not in (k.get(AGENTS, "capsules", TEAM, "kb").get("status") or {})
    blocked = wait_for("Agent with-kb blocked", lambda: (c := env.condition("with-kb", "Ready")) and c)
    assert (blocked["status"], blocked["reason"]) == ("False", "CapsuleNotReady"), blocked
    assert k.get_opt("apps/v1", "deployments", TEAM, "with-kb") is None


def test_restarted_operator_reuses_the_secret_and_writes_no_configuration(env: Env) -> None:
    ca = env.ca_pem()
    secrets, configs = env.writes("v1/secrets"), env.writes("/".join(VWC))
    assert (secrets, configs) == (1, 1)
    env.operator.stop()
    kubeconfig = env.workdir / "kubeconfig"
    env.operator = Operator(env.workdir, kubeconfig, "soma-operator-1", "--no-leader-election")
    wait_for("the webhook port", lambda: listening(env.operator.webhook_port))
    assert env.review(agent("fine", f"registry.example.com/agents/echo@{DIGEST}"))["allowed"] is True
    assert env.ca_pem() == ca
    assert (env.writes("v1/secrets"), env.writes("/".join(VWC))) == (1, 1)


def test_cert_manager_secret_is_waited_for_never_written_and_rotation_followed(env: Env) -> None:
    """A second operator in cert-manager mode: it waits for the Secret instead of generating
    one, serves what it holds, and follows a rotation without restarting."""
    k = env.standin.kube
    cm_secret, cm_config = "cm-cert", "cm-config"
    b = Operator(env.workdir, env.workdir / "kubeconfig", "soma-operator-cm", "--no-leader-election",
                 "--namespaces", "elsewhere", "--webhook-cert-manager",
                 "--webhook-cert-secret", cm_secret, "--webhook-configuration", cm_config)
    try:
        time.sleep(3)
        assert k.get_opt("v1", "secrets", OPERATOR_NS, cm_secret) is None, "cert-manager mode generated a Secret"
        assert k.get_opt(*VWC, None, cm_config) is None
        assert not listening(b.webhook_port)

        def issue(source: str) -> str:
            """Plays cert-manager: copies a serving certificate into the Secret; returns its CA."""
            data = k.get("v1", "secrets", OPERATOR_NS, source)["data"]
            k.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                     "metadata": {"name": cm_secret, "namespace": OPERATOR_NS}, "data": data},
                    manager="cert-manager")
            return base64.b64decode(data["ca.crt"]).decode()

        def served_ca() -> str | None:
            cfg = k.get_opt(*VWC, None, cm_config)
            return cfg and base64.b64decode(cfg["webhooks"][0]["clientConfig"]["caBundle"]).decode()

        first_ca = issue(SECRET)
        wait_for("the cert-manager configuration", lambda: served_ca() == first_ca)
        wait_for("operator B's webhook port", lambda: listening(b.webhook_port))
        assert b_review(b, first_ca)["allowed"] is True
        assert env.writes("v1/secrets", cm_secret) == 1, "someone but the test wrote cert-manager's Secret"
        assert env.writes("v1/secrets") == 2, "only operator A's create and the test's issue"

        # A new certificate from another CA (operator A regenerates after its Secret is deleted).
        k.delete("v1", "secrets", OPERATOR_NS, SECRET)
        env.operator.stop()
        env.operator = Operator(env.workdir, env.workdir / "kubeconfig", "soma-operator-2", "--no-leader-election")
        second = wait_for("a regenerated Secret", lambda: k.get_opt("v1", "secrets", OPERATOR_NS, SECRET))
        second_ca = base64.b64decode(second["data"]["ca.crt"]).decode()
        assert second_ca != first_ca
        issue(SECRET)
        wait_for("the rotated CA in the configuration", lambda: served_ca() == second_ca)
        wait_for("the rotated certificate served", lambda: try_review(b, second_ca))
        with pytest.raises(ssl.SSLCertVerificationError):
            b_review(b, first_ca)
    finally:
        b.stop()


def b_review(op: Operator, ca_pem: str) -> dict[str, Any]:
    ctx = ssl.create_default_context(cadata=ca_pem)
    conn = _ServiceConnection(op.webhook_port, f"{SERVICE}.{OPERATOR_NS}.svc", ctx)
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u1", "kind": {"group": "soma.dev", "version": "v1alpha1", "kind": "Agent"},
        "resource": {"group": "soma.dev", "version": "v1alpha1", "resource": "agents"},
        "namespace": TEAM, "name": "x", "operation": "CREATE", "userInfo": {},
        "object": agent("x", f"registry.example.com/agents/echo@{DIGEST}")}}
    try:
        conn.request("POST", "/validate", body=json.dumps(body), headers={"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())["response"]
    finally:
        conn.close()


def try_review(op: Operator, ca_pem: str) -> bool:
    try:
        return b_review(op, ca_pem)["allowed"] is True
    except ssl.SSLError:
        return False


def test_sigterm_during_start_up_stops_cleanly(env: Env) -> None:
    """An operator still waiting for cert-manager's Secret exits 0 on SIGTERM, not when the
    wait or the kubelet's grace period runs out."""
    waiting = Operator(env.workdir, env.workdir / "kubeconfig", "soma-operator-waiting", "--no-leader-election",
                       "--namespaces", "elsewhere", "--webhook-cert-manager",
                       "--webhook-cert-secret", "never-issued", "--webhook-configuration", "never")
    proc = waiting.proc
    assert proc is not None and proc.poll() is None
    waiting.stop()  # SIGTERM, then SIGKILL only after 25 s
    assert proc.returncode == 0, waiting.log_path.read_text()[-2000:]
