"""Vault on this machine: the real operator against the API stand-in (`--deployment-pods`), a
real `soma-proxy` per pod on the pod's IP, started from the ConfigMap the operator wrote with the
pod's projected service-account token (as the kubelet would mount it: a TokenRequest to the
stand-in for the pod's ServiceAccount and audience), and a real OpenBao dev server whose
Kubernetes auth method reviews that token with the stand-in's TokenReview.

    pytest ──▶ soma_apiserver.py --deployment-pods ◀── soma-operator run --credentials-check-interval-seconds 1
      │           ▲ POST tokenreviews                     │ GET http://127.0.0.x:ADMIN/readyz
      │   bao server -dev ◀── login (kubernetes), KV read ── soma-proxy per pod ◀──┘
      └── TokenRequest (the pod's token file)

Checked: the sidecar logs in with Kubernetes auth through a real TokenReview (a token for another
ServiceAccount or audience is refused); a missing KV path makes the Agent's
`CredentialsUnavailable` condition True with Vault's reason (`VaultPathNotFound`) and the path,
with no secret in it; writing the secret turns it False; with a token TTL of 2 s the sidecar
renews it again and again and keeps serving. Every wait is bounded; nothing compares wall-clock
durations.

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN and SOMA_BAO (scripts/test-deps/servers.sh).
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
from typing import Any, Iterator

import pytest
import requests

from harness import REPO, StandIn, api_path, free_port, stop_process, wait_for
from servers import Bao
from test_convergence import AGENTS, Operator
# The fake upstream accepts test_scaling's KEY: it is the secret Vault holds here.
from test_scaling import KEY, condition, start_upstream

PROXY = os.environ.get("SOMA_PROXY_BIN", "")
UPSTREAM = os.environ.get("SOMA_FAKE_UPSTREAM_BIN", "")
pytestmark = pytest.mark.skipif(
    not all(b and os.access(b, os.X_OK) for b in (os.environ.get("SOMA_OPERATOR_BIN", ""), PROXY, UPSTREAM)),
    reason="SOMA_OPERATOR_BIN, SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN must be executables")

TOKEN = "pod-uid-vault-e2e"
NS = "vaulted"
NAME = "bot"
KV_PATH = "agents/vaulted/bot"


class Pods:
    """A real `soma-proxy` per pod of the Agent on the pod's IP, with the pod's projected token."""

    def __init__(self, work: pathlib.Path, standin: StandIn, upstream: str, admin_port: int, name: str = NAME):
        self.work, self.standin, self.upstream, self.admin_port = work, standin, upstream, admin_port
        self.name = name
        self.proxy_port = free_port()
        self.sidecars: dict[str, tuple[subprocess.Popen[bytes], str, pathlib.Path]] = {}

    def sync(self) -> list[str]:
        k = self.standin.kube
        pods = k.list("v1", "pods", NS, labelSelector=f"soma.dev/agent={self.name}")["items"]
        live = {p["metadata"]["uid"]: p for p in pods if (p.get("status") or {}).get("podIP")}
        for uid in [u for u in self.sidecars if u not in live]:
            stop_process(self.sidecars.pop(uid)[0])
        for uid, pod in live.items():
            if uid not in self.sidecars:
                self.sidecars[uid] = self._start(uid, pod)
        return [url for _, url, _ in self.sidecars.values()]

    def _start(self, uid: str, pod: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str, pathlib.Path]:
        ip = pod["status"]["podIP"]
        cm = self.standin.kube.get("v1", "configmaps", NS, f"{self.name}-sidecar")
        config = json.loads(cm["data"]["config.yaml"])
        d = self.work / uid
        d.mkdir(exist_ok=True)
        vault = config["credentials"]["vault"]
        if "appRole" in vault["auth"]:
            self._approle_files(pod, vault["auth"]["appRole"], d)
        else:
            self._projected_token(pod, vault, d)
        config.update(listen=f"{ip}:{self.proxy_port}", adminListen=f"{ip}:{self.admin_port}",
                      outboxPath=str(d / "outbox.db"))
        config["provider"]["upstream"] = self.upstream
        (d / "config.yaml").write_text(json.dumps(config))
        env = dict(os.environ, SOMA_POD_UID=TOKEN, RUST_LOG="info,soma_proxy=debug", NO_COLOR="1")
        proc = subprocess.Popen([PROXY, "--config", str(d / "config.yaml")], stdout=open(d / "sidecar.log", "wb"),
                                stderr=subprocess.STDOUT, env=env)
        return proc, f"http://{ip}:{self.proxy_port}/v1/chat/completions", d / "sidecar.log"

    def _projected_token(self, pod: dict[str, Any], vault: dict[str, Any], d: pathlib.Path) -> None:
        """The kubelet's part: the projected token of the pod's ServiceAccount, for the audience
        the pod spec asks, in the file the sidecar's config names."""
        projection = next(v["projected"]["sources"][0]["serviceAccountToken"] for v in pod["spec"]["volumes"]
                          if v["name"] == "vault-token")
        r = requests.post(self.standin.url + api_path("v1", "serviceaccounts", NS, pod["spec"]["serviceAccountName"])
                          + "/token", json={"spec": {"audiences": [projection["audience"]],
                                                     "expirationSeconds": projection["expirationSeconds"]}}, timeout=10)
        assert r.status_code == 201, r.text
        (d / "token").write_text(r.json()["status"]["token"])
        assert vault["auth"]["kubernetes"]["tokenPath"] == "/var/run/secrets/soma.dev/vault/token", vault
        vault["auth"]["kubernetes"]["tokenPath"] = str(d / "token")

    def _approle_files(self, pod: dict[str, Any], approle: dict[str, Any], d: pathlib.Path) -> None:
        """The kubelet's part: the Secret volume's items as files in the folder the sidecar's
        container mounts it at, and only that container."""
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "vault-approle")
        sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == "soma-proxy")
        mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "vault-approle")
        secret = self.standin.kube.get("v1", "secrets", NS, volume["secret"]["secretName"])
        for item in volume["secret"]["items"]:
            (d / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
        for field in ("roleIdPath", "secretIdPath"):
            assert approle[field].startswith(mount["mountPath"] + "/"), approle
            approle[field] = str(d / approle[field].rsplit("/", 1)[1])

    def logs(self) -> str:
        return "\n".join(log.read_text(errors="replace") for _, _, log in self.sidecars.values())

    def stop(self) -> None:
        for proc, _, _ in self.sidecars.values():
            stop_process(proc)
        self.sidecars.clear()


@pytest.fixture(scope="module")
def vaulted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("vault")
    standin = StandIn(work, "--deployment-pods", crds=REPO / "crds")
    bao = upstream = pods = operator = None
    admin_port = free_port()
    try:
        bao = Bao(work)
        # Vault's Kubernetes auth, reviewing tokens with the stand-in (its CA is required by
        # OpenBao's config even though the stand-in speaks plain HTTP).
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(work / "ca.key"),
                        "-out", str(work / "ca.crt"), "-subj", "/CN=soma-standin", "-days", "1"],
                       check=True, capture_output=True)
        bao.api("POST", "sys/auth/kubernetes", {"type": "kubernetes"})
        bao.api("POST", "auth/kubernetes/config", {"kubernetes_host": standin.url, "disable_local_ca_jwt": True,
                                                   "kubernetes_ca_cert": (work / "ca.crt").read_text()})
        bao.api("PUT", "sys/policies/acl/agents-read",
                {"policy": 'path "secret/data/agents/*" { capabilities = ["read"] }'})
        # A 2 s token: renewed every ~1.3 s for as long as the sidecar runs.
        bao.api("POST", "auth/kubernetes/role/agent",
                {"bound_service_account_names": [NAME], "bound_service_account_namespaces": [NS],
                 "audience": "vault", "token_policies": ["agents-read"], "token_ttl": "2s", "token_max_ttl": "1h"})
        upstream, upstream_url = start_upstream(work)
        pods = Pods(work, standin, upstream_url, admin_port)
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-vault",
                            "--no-leader-election", "--credentials-check-interval-seconds", "1",
                            "--sidecar-admin-port", str(admin_port))
        yield {"standin": standin, "bao": bao, "pods": pods, "operator": operator, "work": work,
               "upstream": upstream_url, "admin_port": admin_port}
    finally:
        if pods is not None:
            pods.stop()
        if operator is not None:
            operator.stop()
        if upstream is not None:
            stop_process(upstream)
        if bao is not None:
            bao.stop()
        standin.stop()


