"""The platform team's dashboards and alerts, run against a real Prometheus (Debian's) scraping a
real operator and real sidecars under traffic.

    pytest ──▶ soma_apiserver.py ◀── soma-operator run --ledger-url ──▶ PostgreSQL ◀── soma-proxy ×2 ──▶ soma-fake-upstream
                                          ▲ /metrics (job soma-operator)                 ▲ /metrics (job soma-proxy,
                                          └────────────── prometheus (1 s scrapes, ────────┘  labels as the PodMonitor's)
                                                           the chart's rules file loaded)

What happens: two Agents' sidecars take traffic until their Budgets refuse and brown out; a
Budget edit reaches the running sidecar; a signed and a tampered ConfigMap Capsule and a Capsule
in a registry that does not answer are verified; an Agent whose name is too long for a label fails
to apply; AdmissionReviews are denied and a malformed one refused; a policy ConfigMap breaks; the
ledger's PostgreSQL goes away for a few seconds while a Budget is edited; the provider cuts a
stream and ends another with an error event. Then every panel query of every dashboard the chart
ships (Grafana variables as "All") and every variable query must return data (but the few in
EMPTY_HERE), and every alert expression must parse, and return data where the scenario made its
condition hold; last the operator and a sidecar stop and the "down" alerts must hold.

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN, SOMA_PROMETHEUS and SOMA_COSIGN
(scripts/test exports them); a missing one fails.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import time
import warnings
from typing import Any, Iterator

import pytest
import requests
import yaml

import signing
from harness import REPO, StandIn, free_port, stop_process, wait_for
from servers import Postgres
from test_budgets import UPSTREAM, agent, budget, chat, start_sidecar, start_upstream
from test_jobs import job
from test_convergence import AGENTS, Operator

PROMETHEUS = os.environ.get("SOMA_PROMETHEUS", "")
RULES = REPO / "charts" / "soma" / "rules" / "soma.rules.yaml"
DASHBOARDS = sorted((REPO / "charts" / "soma" / "dashboards").glob("*.json"))
OPERATOR_NS = "default"  # the operator's POD_NAMESPACE in these tests
# Grafana's variables, as "All" and as the range a dashboard shows.
GRAFANA = {"$__rate_interval": "1m", "$__range": "10m", "$__interval": "15s"}
# Alerts whose condition this scenario makes hold (the rest must parse and are unit-tested by
# charts/tests/rules/soma.rules.test.yaml).
HOLDS = {"SomaBudgetThresholdReached", "SomaBudgetExhausted", "SomaSidecarLedgerUnreachable",
         "SomaOperatorLedgerErrors", "SomaSignatureRejected", "SomaSignatureVerificationErrors",
         "SomaReconcileErrors", "SomaPolicyLoadErrors", "SomaSidecarStreamsFailing", "SomaJobsFailing"}
# Panels that show only what this scenario cannot cause, by title, with the reason. Their queries
# must run, and every metric they read must be in the sidecar's or the operator's metrics table
# (docs/sidecar.md, docs/observability.md), so that a misspelt name cannot hide here; but they may
# be empty. (/metrics cannot vouch for them: prometheus-client leaves out a family that has no
# series yet.)
EMPTY_HERE = {
    "Unmetered usage fields (range)": "soma-fake-upstream reports no usage field the sidecar does not meter",
    # A drill needs pg_dump, psql and a scratch database: test_jobs.py runs real drills and reads
    # these series from the operator's /metrics.
    "DR drills passing": "no DR drill runs in this scenario",
    "DR drill recovery point and time": "no DR drill runs in this scenario",
    "Records restored by the last drill": "no DR drill runs in this scenario",
    # The scaling loop needs pods whose sidecars answer GET /load on their own pod IP (the
    # stand-in's --deployment-pods): test_scaling.py runs it and reads these series from the
    # operator's /metrics.
    "Desired replicas by Agent": "no Agent autoscales in this scenario",
    "Conductance by Agent": "no Agent autoscales in this scenario",
    "Autoscaler decisions per minute": "no Agent autoscales in this scenario",
    "Brown-out by Agent": "no Agent autoscales in this scenario",
}
HOLDS_WHEN_DOWN = {"SomaOperatorDown", "SomaSidecarDown"}
# 64 characters: a valid Agent name, too long for the label values its children carry.
LONG_NAME = "a-very-long-agent-name-that-no-label-value-can-hold-0123456789abc"

pytestmark = pytest.mark.skipif(
    not all(os.access(b, os.X_OK) for b in (os.environ.get("SOMA_OPERATOR_BIN", "") or "/nonexistent",
                                            os.environ.get("SOMA_PROXY_BIN", "") or "/nonexistent",
                                            UPSTREAM or "/nonexistent")),
    reason="SOMA_OPERATOR_BIN, SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN must be executables")


class Prometheus:
    """Debian's prometheus on 127.0.0.1, storage in `work`, stopped by PID."""

    def __init__(self, work: pathlib.Path, config: dict[str, Any]):
        assert PROMETHEUS and os.access(PROMETHEUS, os.X_OK), \
            "SOMA_PROMETHEUS is not an executable: run scripts/test-deps/platform-tools.sh"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = work / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = open(work / "prometheus.log", "wb")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=work)
        wait_for("Prometheus ready", lambda: self._ready(), seconds=30)

    def _ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            assert self.proc is not None and self.proc.poll() is None, "prometheus exited"
            return False

    def query(self, promql: str) -> dict[str, Any]:
        """An instant query: the API's answer (status, data or error)."""
        return requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=30).json()

    def label_values(self, label: str, match: str) -> list[str]:
        answer = requests.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=30).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def targets_up(self) -> dict[str, int]:
        answer = requests.get(f"{self.url}/api/v1/targets", timeout=10).json()
        up: dict[str, int] = {}
        for t in answer["data"]["activeTargets"]:
            up[t["labels"]["job"]] = up.get(t["labels"]["job"], 0) + (t["health"] == "up")
        return up

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        self.log.close()


