"""The Job controller over HTTP: the real operator binary against the API stand-in, whose
batch/v1 Job emulation runs each attempt as a pod and ends it as the test plans it
(`POST /_jobs/NS/NAME`: exit code and termination message per attempt, or hang), unsuspends
Jobs as Kueue would (`POST /_kueue/NS/QUEUE/admit`), and fires CronJobs. With a ledger: real
`soma-proxy` sidecars started from the ConfigMaps the operator wrote, a real PostgreSQL and
nats-server, and the real `soma dr drill` run with the environment of the pod the operator
built.

    pytest ──▶ soma_apiserver.py (Jobs → pods → status) ◀──HTTP── soma-operator run
       │           ▲ plans, Kueue admission                          │ --ledger-url, --nats-url
       └─ soma-proxy (from sjob-<name>-sidecar) ──▶ PostgreSQL, NATS ◀┘
       └─ soma dr drill (with the drill pod's env) ──▶ its report, as the pod's termination message

Without a ledger: a task succeeds with its result, fails and retries, hits its deadline, is
created suspended with Kueue's label and runs once admitted, waits for a free slot in priority
order, is deleted after its TTL, waits for a missing Agent and starts when it appears, never
starts on an Agent a policy denies, and a quiet period makes no writes. With a ledger: the
run's tokens and cost come from the ledger, a run that exhausts its Budget fails saying so,
a drill's figures reach status (and a failed drill its discrepancy, a Warning Event and
`soma_drill_passed 0`), and a Job whose Budget is exhausted waits and starts when the period
resets (the operator's clock moved with `--clock-offset-file`).

Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN and SOMA_CLI_BIN.
"""

from __future__ import annotations

import base64
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
from servers import Nats, Postgres
from test_budgets import CLI, PROXY, UPSTREAM, agent, budget, chat, condition, start_sidecar, start_upstream
from test_convergence import AGENTS, Operator, delta, write_counts

pytestmark = pytest.mark.skipif(
    not all(b and os.access(b, os.X_OK) for b in (os.environ.get("SOMA_OPERATOR_BIN", ""), PROXY, UPSTREAM, CLI)),
    reason="SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN and SOMA_CLI_BIN must be executables")

TEST_NAMESPACES: list[str] = []


def job(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"agentRef": {"name": "bot"}, "input": f"task {name}", "deadlineSeconds": 300,
                            "retries": 0}
    body.update(spec)
    return {"apiVersion": AGENTS, "kind": "Job", "metadata": {"name": name, "namespace": ns}, "spec": body}


def namespace(standin: StandIn, ns: str, budget_spec: dict[str, Any] | None = None,
              image: str | None = None) -> None:
    """A namespace with Budget `team` and Agent `bot` charged to it."""
    k = standin.kube
    k.ensure_namespace(ns)
    TEST_NAMESPACES.append(ns)
    k.apply(budget("team", ns, **(budget_spec or {})), manager="kubectl")
    a = agent("bot", ns, "team")
    if image:
        a["spec"]["image"] = image
    k.apply(a, manager="kubectl")


def plan(standin: StandIn, ns: str, name: str, attempts: list[dict[str, Any]]) -> None:
    r = requests.post(f"{standin.url}/_jobs/{ns}/{name}", json={"attempts": attempts}, timeout=10)
    assert r.status_code == 200 and "planned" in r.json(), r.text


def sjob(standin: StandIn, ns: str, name: str) -> dict[str, Any] | None:
    return standin.kube.get_opt(AGENTS, "jobs", ns, name)


def phase(standin: StandIn, ns: str, name: str, want: str, seconds: float = 60) -> dict[str, Any]:
    return wait_for(f"Job {ns}/{name} in phase {want}", lambda: (j := sjob(standin, ns, name))
                    and (j.get("status") or {}).get("phase") == want and j, seconds=seconds)


def batch_job(standin: StandIn, ns: str, name: str) -> dict[str, Any]:
    return wait_for(f"batch/v1 Job {ns}/{name}", lambda: standin.kube.get_opt("batch/v1", "jobs", ns, name),
                    seconds=60)


def reasons(standin: StandIn, ns: str, name: str) -> list[tuple[str, str]]:
    items = standin.kube.list("events.k8s.io/v1", "events", ns)["items"]
    return [(e.get("type"), e.get("reason")) for e in items if e.get("regarding", {}).get("name") == name]


