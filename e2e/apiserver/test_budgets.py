"""The Budget controller over HTTP: the real operator binary against the API stand-in, and (with
a ledger) real `soma-proxy` sidecars delivering to a real PostgreSQL started by the harness.

    pytest ──▶ soma_apiserver.py ◀──HTTP── soma-operator run --ledger-url ──▶ PostgreSQL ◀── soma-proxy ──▶ soma-fake-upstream
                                                (Budget status, seals,          (live definitions,    (started from the ConfigMap
                                                 live definitions)               usage records)        the operator wrote)

Without a ledger: a Budget gets its period and `NoLedger`, an Agent says its Budget is enforced
per replica, an Agent waiting for a missing parent Budget starts the moment the parent appears,
a parent in another namespace is refused until it grants the child's namespace, and a quiet
period makes no writes. With a ledger: spend from real sidecar traffic reaches Budget status,
each threshold raises one Warning Event, exhaustion is reported, the Agent shows the share used,
the operator's metrics carry namespace and budget labels, the window is sealed and `soma audit
verify` accepts it with the published key, and the period rolls over at its boundary (the
operator's clock is moved with `--clock-offset-file`).

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN and SOMA_CLI_BIN.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import re
import subprocess
import time
from typing import Any, Iterator

import pytest
import requests

from harness import REPO, StandIn, stop_process, wait_for
from servers import Postgres
from test_convergence import AGENTS, Operator, agent_state, delta, write_counts

PROXY = os.environ.get("SOMA_PROXY_BIN", "")
UPSTREAM = os.environ.get("SOMA_FAKE_UPSTREAM_BIN", "")
CLI = os.environ.get("SOMA_CLI_BIN", "")
pytestmark = pytest.mark.skipif(
    not all(b and os.access(b, os.X_OK) for b in (os.environ.get("SOMA_OPERATOR_BIN", ""), PROXY, UPSTREAM, CLI)),
    reason="SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN and SOMA_CLI_BIN must be executables")

KEY = "sk-budget-e2e-77c1"
TOKEN = "pod-uid-budget-e2e"


def budget(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    body = {"limits": {"costMicros": 500_000_000}, "period": {"calendar": "month", "timeZone": "UTC"}}
    body.update(spec)
    return {"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": name, "namespace": ns}, "spec": body}


def agent(name: str, ns: str, budget_name: str) -> dict[str, Any]:
    return {"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": name, "namespace": ns},
            "spec": {"image": "registry.example.com/agents/echo@sha256:" + "cd" * 32,
                     "model": {"provider": "openai", "name": "gpt-4o-mini"},
                     "budgetRef": {"name": budget_name}}}


def wait_out_hour_end(within_s: float) -> None:
    """Sleeps past the end of the real hour when it is less than `within_s` away, so a step
    that must not see a period roll over (or must place the clock itself) runs clear of it."""
    left = 3600 - time.time() % 3600
    if left < within_s:
        time.sleep(left + 3)


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


def events(standin: StandIn, ns: str, name: str, reason: str) -> list[dict[str, Any]]:
    items = standin.kube.list("events.k8s.io/v1", "events", ns)["items"]
    return [e for e in items if e.get("regarding", {}).get("name") == name and e.get("reason") == reason]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StandIn, Operator]]:
    """A stand-in and an operator without a ledger."""
    work = tmp_path_factory.mktemp("budgets-plain")
    standin = StandIn(work, crds=REPO / "crds")
    operator = None
    try:
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-plain",
                            "--no-leader-election")
        yield standin, operator
    finally:
        if operator is not None:
            operator.stop()
        standin.stop()


def test_without_a_ledger_budgets_say_so_and_agents_say_the_consequence(plain: tuple[StandIn, Operator]) -> None:
    standin, operator = plain
    k = standin.kube
    k.ensure_namespace("plain")
    k.apply(budget("team", "plain"), manager="kubectl")
    k.apply(agent("bot", "plain", "team"), manager="kubectl")
    b = wait_for("the Budget's status", lambda: (x := k.get(AGENTS, "budgets", "plain", "team")).get("status")
                 and condition(x, "Ready").get("reason") == "NoLedger" and x, seconds=60)
    s = b["status"]
    now = dt.datetime.now(dt.timezone.utc)
    assert s["periodStart"] == f"{now.year:04d}-{now.month:02d}-01T00:00:00+00:00", s
    assert s["spendSource"] == "None" and s["periodLabel"] == "month (UTC)", s
    assert s["observedGeneration"] == b["metadata"]["generation"]
    assert condition(b, "Exhausted")["status"] == "False"
    a = wait_for("the Agent's BudgetScope", lambda: condition(k.get(AGENTS, "agents", "plain", "bot"),
                                                              "BudgetScope") or None, seconds=60)
    assert (a["status"], a["reason"]) == ("False", "PerReplica"), a
    assert "N times its caps" in a["message"], a
    wait_for("the Budget to list its Agent",
             lambda: k.get(AGENTS, "budgets", "plain", "team")["status"].get("agents") == ["plain/bot"], seconds=30)
    # Converged: a quiet period writes nothing.
    wait_for("the Agent to converge", lambda: agent_state(standin, "plain").get("bot") == "ok", seconds=60)
    time.sleep(2)
    before = standin.stats()
    time.sleep(6)
    quiet = delta(write_counts(standin.stats(), "plain"), write_counts(before, "plain"))
    assert not quiet, f"writes during a quiet period: {quiet}"


def test_an_agent_waiting_for_a_missing_parent_starts_when_it_appears(plain: tuple[StandIn, Operator]) -> None:
    standin, operator = plain
    k = standin.kube
    k.ensure_namespace("later")
    k.apply(budget("team", "later", parentRef={"name": "tenant"}), manager="kubectl")
    k.apply(agent("bot", "later", "team"), manager="kubectl")
    ready = wait_for("BudgetNotFound", lambda: (c := condition(k.get(AGENTS, "agents", "later", "bot"), "Ready"))
                     and c.get("reason") == "BudgetNotFound" and c, seconds=60)
    assert "spec.parentRef of Budget later/team" in ready["message"] and '"tenant"' in ready["message"], ready
    assert k.get_opt("apps/v1", "deployments", "later", "bot") is None, "nothing starts while a parent is missing"
    b = k.get(AGENTS, "budgets", "later", "team")
    wait_for("the child Budget's ParentNotFound", lambda: condition(
        k.get(AGENTS, "budgets", "later", "team"), "Ready").get("reason") == "ParentNotFound", seconds=30)
    # The parent appears: nothing else changes, and the Agent starts.
    k.apply(budget("tenant", "later"), manager="kubectl")
    wait_for("the Agent to start", lambda: agent_state(standin, "later").get("bot") == "ok", seconds=30)
    wait_for("the child Budget to be Ready", lambda: condition(
        k.get(AGENTS, "budgets", "later", "team"), "Ready").get("status") == "True", seconds=30)
    cm = k.get("v1", "configmaps", "later", "bot-sidecar")
    config = json.loads(cm["data"]["config.yaml"])
    assert [d["namespace"] + "/" + d["name"] for d in config["budgets"]] == ["later/team", "later/tenant"]
    assert b["metadata"]["uid"] == config["budgets"][0]["uid"]


def test_a_parent_in_another_namespace_must_grant_the_child(plain: tuple[StandIn, Operator]) -> None:
    standin, operator = plain
    k = standin.kube
    for ns in ("platform", "team-a"):
        k.ensure_namespace(ns)
    k.apply(budget("tenant", "platform"), manager="kubectl")
    k.apply(budget("team", "team-a", parentRef={"namespace": "platform", "name": "tenant"}), manager="kubectl")
    k.apply(agent("bot", "team-a", "team"), manager="kubectl")
    ready = wait_for("BudgetParentNotGranted", lambda: (c := condition(
        k.get(AGENTS, "agents", "team-a", "bot"), "Ready")) and c.get("reason") == "BudgetParentNotGranted" and c,
        seconds=60)
    assert "allowedChildNamespaces" in ready["message"] and '"team-a"' in ready["message"], ready
    wait_for("the child Budget's ParentNotGranted", lambda: condition(
        k.get(AGENTS, "budgets", "team-a", "team"), "Ready").get("reason") == "ParentNotGranted", seconds=30)
    assert k.get_opt("apps/v1", "deployments", "team-a", "bot") is None
    # The platform grants team-a: the Agent starts, charged to both Budgets.
    k.apply(budget("tenant", "platform", allowedChildNamespaces=["team-a"]), manager="kubectl")
    wait_for("the Agent to start", lambda: agent_state(standin, "team-a").get("bot") == "ok", seconds=30)
    wait_for("the tenant to list the Agent", lambda: k.get(AGENTS, "budgets", "platform", "tenant")["status"]
             .get("agents") == ["team-a/bot"], seconds=30)
    cm = json.loads(k.get("v1", "configmaps", "team-a", "bot-sidecar")["data"]["config.yaml"])
    assert [d["namespace"] + "/" + d["name"] for d in cm["budgets"]] == ["team-a/team", "platform/tenant"]


# --- with a ledger -----------------------------------------------------------------------------


def start_upstream(work: pathlib.Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([UPSTREAM, "--listen", "127.0.0.1:0", "--key", KEY],
                            stdout=subprocess.PIPE, stderr=open(work / "upstream.log", "wb"))
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on "), line
    return proc, "http://" + line.removeprefix("listening on ").strip()


def start_sidecar(work: pathlib.Path, config_map: dict[str, Any], upstream: str,
                  pg_url: str) -> tuple[subprocess.Popen[bytes], str]:
    """`soma-proxy` on the configuration the operator wrote into the Agent's ConfigMap, with the
    pod-only parts (ports, the key file, the outbox) pointed at this machine."""
    config = json.loads(config_map["data"]["config.yaml"])
    (work / "api-key").write_text(KEY)
    config.update(listen="127.0.0.1:0", adminListen="127.0.0.1:0", credentials={"file": str(work / "api-key")},
                  outboxPath=str(work / "outbox.db"), deliveryIntervalMs=100)
    config["provider"]["upstream"] = upstream
    path = work / "config.yaml"
    path.write_text(json.dumps(config))
    env = dict(os.environ, SOMA_POD_UID=TOKEN, SOMA_DATABASE_URL=pg_url, RUST_LOG="info")
    log = open(work / "sidecar.log", "wb")
    proc = subprocess.Popen([PROXY, "--config", str(path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    addr = wait_for("the sidecar to serve", lambda: (m := re.search(
        r'"proxy_addr":"([0-9.:]+)"', (work / "sidecar.log").read_text(errors="replace"))) and m.group(1),
        seconds=30)
    return proc, f"http://{addr}/v1/chat/completions"


def chat(url: str) -> requests.Response:
    body = {"model": "gpt-4o-mini", "max_tokens": 40, "messages": [{"role": "user", "content": "count to three"}]}
    return requests.post(url, json=body, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)


@pytest.fixture(scope="module")
def ledgered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A stand-in, a PostgreSQL, an operator with the ledger and a clock the test can move
    (`--clock-offset-file`), a fake provider."""
    work = tmp_path_factory.mktemp("budgets-ledger")
    standin = StandIn(work, crds=REPO / "crds")
    pg = operator = upstream = None
    try:
        pg = Postgres(work)
        (work / "clock").write_text("0")
        prices = work / "prices.yaml"
        prices.write_text("gpt-4o-mini: {inputPerMTok: 150000, outputPerMTok: 600000}\n")
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-ledger",
                            "--no-leader-election", "--ledger-url", pg.url, "--budget-refresh-seconds", "1",
                            "--prices-file", str(prices), "--clock-offset-file", str(work / "clock"))
        upstream, upstream_url = start_upstream(work)
        yield {"standin": standin, "pg": pg, "operator": operator, "upstream": upstream_url, "work": work}
    finally:
        for p in (operator,):
            if p is not None:
                p.stop()
        if upstream is not None:
            stop_process(upstream)
        if pg is not None:
            pg.stop()
        standin.stop()