def chat(url: str) -> requests.Response:
    return requests.post(url, json={"model": "gpt-4o-mini", "max_tokens": 4,
                                    "messages": [{"role": "user", "content": "hello"}]},
                         headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_tokenreview_accepts_only_the_service_account_and_audience_it_was_issued_for(vaulted: dict[str, Any]) -> None:
    standin, bao = vaulted["standin"], vaulted["bao"]
    k = standin.kube
    k.ensure_namespace("strangers")
    for ns, sa in (("strangers", "intruder"), (NS, NAME)):
        k.ensure_namespace(ns)
        r = requests.post(standin.url + api_path("v1", "serviceaccounts", ns), json={"metadata": {"name": sa}},
                          timeout=10)
        assert r.status_code in (201, 409), r.text

    def token(ns: str, sa: str, audience: str) -> str:
        r = requests.post(standin.url + api_path("v1", "serviceaccounts", ns, sa) + "/token",
                          json={"spec": {"audiences": [audience]}}, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["status"]["token"]

    def login(jwt: str) -> requests.Response:
        return requests.post(f"{bao.addr}/v1/auth/kubernetes/login", json={"role": "agent", "jwt": jwt}, timeout=10)

    ok = login(token(NS, NAME, "vault"))
    assert ok.status_code == 200, ok.text
    assert ok.json()["auth"]["metadata"]["service_account_name"] == NAME
    assert login(token(NS, NAME, "somebody-else")).status_code == 403, "wrong audience"
    assert login(token("strangers", "intruder", "vault")).status_code == 403, "another ServiceAccount"
    forged = token(NS, NAME, "vault")
    assert login(forged[:-6] + "AAAAAA").status_code == 403, "a token the API server did not issue"


def test_credentials_unavailable_says_vaults_reason_until_the_secret_exists(vaulted: dict[str, Any]) -> None:
    standin, bao, pods = vaulted["standin"], vaulted["bao"], vaulted["pods"]
    k = standin.kube
    k.ensure_namespace(NS)
    k.apply({"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": "team", "namespace": NS},
             "spec": {"limits": {"costMicros": 500_000_000}, "period": {"calendar": "month", "timeZone": "UTC"}}},
            manager="kubectl")
    k.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": NAME, "namespace": NS},
             "spec": {"image": "registry.example.com/agents/echo@sha256:" + "ab" * 32,
                      "model": {"provider": "openai", "name": "gpt-4o-mini"}, "budgetRef": {"name": "team"},
                      "credentials": {"vault": {"address": bao.addr, "path": KV_PATH, "key": "api-key",
                                                "role": "agent", "refreshSeconds": 1}}}}, manager="kubectl")
    urls = wait_for("the pod's sidecar", lambda: pods.sync(), seconds=60)

    # Nothing at the path yet: Vault's own reason on the Agent, with the path and no secret
    # (`VaultPending` first, while the sidecar's first read is under way).
    c = wait_for("CredentialsUnavailable=True VaultPathNotFound",
                 lambda: (c := condition(k.get(AGENTS, "agents", NS, NAME), "CredentialsUnavailable"))
                 .get("reason") == "VaultPathNotFound" and c, seconds=60)
    assert c["status"] == "True", c
    assert KV_PATH in c["message"] and KEY not in c["message"], c
    assert chat(urls[0]).status_code == 503
    events = [e for e in k.list("events.k8s.io/v1", "events", NS)["items"]
              if e.get("regarding", {}).get("name") == NAME and e.get("reason") == "VaultPathNotFound"]
    assert events and events[0]["type"] == "Warning", events
    assert "logged in to Vault" in pods.logs(), "the Kubernetes login went through the TokenReview"

    # The secret is written: the sidecar reads it within refreshSeconds, the condition turns False.
    bao.api("POST", f"secret/data/{KV_PATH}", {"data": {"api-key": KEY}})
    c = wait_for("CredentialsUnavailable=False", lambda: (c := condition(k.get(AGENTS, "agents", NS, NAME),
                                                                         "CredentialsUnavailable")).get("status") == "False" and c,
                 seconds=60)
    assert c["reason"] == "CredentialsAvailable", c
    assert chat(urls[0]).status_code == 200

    # A 2 s token, kept alive by renewals: the sidecar serves across several of them.
    before = pods.logs().count("Vault token renewed")
    failures = []

    def renewed_while_serving() -> bool:
        r = chat(urls[0])
        if r.status_code != 200:
            failures.append(r.status_code)
        return pods.logs().count("Vault token renewed") >= before + 4

    wait_for("four token renewals while serving", renewed_while_serving, seconds=120)
    assert failures == [], f"requests failed while the token was renewed: {failures}"
    assert condition(k.get(AGENTS, "agents", NS, NAME), "CredentialsUnavailable")["status"] == "False"
    operator_log = vaulted["operator"].log_tail(2000)
    assert KEY not in operator_log and KEY not in json.dumps(k.get(AGENTS, "agents", NS, NAME))