def grafana(expr: str) -> str:
    """A panel's query as Grafana sends it with every variable on "All"."""
    for var, value in GRAFANA.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[a-z]+\}?", ".*", expr)


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])


def sidecar_target(name: str, namespace: str, admin: str) -> dict[str, Any]:
    """A static target labelled as the chart's PodMonitor labels a sidecar's."""
    return {"targets": [admin], "labels": {"namespace": namespace, "pod": f"{name}-0", "agent": name,
                                           "container": "soma-proxy"}}


def documented_sidecar_metrics() -> set[str]:
    """The metrics in the sidecar's metrics table (docs/sidecar.md, "Metrics and traces")."""
    text = (REPO / "docs" / "sidecar.md").read_text()
    names = set(re.findall(r"^\| `(soma_proxy_\w+)`", text, re.M))
    assert "soma_proxy_requests_total" in names, "docs/sidecar.md has no metrics table"
    return names


def documented_operator_metrics() -> set[str]:
    """The metrics in the operator's metrics table (docs/observability.md, "Metrics")."""
    text = (REPO / "docs" / "observability.md").read_text()
    names = {n for row in re.findall(r"^\| (`soma_\w+`(?:, `soma_\w+`)*) \|", text, re.M)
             for n in re.findall(r"soma_\w+", row)}
    assert "soma_reconcile_total" in names, "docs/observability.md has no metrics table"
    return names


def admin_address(work: pathlib.Path) -> str:
    return wait_for("the sidecar's admin address", lambda: (m := re.search(
        r'"admin_addr":"([0-9.:]+)"', (work / "sidecar.log").read_text(errors="replace"))) and m.group(1), seconds=30)


def review(port: int, body: bytes) -> requests.Response:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test's own unverified HTTPS (the certificate names the Service)
        return requests.post(f"https://127.0.0.1:{port}/validate", data=body, verify=False, timeout=10,
                             headers={"Content-Type": "application/json"})