# --- without a ledger ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StandIn, Operator]]:
    work = tmp_path_factory.mktemp("jobs-plain")
    standin = StandIn(work, crds=REPO / "crds")
    operator = None
    try:
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-jobs",
                            "--no-leader-election", "--job-concurrency", "2")
        yield standin, operator
    finally:
        if operator is not None:
            operator.stop()
        standin.stop()


def test_a_task_runs_once_on_its_agent_and_reports_its_result(plain: tuple[StandIn, Operator]) -> None:
    standin, _ = plain
    k = standin.kube
    namespace(standin, "once")
    k.apply(job("answer", "once", input="What is 6 times 7?", retries=1), manager="kubectl")
    b = batch_job(standin, "once", "answer")
    assert (b["spec"]["backoffLimit"], b["spec"]["activeDeadlineSeconds"]) == (1, 300)
    owner = b["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["controller"]) == ("Job", True)
    pod = b["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["initContainers"][0]["name"] == "soma-proxy"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["SOMA_TASK_INPUT"] == "What is 6 times 7?"
    running = phase(standin, "once", "answer", "Running")
    assert condition(running, "Reconciling")["status"] == "True"
    # The stand-in ran the first attempt as a pod of the template.
    pods = wait_for("the first attempt's pod", lambda: k.list(
        "v1", "pods", "once", labelSelector="batch.kubernetes.io/job-name=answer")["items"], seconds=30)
    assert len(pods) == 1 and pods[0]["spec"]["containers"][0]["name"] == "agent"
    plan(standin, "once", "answer", [{"exit": 0, "message": "42"}])
    done = phase(standin, "once", "answer", "Succeeded")
    s = done["status"]
    assert s["result"] == "42" and s["attempts"] == 1, s
    assert s["observedGeneration"] == done["metadata"]["generation"]
    assert s["startTime"] and s["completionTime"], s
    assert condition(done, "Complete")["status"] == "True"
    assert (condition(done, "Ready")["status"], condition(done, "Ready")["reason"]) == ("True", "Succeeded")
    wait_for("the Events of each phase", lambda: {("Normal", "Running"), ("Normal", "Succeeded")}
             <= set(reasons(standin, "once", "answer")), seconds=30)


def test_a_failing_task_is_retried_then_fails_with_its_last_exit(plain: tuple[StandIn, Operator]) -> None:
    standin, _ = plain
    k = standin.kube
    namespace(standin, "retry")
    k.apply(job("flaky", "retry", retries=2), manager="kubectl")
    k.apply(job("broken", "retry", retries=2), manager="kubectl")
    plan(standin, "retry", "flaky", [{"exit": 1, "message": "upstream timed out"}, {"exit": 0, "message": "done"}])
    plan(standin, "retry", "broken", [{"exit": 1}, {"exit": 2}, {"exit": 3, "reason": "Error"}])
    ok = phase(standin, "retry", "flaky", "Succeeded")
    assert (ok["status"]["attempts"], ok["status"]["result"]) == (2, "done"), ok["status"]
    failed = phase(standin, "retry", "broken", "Failed")
    f = condition(failed, "Failed")
    assert (f["status"], f["reason"]) == ("True", "BackoffLimitExceeded"), f
    assert "all 3 attempt(s) failed (retries: 2); the last attempt ended with exit code 3 (Error)" in f["message"], f
    assert condition(failed, "Stalled")["status"] == "True"
    assert failed["status"]["attempts"] == 3
    wait_for("a Warning Event", lambda: ("Warning", "BackoffLimitExceeded") in reasons(standin, "retry", "broken"),
             seconds=30)


def test_a_task_that_runs_too_long_is_stopped_at_its_deadline(plain: tuple[StandIn, Operator]) -> None:
    standin, _ = plain
    namespace(standin, "slow")
    standin.kube.apply(job("endless", "slow", deadlineSeconds=2, retries=3), manager="kubectl")
    plan(standin, "slow", "endless", [{"hang": True}])
    failed = phase(standin, "slow", "endless", "Failed", seconds=30)
    f = condition(failed, "Failed")
    assert f["reason"] == "DeadlineExceeded" and "longer than deadlineSeconds" in f["message"], f
    assert not standin.kube.list("v1", "pods", "slow", labelSelector="batch.kubernetes.io/job-name=endless")["items"] \
        or all(p["status"]["phase"] != "Running" for p in standin.kube.list(
            "v1", "pods", "slow", labelSelector="batch.kubernetes.io/job-name=endless")["items"])


def test_a_task_with_a_kueue_queue_waits_suspended_until_kueue_admits_it(plain: tuple[StandIn, Operator]) -> None:
    standin, _ = plain
    k = standin.kube
    namespace(standin, "queued")
    k.apply(job("batch-1", "queued", queueName="team-a"), manager="kubectl")
    b = batch_job(standin, "queued", "batch-1")
    assert b["spec"]["suspend"] is True
    assert b["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    q = phase(standin, "queued", "batch-1", "Queued")
    assert 'Kueue queue "team-a"' in condition(q, "Ready")["message"]
    time.sleep(1)
    assert not k.list("v1", "pods", "queued")["items"], "nothing runs before Kueue admits it"
    r = requests.post(f"{standin.url}/_kueue/queued/team-a/admit", timeout=10)
    assert r.json()["admitted"] == ["batch-1"], r.text
    phase(standin, "queued", "batch-1", "Running")
    # The operator never takes `suspend` back from Kueue.
    assert k.get("batch/v1", "jobs", "queued", "batch-1")["spec"]["suspend"] is False
    plan(standin, "queued", "batch-1", [{"exit": 0, "message": "ok"}])
    phase(standin, "queued", "batch-1", "Succeeded")


def test_without_kueue_at_most_the_limit_run_and_the_highest_priority_goes_next(plain: tuple[StandIn, Operator]) -> None:
    standin, _ = plain
    k = standin.kube
    namespace(standin, "slots")
    for name in ("first", "second"):
        k.apply(job(name, "slots"), manager="kubectl")
        phase(standin, "slots", name, "Running")
    k.apply(job("low", "slots", priority=0), manager="kubectl")
    low = phase(standin, "slots", "low", "Waiting")
    assert condition(low, "Ready")["reason"] == "ConcurrencyLimit"
    assert "2 of 2 task Jobs run in namespace \"slots\"" in condition(low, "Ready")["message"]
    time.sleep(0.5)
    k.apply(job("high", "slots", priority=10), manager="kubectl")
    phase(standin, "slots", "high", "Waiting")
    assert k.get_opt("batch/v1", "jobs", "slots", "low") is None and k.get_opt("batch/v1", "jobs", "slots", "high") is None
    # A slot frees: the higher priority starts, though it came later.
    plan(standin, "slots", "first", [{"exit": 0}])
    phase(standin, "slots", "high", "Running")
    assert sjob(standin, "slots", "low")["status"]["phase"] == "Waiting"
    plan(standin, "slots", "second", [{"exit": 0}])
    phase(standin, "slots", "low", "Running")
    for name in ("high", "low"):
        plan(standin, "slots", name, [{"exit": 0}])
        phase(standin, "slots", name, "Succeeded")


def test_a_finished_job_is_deleted_after_its_ttl_with_its_children(plain: tuple[StandIn, Operator]) -> None:
    standin, _ = plain
    k = standin.kube
    namespace(standin, "ttl")
    k.apply(job("brief", "ttl", ttlSecondsAfterFinished=2), manager="kubectl")
    batch_job(standin, "ttl", "brief")
    plan(standin, "ttl", "brief", [{"exit": 0, "message": "bye"}])
    phase(standin, "ttl", "brief", "Succeeded")
    wait_for("the Job to be deleted", lambda: sjob(standin, "ttl", "brief") is None, seconds=30)
    wait_for("its batch/v1 Job, pods and children to go", lambda: k.get_opt("batch/v1", "jobs", "ttl", "brief") is None
             and not k.list("v1", "pods", "ttl")["items"]
             and k.get_opt("v1", "configmaps", "ttl", "sjob-brief-sidecar") is None, seconds=30)


def test_a_job_waits_for_its_missing_agent_and_starts_when_it_appears(plain: tuple[StandIn, Operator]) -> None:
    standin, _ = plain
    k = standin.kube
    namespace(standin, "later")
    k.apply(job("eventually", "later", agentRef={"name": "newcomer"}), manager="kubectl")
    pending = phase(standin, "later", "eventually", "Pending")
    ready = condition(pending, "Ready")
    assert ready["reason"] == "AgentNotFound" and "correct spec.agentRef" in ready["message"], ready
    assert condition(pending, "Stalled")["status"] == "True"
    assert k.get_opt("batch/v1", "jobs", "later", "eventually") is None
    k.apply(agent("newcomer", "later", "team"), manager="kubectl")
    phase(standin, "later", "eventually", "Running")
    plan(standin, "later", "eventually", [{"exit": 0}])
    phase(standin, "later", "eventually", "Succeeded")


def test_a_job_on_an_agent_a_policy_denies_never_starts_a_pod(plain: tuple[StandIn, Operator]) -> None:
    standin, _ = plain
    k = standin.kube
    namespace(standin, "denied", image="registry.example.com/agents/echo:latest")
    k.apply(job("refused", "denied"), manager="kubectl")
    pending = phase(standin, "denied", "refused", "Pending")
    assert condition(pending, "Ready")["reason"] == "PolicyDenied"
    assert condition(pending, "PolicyAllowed")["status"] == "False"
    time.sleep(1)
    assert k.get_opt("batch/v1", "jobs", "denied", "refused") is None
    assert not k.list("v1", "pods", "denied")["items"]


def test_settled_jobs_make_no_writes(plain: tuple[StandIn, Operator]) -> None:
    standin, operator = plain
    time.sleep(2)
    before = standin.stats()
    reconciles = operator.reconciles("job")
    time.sleep(6)
    after = standin.stats()
    for ns in TEST_NAMESPACES:
        quiet = delta(write_counts(after, ns), write_counts(before, ns))
        assert not quiet, f"writes in {ns} during a quiet period: {quiet}"
    assert operator.reconciles("job") - reconciles <= 2, "no reconcile loop"


# --- with a ledger, NATS and real sidecars --------------------------------------------------


@pytest.fixture(scope="module")
def ledgered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("jobs-ledger")
    standin = StandIn(work, crds=REPO / "crds")
    pg = nats = operator = upstream = None
    try:
        pg = Postgres(work)
        nats = Nats(work)
        (work / "clock").write_text("0")
        prices = work / "prices.yaml"
        prices.write_text("gpt-4o-mini: {inputPerMTok: 150000, outputPerMTok: 600000}\n")
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-jobs-ledger",
                            "--no-leader-election", "--ledger-url", pg.url, "--nats-url", nats.url,
                            "--budget-refresh-seconds", "1", "--prices-file", str(prices),
                            "--clock-offset-file", str(work / "clock"), "--cli-image", "soma:e2e")
        upstream, upstream_url = start_upstream(work)
        yield {"standin": standin, "pg": pg, "nats": nats, "operator": operator, "upstream": upstream_url,
               "work": work}
    finally:
        if operator is not None:
            operator.stop()
        if upstream is not None:
            stop_process(upstream)
        for server in (nats, pg):
            if server is not None:
                server.stop()
        standin.stop()


def job_sidecar(ctx: dict[str, Any], ns: str, name: str) -> tuple[subprocess.Popen[bytes], str]:
    """The run's sidecar, started from the ConfigMap the operator wrote for the Job."""
    k = ctx["standin"].kube
    cm = wait_for("the Job's sidecar ConfigMap", lambda: k.get_opt("v1", "configmaps", ns, f"sjob-{name}-sidecar"),
                  seconds=30)
    assert json.loads(cm["data"]["config.yaml"])["agent"]["name"] == f"job/{name}"
    work = ctx["work"] / f"{ns}-{name}"
    work.mkdir()
    return start_sidecar(work, cm, ctx["upstream"], ctx["pg"].url)


def ledger_usage(pg: Postgres, ns: str, agent_name: str) -> tuple[int, int, int]:
    row = pg.sql(f"SELECT COUNT(*), COALESCE(SUM(input_tokens + output_tokens), 0), COALESCE(SUM(cost_micros), 0) "
                 f"FROM usage_records WHERE namespace = '{ns}' AND agent = '{agent_name}'")
    n, tokens, cost = (int(x) for x in row.split("|"))
    return n, tokens, cost


def test_a_runs_tokens_and_cost_come_from_the_ledger(ledgered: dict[str, Any]) -> None:
    standin, pg = ledgered["standin"], ledgered["pg"]
    k = standin.kube
    namespace(standin, "used")
    k.apply(job("work", "used"), manager="kubectl")
    phase(standin, "used", "work", "Running")
    b = batch_job(standin, "used", "work")
    sidecar_env = b["spec"]["template"]["spec"]["initContainers"][0]["env"]
    db = next(e for e in sidecar_env if e["name"] == "SOMA_DATABASE_URL")
    assert db["valueFrom"]["secretKeyRef"]["name"] == "sjob-work-ledger"
    proc, url = job_sidecar(ledgered, "used", "work")
    try:
        for _ in range(3):
            assert chat(url).status_code == 200
    finally:
        stop_process(proc)  # SIGTERM: the sidecar delivers its outbox before it exits
    n, tokens, cost = ledger_usage(pg, "used", "job/work")
    assert n == 3, "the stopped sidecar delivered every call"
    plan(standin, "used", "work", [{"exit": 0, "message": "summary written"}])
    done = phase(standin, "used", "work", "Succeeded")
    u = done["status"]["usage"]
    assert (u["requests"], u["tokens"], u["costMicros"]) == (3, tokens, cost), u
    assert u["costDisplay"].endswith("USD"), u
    assert "used " in condition(done, "Complete")["message"], condition(done, "Complete")


def test_a_run_that_exhausts_its_budget_fails_saying_so_with_its_partial_usage(ledgered: dict[str, Any]) -> None:
    standin, pg = ledgered["standin"], ledgered["pg"]
    k = standin.kube
    namespace(standin, "midway", budget_spec={"limits": {"costMicros": 300}})
    k.apply(job("greedy", "midway"), manager="kubectl")
    phase(standin, "midway", "greedy", "Running")
    proc, url = job_sidecar(ledgered, "midway", "greedy")
    ok = 0
    try:
        while True:
            r = chat(url)
            if r.status_code != 200:
                assert r.status_code == 429 and r.json()["soma_budget"]["budget"] == "midway/team", r.text
                break
            ok += 1
            assert ok < 200, "the Budget never refused"
    finally:
        stop_process(proc)
    plan(standin, "midway", "greedy", [{"exit": 1, "message": "the model refused: budget used up"}])
    failed = phase(standin, "midway", "greedy", "Failed")
    f = condition(failed, "Failed")
    assert f["reason"] == "BudgetExhausted" and "its Budget refused 1 call(s)" in f["message"], f
    n, tokens, cost = ledger_usage(pg, "midway", "job/greedy")
    u = failed["status"]["usage"]
    assert (u["requests"], u["tokens"], u["costMicros"], u["refusals"]) == (ok, tokens, cost, 1), u
    assert n == ok and cost <= 300
    wait_for("a Warning Event", lambda: ("Warning", "BudgetExhausted") in reasons(standin, "midway", "greedy"),
             seconds=30)


def pod_env(k: Any, ns: str, batch: dict[str, Any]) -> dict[str, str]:
    """The drill container's environment as the kubelet would give it (Secrets read)."""
    out = {}
    for e in batch["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            secret = k.get("v1", "secrets", ns, ref["name"])
            out[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return out


def pg_client_bin() -> str:
    real = pathlib.Path(os.path.realpath(pathlib.Path(os.environ.get("SOMA_PG_BIN", "/usr/local/bin")) / "postgres"))
    return str(real.parent)


def run_drill_pod(k: Any, ns: str, batch: dict[str, Any], work: pathlib.Path) -> tuple[int, str]:
    """Runs what the drill pod runs: its args, with its environment, writing its termination
    message; returns the exit code and the message."""
    c = batch["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "soma:e2e" and c["args"][:2] == ["dr", "drill"], c
    log = work / f"termination-log-{batch['metadata']['name']}"
    args = [CLI] + [str(log) if a == "/dev/termination-log" else a for a in c["args"]]
    env = {**os.environ, **pod_env(k, ns, batch), "SOMA_PG_BIN": pg_client_bin(),
           "SOMA_DRILL_STREAM_GRACE_SECONDS": "1"}
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    return out.returncode, log.read_text() if log.exists() else out.stdout + out.stderr


def test_a_drill_runs_with_the_pod_it_is_given_and_its_figures_reach_status(ledgered: dict[str, Any]) -> None:
    standin, pg, operator, work = ledgered["standin"], ledgered["pg"], ledgered["operator"], ledgered["work"]
    k = standin.kube
    ns = "dr"
    # Usage of its own in the ledger and the stream: an Agent's sidecar, from its ConfigMap.
    namespace(standin, ns)
    cm = wait_for("the Agent's sidecar ConfigMap", lambda: k.get_opt("v1", "configmaps", ns, "bot-sidecar"),
                  seconds=30)
    (work / "dr-bot").mkdir()
    proc, url = start_sidecar(work / "dr-bot", cm, ledgered["upstream"], pg.url)
    try:
        for _ in range(4):
            assert chat(url).status_code == 200
    finally:
        stop_process(proc)
    pg.sql("CREATE DATABASE scratch")
    scratch_url = pg.url.rsplit("/", 1)[0] + "/scratch"
    k.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "scratch", "namespace": ns},
             "data": {"url": base64.b64encode(scratch_url.encode()).decode()}}, manager="kubectl")
    k.apply({"apiVersion": AGENTS, "kind": "Job", "metadata": {"name": "nightly", "namespace": ns},
             "spec": {"drDrill": {"scratchSecretRef": {"name": "scratch", "key": "url"}}, "deadlineSeconds": 600}},
            manager="kubectl")
    b = batch_job(standin, ns, "nightly")
    assert k.get("v1", "secrets", ns, "sjob-nightly-ledger"), "the operator's ledger, for the drill pod"
    time.sleep(1.5)  # past the drill's grace: every record is in the ledger and the stream
    code, message = run_drill_pod(k, ns, b, work)
    assert code == 0, message
    records = int(pg.sql("SELECT COUNT(*) FROM usage_records"))
    assert records > 0
    plan(standin, ns, "nightly", [{"exit": code, "message": message}])
    done = phase(standin, ns, "nightly", "Succeeded")
    d = done["status"]["drill"]
    assert (d["outcome"], d["recordsRestored"], d["chainVerified"]) == ("Passed", records, True), d
    assert d["rtoSeconds"] > 0 and "rpoSeconds" in d, d
    assert condition(done, "DrillPassed")["status"] == "True"
    wait_for("the DrillPassed Event", lambda: ("Normal", "DrillPassed") in reasons(standin, ns, "nightly"), seconds=30)
    assert re.search(r'soma_drill_passed\{namespace="dr",name="nightly"\} 1', operator.metrics())

    # The same drill on a schedule: a CronJob; each run it fires reports into the Job's status.
    k.apply({"apiVersion": AGENTS, "kind": "Job", "metadata": {"name": "periodic", "namespace": ns},
             "spec": {"drDrill": {"scratchSecretRef": {"name": "scratch", "key": "url"}}, "deadlineSeconds": 600,
                      "schedule": "0 3 * * *"}}, manager="kubectl")
    cron = wait_for("the CronJob", lambda: k.get_opt("batch/v1", "cronjobs", ns, "periodic"), seconds=30)
    assert (cron["spec"]["schedule"], cron["spec"]["concurrencyPolicy"]) == ("0 3 * * *", "Forbid")
    scheduled = phase(standin, ns, "periodic", "Scheduled")
    assert "no run has reported yet" in condition(scheduled, "Ready")["message"]
    fired = requests.post(f"{standin.url}/_cronjobs/{ns}/periodic/run", timeout=10).json()["job"]
    code, message = run_drill_pod(k, ns, batch_job(standin, ns, fired), work)
    assert code == 0, message
    plan(standin, ns, fired, [{"exit": code, "message": message}])
    reported = wait_for("the run's report", lambda: (j := sjob(standin, ns, "periodic"))
                        and (j["status"].get("drill") or {}).get("outcome") == "Passed" and j, seconds=30)
    assert reported["status"]["phase"] == "Scheduled" and reported["status"]["lastScheduleTime"]
    assert condition(reported, "DrillPassed")["status"] == "True"

    # A ledger with a record deleted, drilled through a Secret of its own: the drill fails with
    # the discrepancy, a Warning Event and soma_drill_passed 0.
    pg.sql("CREATE DATABASE tampered")
    tampered_url = pg.url.rsplit("/", 1)[0] + "/tampered"
    dump = subprocess.run([os.path.join(pg_client_bin(), "pg_dump"), "--no-owner", pg.url], capture_output=True,
                          check=True)
    subprocess.run([os.path.join(pg_client_bin(), "psql"), "-q", "-v", "ON_ERROR_STOP=1", tampered_url],
                   input=dump.stdout, capture_output=True, check=True)
    gone = pg.sql("SELECT id FROM usage_records ORDER BY delivered_at, id LIMIT 1")
    subprocess.run([os.path.join(pg_client_bin(), "psql"), "-q", tampered_url, "-c",
                    f"DELETE FROM usage_records WHERE id = '{gone}'"], capture_output=True, check=True)
    k.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tampered", "namespace": ns},
             "data": {"url": base64.b64encode(tampered_url.encode()).decode()}}, manager="kubectl")
    k.apply({"apiVersion": AGENTS, "kind": "Job", "metadata": {"name": "broken", "namespace": ns},
             "spec": {"drDrill": {"scratchSecretRef": {"name": "scratch", "key": "url"},
                                  "ledgerSecretRef": {"name": "tampered", "key": "url"}}, "deadlineSeconds": 600}},
            manager="kubectl")
    b = batch_job(standin, ns, "broken")
    assert k.get_opt("v1", "secrets", ns, "sjob-broken-ledger") is None, "its own Secret, not the operator's"
    code, message = run_drill_pod(k, ns, b, work)
    assert code == 1, message
    plan(standin, ns, "broken", [{"exit": code, "message": message}])
    failed = phase(standin, ns, "broken", "Failed")
    assert condition(failed, "Ready")["reason"] == "DrillFailed"
    assert condition(failed, "DrillPassed")["status"] == "False"
    found = " ".join(failed["status"]["drill"]["discrepancies"])
    assert f"record {gone} (" in found and "it was deleted from the ledger" in found, found
    wait_for("the DrillFailed Event", lambda: ("Warning", "DrillFailed") in reasons(standin, ns, "broken"), seconds=30)
    assert re.search(r'soma_drill_passed\{namespace="dr",name="broken"\} 0', operator.metrics())