def test_approle_from_a_secret_reaches_the_sidecar_alone(vaulted: dict[str, Any]) -> None:
    """`auth: appRole` on the Agent: the operator mounts the Secret's two keys into the sidecar
    container only, the ConfigMap names the files, and the sidecar logs in with them against the
    real OpenBao (no service-account token anywhere in the pod)."""
    standin, bao = vaulted["standin"], vaulted["bao"]
    k = standin.kube
    k.ensure_namespace(NS)
    name = "approle-bot"
    k.apply({"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": "team", "namespace": NS},
             "spec": {"limits": {"costMicros": 500_000_000}, "period": {"calendar": "month", "timeZone": "UTC"}}},
            manager="kubectl")
    bao.api("POST", "sys/auth/approle", {"type": "approle"})
    bao.api("POST", "auth/approle/role/bot", {"token_policies": ["agents-read"], "token_ttl": "1h"})
    role_id = bao.api("GET", "auth/approle/role/bot/role-id")["data"]["role_id"]
    secret_id = bao.api("POST", "auth/approle/role/bot/secret-id", {})["data"]["secret_id"]
    bao.api("POST", f"secret/data/{KV_PATH}", {"data": {"api-key": KEY}})
    b64 = lambda v: base64.b64encode(v.encode()).decode()  # noqa: E731
    k.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bot-approle", "namespace": NS},
             "type": "Opaque", "data": {"role-id": b64(role_id), "sid": b64(secret_id)}}, manager="kubectl")
    k.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": name, "namespace": NS},
             "spec": {"image": "registry.example.com/agents/echo@sha256:" + "cd" * 32,
                      "model": {"provider": "openai", "name": "gpt-4o-mini"}, "budgetRef": {"name": "team"},
                      "credentials": {"vault": {"address": bao.addr, "path": KV_PATH, "key": "api-key",
                                                "auth": "appRole", "refreshSeconds": 1,
                                                "appRole": {"secretName": "bot-approle", "secretIdKey": "sid"}}}}},
            manager="kubectl")
    pods = Pods(vaulted["work"], standin, vaulted["upstream"], vaulted["admin_port"], name=name)
    try:
        urls = wait_for("the AppRole pod's sidecar", lambda: pods.sync(), seconds=60)
        pod = k.list("v1", "pods", NS, labelSelector=f"soma.dev/agent={name}")["items"][0]
        spec = pod["spec"]
        assert "vault-token" not in [v["name"] for v in spec["volumes"]], "AppRole needs no service-account token"
        agent = next(c for c in spec["containers"] if c["name"] == "agent")
        assert all(m["name"] != "vault-approle" for m in agent.get("volumeMounts", [])), agent
        assert "bot-approle" not in json.dumps(agent), agent
        cm = json.dumps(k.get("v1", "configmaps", NS, f"{name}-sidecar"))
        assert secret_id not in cm and role_id not in cm

        c = wait_for("CredentialsUnavailable=False", lambda: (c := condition(k.get(AGENTS, "agents", NS, name),
                                                                             "CredentialsUnavailable"))
                     .get("status") == "False" and c, seconds=60)
        assert c["reason"] == "CredentialsAvailable", c
        assert chat(urls[0]).status_code == 200
        logs = pods.logs()
        assert "logged in to Vault" in logs and "appRole" in logs, logs
        for secret in (secret_id, KEY):
            assert secret not in logs
            assert secret not in json.dumps(k.get(AGENTS, "agents", NS, name))
            assert secret not in vaulted["operator"].log_tail(2000)
    finally:
        pods.stop()