def admission_review(obj: dict[str, Any]) -> bytes:
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "8f0e2a5c-0000-4000-8000-000000000001",
        "kind": {"group": "soma.dev", "version": "v1alpha1", "kind": obj["kind"]},
        "resource": {"group": "soma.dev", "version": "v1alpha1", "resource": obj["kind"].lower() + "s"},
        "namespace": obj["metadata"]["namespace"], "name": obj["metadata"]["name"], "operation": "CREATE",
        "userInfo": {"username": "e2e"}, "object": obj, "dryRun": False}}).encode()


def capsule_from_config_map(name: str, ns: str, config_map: str, content: str) -> dict[str, Any]:
    return {"apiVersion": AGENTS, "kind": "Capsule", "metadata": {"name": name, "namespace": ns},
            "spec": {"version": "1", "policyHash": "sha256:" + "9b" * 32,
                     "source": {"configMapRef": {"name": config_map, "key": "blocks.json",
                                                 "digest": signing.sha256(content)}},
                     "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}}}


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tools = signing.tools()
    assert tools is not None, "SOMA_COSIGN, SOMA_ORAS and SOMA_REGISTRY must be set (scripts/test-deps/signing-tools.sh)"
    work = tmp_path_factory.mktemp("prometheus")
    dead_registry = f"127.0.0.1:{free_port()}"  # nothing listens: signature checks there fail
    standin = StandIn(work, crds=REPO / "crds")
    pg = operator = upstream = prom = None
    sidecars: dict[str, subprocess.Popen[bytes]] = {}
    try:
        pg = Postgres(work)
        prices = work / "prices.yaml"
        prices.write_text("gpt-4o-mini: {inputPerMTok: 150000, outputPerMTok: 600000}\n"
                          "gpt-4o-nano: {inputPerMTok: 50000, outputPerMTok: 200000}\n")
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-prom",
                            "--no-leader-election", "--ledger-url", pg.url, "--budget-refresh-seconds", "1",
                            "--prices-file", str(prices), "--insecure-registries", dead_registry)
        upstream, upstream_url = start_upstream(work)
        k = standin.kube
        for ns in ("obs-a", "obs-b"):
            k.ensure_namespace(ns)
        # obs-a: team (small cost cap) under tenant (large, warns at 1%): tenant passes a
        # threshold without being exhausted. obs-b: a Budget that browns out to a cheaper model.
        k.apply(budget("tenant", "obs-a", limits={"costMicros": 20_000, "tokens": 50_000_000},
                       thresholds=[1, 90], period={"calendar": "day", "timeZone": "UTC"}), manager="kubectl")
        k.apply(budget("team", "obs-a", parentRef={"name": "tenant"}, limits={"costMicros": 600, "tokens": 1_000_000},
                       thresholds=[50, 80], period={"calendar": "day", "timeZone": "UTC"}), manager="kubectl")
        k.apply(budget("brown", "obs-b", limits={"costMicros": 300}, period={"calendar": "day", "timeZone": "UTC"},
                       onExhausted={"action": "BrownOut", "brownOutModel": "gpt-4o-nano"}), manager="kubectl")
        k.apply(agent("bot", "obs-a", "team"), manager="kubectl")
        k.apply(agent("helper", "obs-b", "brown"), manager="kubectl")
        long = agent(LONG_NAME, "obs-a", "team")
        long["spec"]["port"] = 8080
        k.apply(long, manager="kubectl")
        targets = []
        for name, ns in (("bot", "obs-a"), ("helper", "obs-b")):
            cm = wait_for(f"{ns}/{name}'s sidecar ConfigMap",
                          lambda: k.get_opt("v1", "configmaps", ns, f"{name}-sidecar"), seconds=60)
            wait_for(f"{ns}/{name}'s live Budget", lambda: pg.sql(
                f"SELECT count(*) FROM soma_budgets WHERE namespace = '{ns}'") != "0", seconds=30)
            side = work / name
            side.mkdir()
            # A 3 s lease: heartbeats every second, so an outage of a few seconds shows.
            config = json.loads(cm["data"]["config.yaml"])
            config["authority"]["postgres"]["leaseTtlMs"] = 3000
            cm = {"data": {"config.yaml": json.dumps(config)}}
            proc, url = start_sidecar(side, cm, upstream_url, pg.url)
            sidecars[name] = proc
            targets.append((name, ns, url, admin_address(side)))
        prom = Prometheus(work, {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "soma-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator.port}"]}]},
                {"job_name": "soma-proxy", "honor_labels": True,
                 "static_configs": [sidecar_target(n, ns, admin) for n, ns, _, admin in targets]},
            ]})
        wait_for("every target up", lambda: prom.targets_up() == {"soma-operator": 1, "soma-proxy": 2}, seconds=30)
        yield {"work": work, "standin": standin, "pg": pg, "operator": operator, "prom": prom, "tools": tools,
               "targets": targets, "sidecars": sidecars, "dead_registry": dead_registry}
    finally:
        for p in sidecars.values():
            stop_process(p)
        if prom is not None:
            prom.stop()
        if operator is not None and operator.proc is not None:
            operator.stop()
        if upstream is not None:
            stop_process(upstream)
        if pg is not None:
            pg.stop()
        standin.stop()