def test_a_job_whose_budget_is_exhausted_waits_and_starts_when_the_period_resets(ledgered: dict[str, Any]) -> None:
    standin, pg = ledgered["standin"], ledgered["pg"]
    k = standin.kube
    ns = "gated"
    namespace(standin, ns, budget_spec={"limits": {"costMicros": 300},
                                        "period": {"calendar": "hour", "timeZone": "UTC"}})
    cm = wait_for("the Agent's sidecar ConfigMap", lambda: k.get_opt("v1", "configmaps", ns, "bot-sidecar"),
                  seconds=30)
    work = ledgered["work"] / "gated-bot"
    work.mkdir()
    proc, url = start_sidecar(work, cm, ledgered["upstream"], pg.url)
    try:
        while chat(url).status_code == 200:
            pass
    finally:
        stop_process(proc)
    b = wait_for("the Budget to be exhausted", lambda: (x := k.get(AGENTS, "budgets", ns, "team"))
                 and condition(x, "Exhausted").get("status") == "True" and x, seconds=60)
    period_end = b["status"]["periodEnd"]
    k.apply(job("after-reset", ns), manager="kubectl")
    waiting = phase(standin, ns, "after-reset", "Waiting")
    ready = condition(waiting, "Ready")
    assert ready["reason"] == "BudgetExhausted", ready
    assert "Budget gated/team is exhausted" in ready["message"] and period_end in ready["message"], ready
    wait_for("a Warning Event", lambda: ("Warning", "BudgetExhausted") in reasons(standin, ns, "after-reset"),
             seconds=30)
    time.sleep(1)
    assert k.get_opt("batch/v1", "jobs", ns, "after-reset") is None, "it does not start while exhausted"
    # The operator's clock moves to 5 s before the end of the hour; a delivery wakes the Budget,
    # which rolls over at the period's end, and the Job starts then.
    if time.time() % 3600 > 3600 - 20:
        time.sleep(3600 - time.time() % 3600 + 1)
    (ledgered["work"] / "clock").write_text(str(int((3600 - time.time() % 3600 - 5) * 1000)))
    pg.sql(f"NOTIFY soma_usage, '{ns}/team@{b['metadata']['uid']}'")
    phase(standin, ns, "after-reset", "Running", seconds=40)
    wait_for("the run's start time", lambda: (sjob(standin, ns, "after-reset")["status"]).get("startTime"),
             seconds=30)
    assert k.get_opt("batch/v1", "jobs", ns, "after-reset") is not None
    rolled = k.get(AGENTS, "budgets", ns, "team")
    assert condition(rolled, "Exhausted")["status"] == "False" and rolled["status"]["periodStart"] == period_end