def test_spend_from_real_sidecars_reaches_status_events_metrics_and_the_audit(ledgered: dict[str, Any]) -> None:
    standin, pg, operator = ledgered["standin"], ledgered["pg"], ledgered["operator"]
    k = standin.kube
    k.ensure_namespace("metered")
    # About 30 requests of gpt-4o-mini fit; thresholds at 40% and 80%.
    k.apply(budget("team", "metered", limits={"costMicros": 1_000}, thresholds=[40, 80],
                   period={"calendar": "hour", "timeZone": "UTC"}), manager="kubectl")
    k.apply(agent("bot", "metered", "team"), manager="kubectl")
    scope = wait_for("BudgetScope=True", lambda: (c := condition(k.get(AGENTS, "agents", "metered", "bot"),
                                                                 "BudgetScope")) and c.get("status") == "True" and c,
                     seconds=60)
    assert scope["reason"] == "ClusterWide"
    secret = wait_for("the ledger Secret", lambda: k.get_opt("v1", "secrets", "metered", "bot-ledger"), seconds=30)
    assert "database-url" in secret["data"]
    cm = wait_for("the sidecar ConfigMap", lambda: k.get_opt("v1", "configmaps", "metered", "bot-sidecar"), seconds=30)
    config = json.loads(cm["data"]["config.yaml"])
    assert config["authority"] == {"postgres": {"leaseTtlMs": 30000}} and config["databaseUrlEnv"] == "SOMA_DATABASE_URL"
    assert "postgres://" not in cm["data"]["config.yaml"], "no URL (and so no password) in the ConfigMap"
    # The operator published the live definition the sidecars follow.
    wait_for("the live definition", lambda: pg.sql(
        "SELECT generation FROM soma_budgets WHERE namespace = 'metered' AND name = 'team'") == "1", seconds=30)

    work = ledgered["work"] / "metered"
    work.mkdir()
    sidecar, url = start_sidecar(work, cm, ledgered["upstream"], pg.url)
    try:
        ok = refused = 0
        while refused == 0:
            r = chat(url)
            if r.status_code == 200:
                ok += 1
            else:
                assert r.status_code == 429, r.text
                assert r.json()["soma_budget"]["budget"] == "metered/team"
                refused += 1
            assert ok < 500, "the Budget never refused"
        b = wait_for("Exhausted in status", lambda: (x := k.get(AGENTS, "budgets", "metered", "team"))
                     and condition(x, "Exhausted").get("status") == "True" and x, seconds=60)
    finally:
        stop_process(sidecar)
    s = b["status"]
    assert s["spendSource"] == "Ledger" and s["requests"] == ok, s
    spent = int(pg.sql("SELECT COALESCE(SUM(cost_micros), 0) FROM usage_records"))
    assert s["spentMicros"] == spent and spent <= 1_000, s
    assert s["thresholdsReached"] == [40, 80] and s["refusals"] >= 1, s
    assert condition(b, "ThresholdReached")["reason"] == "Threshold80"
    for reason, n in (("BudgetThreshold", 2), ("BudgetExhausted", 1)):
        deadline = time.monotonic() + 30
        while len(got := events(standin, "metered", "team", reason)) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        all_events = [(e.get("reason"), e.get("note")) for e in standin.kube.list(
            "events.k8s.io/v1", "events", "metered")["items"]]
        assert len(got) == n, f"{reason}: one Event per threshold per period, got {all_events}"
    wait_for("the Agent's share used", lambda: (k.get(AGENTS, "agents", "metered", "bot")["status"]
                                                .get("budgetUsed") or "").endswith("%"), seconds=30)
    metrics = operator.metrics()
    for name in ("soma_budget_used_ratio", "soma_budget_spent_micros", "soma_budget_refusals_total"):
        assert re.search(name + r'\{namespace="metered",budget="team"\} ', metrics), (name, metrics[-2000:])

    # The window is sealed; the auditor verifies it with the key the operator published.
    wait_for("a seal", lambda: int(pg.sql("SELECT COUNT(*) FROM ledger_seals")) > 0, seconds=30)
    public = k.get("v1", "configmaps", "default", "soma-ledger-seal-key")["data"]["public-key"]
    out = subprocess.run([CLI, "audit", "verify", "--budget", "metered/team", "--seal-public-key", public,
                          "--database-url", pg.url], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "intact" in out.stdout, out.stdout

    # Quiet: no traffic, no writes. The Budget's period is the calendar hour, so a real hour's
    # end inside the window would (rightly) start a new period and write its status.
    wait_out_hour_end(within_s=30)
    time.sleep(2)
    before = standin.stats()
    time.sleep(4)
    quiet = delta(write_counts(standin.stats(), "metered"), write_counts(before, "metered"))
    assert not quiet, f"writes during a quiet period: {quiet}"

    # The operator's clock is moved to 5 s before the end of the hour, and a delivery wakes the
    # Budget: it schedules its next reconcile at the period's end and starts a new period then.
    wait_out_hour_end(within_s=20)
    (ledgered["work"] / "clock").write_text(str(int((3600 - time.time() % 3600 - 5) * 1000)))
    uid = b["metadata"]["uid"]
    pg.sql(f"NOTIFY soma_usage, 'metered/team@{uid}'")
    wait_for("the period to roll over", lambda: (x := k.get(AGENTS, "budgets", "metered", "team")["status"])
             and x["periodStart"] != s["periodStart"] and x, seconds=30)
    rolled = k.get(AGENTS, "budgets", "metered", "team")
    r = rolled["status"]
    assert r["spentMicros"] == 0 and r.get("thresholdsReached", []) == [], r
    assert condition(rolled, "Exhausted")["status"] == "False"
    assert r["periodStart"] == s["periodEnd"], (r, s)