def drive(env: dict[str, Any]) -> None:
    """Everything the dashboards and alerts should see."""
    k, pg, operator = env["standin"].kube, env["pg"], env["operator"]
    (bot, _, bot_url, bot_admin), (helper, _, helper_url, _) = env["targets"]
    token = {"authorization": "Bearer pod-uid-budget-e2e"}
    # Traffic: plain calls until team refuses; a stream, two streams the provider fails after the
    # 200, a call without usage (estimated) and a provider error on the way; the brown-out Budget
    # until calls are browned out.
    statuses: dict[int, int] = {}
    for i in range(400):
        r = chat(bot_url)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if i == 3:
            stream = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
                      "max_tokens": 20, "messages": [{"role": "user", "content": "stream please"}]}
            assert requests.post(bot_url, json=stream, headers=token, timeout=30).status_code == 200
            for scenario in ("SCENARIO:cut", "SCENARIO:error-mid-stream"):
                failing = {**stream, "messages": [{"role": "user", "content": scenario}]}
                try:
                    requests.post(bot_url, json=failing, headers=token, timeout=30)
                except requests.exceptions.ChunkedEncodingError:
                    pass  # the cut reaches the client as a body that breaks off
            wait_for("the two stream failures counted", lambda: all(
                f'soma_proxy_errors_total{{reason="{r}"}} 1' in requests.get(
                    f"http://{bot_admin}/metrics", timeout=5).text for r in ("stream_cut", "stream_error_event")),
                seconds=30)
            for scenario in ("SCENARIO:no-usage", "SCENARIO:error-500"):
                requests.post(bot_url, json={"model": "gpt-4o-mini", "max_tokens": 8,
                                             "messages": [{"role": "user", "content": scenario}]},
                              headers=token, timeout=30)
        if statuses.get(429, 0) >= 3:
            break
    assert statuses.get(429, 0) >= 3, f"team never refused: {statuses}"
    for i in range(200):
        chat(helper_url)
        if i % 10 == 9 and ((k.get(AGENTS, "budgets", "obs-b", "brown").get("status") or {}).get("brownOuts") or 0):
            break
    wait_for("brown-outs counted", lambda: re.search(
        r'soma_budget_brownouts_total\{namespace="obs-b",budget="brown"\} [1-9]', operator.metrics()), seconds=60)
    wait_for("team exhausted", lambda: 'soma_budget_exhausted{namespace="obs-a",budget="team"} 1'
             in operator.metrics(), seconds=60)
    # A live edit of a Budget reaches the running sidecar (raising the token cap changes nothing
    # else: team stays exhausted by its cost cap).
    k.apply(budget("team", "obs-a", parentRef={"name": "tenant"}, limits={"costMicros": 600, "tokens": 2_000_000},
                   thresholds=[50, 80], period={"calendar": "day", "timeZone": "UTC"}), manager="kubectl")
    wait_for("a live update applied by the sidecar", lambda: 'outcome="applied"' in requests.get(
        f"http://{bot_admin}/metrics", timeout=5).text, seconds=60)

    # Signatures: a signed ConfigMap Capsule, one whose content was swapped after signing, and
    # one in a registry that does not answer.
    w = signing.Workdir(env["tools"], env["work"] / "cosign")
    pem = w.key_pair("signers")
    k.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "signers", "namespace": "obs-a"},
             "data": {"cosign.pub": pem}}, manager="kubectl")
    content = '[{"text": "refunds take 5 days"}]'
    sig = w.sign_blob("signers", content, "kb.json")
    k.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kb", "namespace": "obs-a"},
             "data": {"blocks.json": content, "blocks.json.sig": sig}}, manager="kubectl")
    tampered = '[{"text": "refunds take 50 days"}]'
    k.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kb-tampered", "namespace": "obs-a"},
             "data": {"blocks.json": tampered, "blocks.json.sig": sig}}, manager="kubectl")
    k.apply(capsule_from_config_map("kb", "obs-a", "kb", content), manager="kubectl")
    k.apply(capsule_from_config_map("kb-tampered", "obs-a", "kb-tampered", tampered), manager="kubectl")
    unreachable = capsule_from_config_map("kb-unreachable", "obs-a", "unused", content)
    unreachable["spec"]["source"] = {"oci": {"repository": f"{env['dead_registry']}/capsules/kb",
                                             "digest": "sha256:" + "ab" * 32}}
    k.apply(unreachable, manager="kubectl")
    outcomes = ('outcome="verified"', 'outcome="rejected"', 'outcome="error"', "soma_signature_rejected{")
    deadline = time.monotonic() + 60
    while not all(s in operator.metrics() for s in outcomes):
        if time.monotonic() > deadline:
            capsules = {c["metadata"]["name"]: (c.get("status") or {}).get("conditions")
                        for c in k.list(AGENTS, "capsules", "obs-a")["items"]}
            signatures = [line for line in operator.metrics().splitlines() if "signature" in line]
            pytest.fail(f"signature outcomes missing: {signatures}\ncapsules: {capsules}\n{operator.log_tail(20)}")
        time.sleep(0.2)

    # Admission: a denial (an image without a digest), a malformed review; a broken policy.
    denied = agent("no-digest", "obs-a", "team")
    denied["spec"]["image"] = "registry.example.com/agents/echo:latest"
    answer = review(operator.webhook_port, admission_review(denied)).json()
    assert answer["response"]["allowed"] is False, answer
    assert review(operator.webhook_port, b"not json").status_code == 400
    k.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "broken-policy", "namespace": OPERATOR_NS, "labels": {"soma.dev/policy": "true"}},
        "data": {"policy.yaml": "kind: [unclosed"}}, manager="kubectl")
    wait_for("a policy load error", lambda: re.search(
        r'soma_policy_load_errors_total\{reason="InvalidPolicyDocument"\} [1-9]', operator.metrics()), seconds=60)
    wait_for("the long-named Agent's reconcile failure", lambda: "soma_reconcile_failures_total{" in operator.metrics(),
             seconds=60)

    # Jobs: one that fails in obs-c, after its namespace's counters were scraped at 0.
    k.ensure_namespace("obs-c")
    k.apply(budget("batch", "obs-c", limits={"costMicros": 1_000_000}, period={"calendar": "day", "timeZone": "UTC"}),
            manager="kubectl")
    k.apply(agent("bot", "obs-c", "batch"), manager="kubectl")
    k.apply(job("broken", "obs-c"), manager="kubectl")
    prom = env["prom"]
    wait_for("obs-c's finished-Jobs counters scraped at 0", lambda: len(prom.query(
        'soma_jobs_finished_total{namespace="obs-c"} == 0')["data"]["result"]) == 2, seconds=60)
    wait_for("the Job's batch/v1 Job", lambda: k.get_opt("batch/v1", "jobs", "obs-c", "broken"), seconds=60)
    r = requests.post(f"{env['standin'].url}/_jobs/obs-c/broken", json={"attempts": [{"exit": 1, "message": "boom"}]},
                      timeout=10)
    assert r.status_code == 200, r.text
    wait_for("the failed Job counted", lambda: 'soma_jobs_finished_total{namespace="obs-c",phase="Failed"} 1'
             in operator.metrics(), seconds=60)

    # The ledger goes away for a few seconds; a Budget edited meanwhile cannot be read.
    pg.interrupt()
    try:
        k.apply(budget("tenant", "obs-a", limits={"costMicros": 20_000, "tokens": 60_000_000},
                       thresholds=[1, 90], period={"calendar": "day", "timeZone": "UTC"}), manager="kubectl")
        # Twice (the Budget is retried with backoff): a counter's first sample is where its rate starts.
        wait_for("two of the operator's ledger errors", lambda: re.search(
            r'soma_ledger_errors_total\{operation="read"\} ([2-9]|\d\d)', operator.metrics()), seconds=60)
        # Twice: a counter's first sample is where its rate starts.
        wait_for("two failed ledger transactions of a sidecar", lambda: re.search(
            r'soma_proxy_budget_lease_transactions_total\{kind="heartbeat",outcome="failed"\} ([2-9]|\d\d)',
            requests.get(f"http://{bot_admin}/metrics", timeout=5).text), seconds=60)
        time.sleep(2)  # scraped
    finally:
        pg.start()
    # More traffic after the outage, so latency panels have recent observations.
    for _ in range(5):
        chat(bot_url)
        chat(helper_url)
    time.sleep(4)  # a few scrapes of everything


def test_every_panel_and_alert_runs_against_real_metrics(observed: dict[str, Any]) -> None:
    prom = observed["prom"]
    drive(observed)
    assert DASHBOARDS, "the chart ships no dashboards"
    empty, failed, allowed, ran = [], [], [], 0
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
            assert m, f"{path.name}: variable {var['name']}: {var['query']['query']}"
            values = prom.label_values(m.group(2), grafana(m.group(1)))
            ran += 1
            if not values:
                empty.append(f"{path.name} variable ${var['name']}: {var['query']['query']}")
        for panel in panels(board):
            for target in panel.get("targets", []):
                expr = grafana(target["expr"])
                answer = prom.query(expr)
                ran += 1
                if answer["status"] != "success":
                    failed.append(f"{path.name} / {panel['title']}: {answer.get('error')}: {expr}")
                elif not answer["data"]["result"]:
                    if panel["title"] in EMPTY_HERE:
                        allowed.append((f"{path.name} / {panel['title']}", expr))
                    else:
                        empty.append(f"{path.name} / {panel['title']}: {expr}")
    assert not failed, "panel queries Prometheus refused:\n" + "\n".join(failed)
    assert not empty, "panel queries that returned no data:\n" + "\n".join(empty)
    titles = {p.get("title") for path in DASHBOARDS for p in panels(json.loads(path.read_text()))}
    assert set(EMPTY_HERE) <= titles, f"EMPTY_HERE names panels no dashboard has: {set(EMPTY_HERE) - titles}"
    documented = documented_sidecar_metrics() | documented_operator_metrics()
    for where, expr in allowed:
        read = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bsoma_\w+", expr)}
        assert not read - documented, (f"{where} reads metrics neither docs/sidecar.md nor docs/observability.md "
                                       f"lists: {sorted(read - documented)}")
    print(f"{ran} dashboard queries ran, each with data but {len(allowed)} (EMPTY_HERE)")

    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    for name, expr in alerts.items():
        answer = prom.query(expr)
        assert answer["status"] == "success", (name, answer)
        if name in HOLDS:
            assert answer["data"]["result"], f"{name} does not hold, but the scenario made it: {expr}"
    # Prometheus evaluates the same rules file; it loaded it without errors.
    groups = requests.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(alerts) <= set(loaded), set(alerts) - set(loaded)
    assert all(r["health"] == "ok" for r in loaded.values()), [r for r in loaded.values() if r["health"] != "ok"]

    # The operator and one sidecar stop: the "down" alerts hold.
    operator = observed["operator"]
    operator.stop()
    stop_process(observed["sidecars"]["helper"])
    wait_for("the operator and a sidecar seen down", lambda: prom.targets_up() == {"soma-operator": 0, "soma-proxy": 1},
             seconds=30)
    for name in HOLDS_WHEN_DOWN:
        answer = prom.query(alerts[name])
        assert answer["status"] == "success" and answer["data"]["result"], (name, answer)
