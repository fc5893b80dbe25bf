"""The autoscaler's closed loop, measured: a request schedule replayed open-loop through the real
operator and real sidecars, next to the simulator's prediction for the same schedule.

    soma-autoscale-window ──▶ schedule.csv (arrival_s, tokens, service_s) + the simulator's prediction
                                   │
    load generator (open loop) ────┘ each request joins the Service queue at its scheduled time
      Service: one FIFO queue, a request at a time per pod (the simulator's model: an agent pod
      works on one task at a time), least-busy Ready pod first
        ├─▶ pod 127.0.0.x: real soma-proxy ──▶ soma-fake-upstream (SCENARIO:hold-<service ms>)
        └─▶ each serving pod's agent reports its share of the queue: PUT /v1/queue {"waiting": n}
    soma_apiserver.py --deployment-pods ◀── soma-operator run --scaling-interval-seconds N
      (replicas → pods 127.0.0.2, .3, …)        └── GET http://127.0.0.x:ADMIN/load, SSA spec.replicas

A pod serves `start_delay` after it appears (the simulator's pod start). The agents report the
queue to their sidecars (`PUT /v1/queue`, each serving pod its share, so that the shares add up
to the queue), as an agent with a queue in front of it is asked to; with `report_queue` off they
do not, and the autoscaler sees only the requests the pods have started. Waits and latencies
run from the request's *scheduled* time. Replica-minutes count every pod from its creation to
its removal (draining included), up to the end of the window's last minute, as the simulator
counts them; an SLO-violation minute is a minute of trace time (60/c s of the run) with arrivals
whose nearest-rank P95 wait exceeds the SLO, bucketed by scheduled arrival: the simulator's
definition. Reversals are changes of direction of the Deployment's `spec.replicas`.

The pieces of e2e/apiserver are imported, not copied: `harness.StandIn`, `test_convergence.
Operator`, and `test_scaling.Pods` / `start_upstream` (so this module uses that test's namespace
`scaled`, Agent `bot`, key and pod token).

Used by `bench/autoscaler-closed-loop` (the measurement) and `test_closed_loop.py` (a short smoke
run of the wiring). Needs SOMA_OPERATOR_BIN, SOMA_PROXY_BIN, SOMA_FAKE_UPSTREAM_BIN and
SOMA_AUTOSCALE_WINDOW_BIN.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import REPO, StandIn, free_port, stop_process  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


@dataclass
class Scenario:
    """One replay: a trace window (or the ramp) at compression `compress`, and the Agent's
    scaling settings in trace time (divided by `compress` for the operator and the simulator)."""

    name: str
    trace: pathlib.Path | None  # None: the synthetic ramp
    from_min: float = 0.0
    to_min: float = 20.0
    compress: float = 5.0
    interval_s: int = 3  # the operator's --scaling-interval-seconds (15 s of trace time at c=5)
    start_delay_s: float = 30.0  # trace time
    slo_wait_s: float = 2.0  # trace time; also the Agent's targetP95WaitMs
    floor_hold_s: float = 900.0  # trace time
    reversal_hold_s: float = 120.0  # trace time
    max_replicas: int = 64
    ramp: dict[str, float] = field(default_factory=dict)
    report_queue: bool = True  # the agents report the queue to their sidecars (PUT /v1/queue)

    def scaling_spec(self) -> dict[str, Any]:
        """`spec.scaling` of the Agent: every time knob compressed (the crate's defaults for the
        rest), so that the run is the first minutes of `bench/autoscaler`'s replay, faster."""
        c = self.compress
        beta = c / 240.0  # the crate's default decay, 1/240 per second of trace time
        return {"minReplicas": 1, "maxReplicas": self.max_replicas,
                "targetP95WaitMs": round(self.slo_wait_s * 1000 / c),
                "floorHoldSeconds": round(self.floor_hold_s / c),
                "reversalHoldSeconds": round(self.reversal_hold_s / c),
                "coldStartHoldSeconds": round(60 / c),
                "backlogDrainSeconds": max(1, round(15 / c)),
                "conductance": {"alpha": round(beta / 0.7, 6), "beta": round(beta, 6),
                                "tauSeconds": max(1, round(30 / c))},
                "estimator": {"arrivalTauSeconds": max(1, round(60 / c)),
                              "priorServiceTimeMs": max(1, round(1000 / c))}}

    def soma_config(self) -> dict[str, Any]:
        """The AutoscalerConfig the operator builds from `scaling_spec` (operator/src/agent/
        scaling.rs `autoscaler_config`): those fields, scale to zero off, the rest defaults."""
        s = self.scaling_spec()
        cd, est = s["conductance"], s["estimator"]
        return {"minReplicas": s["minReplicas"], "maxReplicas": s["maxReplicas"],
                "waitTargetS": s["targetP95WaitMs"] / 1000, "floorHoldS": float(s["floorHoldSeconds"]),
                "reversalHoldS": float(s["reversalHoldSeconds"]), "idleToZeroS": None,
                "coldStartHoldS": float(s["coldStartHoldSeconds"]),
                "backlogDrainS": float(s["backlogDrainSeconds"]),
                "conductance": {"alpha": cd["alpha"], "beta": cd["beta"], "tauS": float(cd["tauSeconds"])},
                "estimator": {"arrivalTauS": float(est["arrivalTauSeconds"]),
                              "priorServiceTimeS": est["priorServiceTimeMs"] / 1000}}

    def view(self) -> str:
        """The simulator's run that sees what this loop's operator sees."""
        return "reported" if self.report_queue else "sidecar"


def predict(window_bin: str, sc: Scenario, schedule: pathlib.Path) -> dict[str, Any]:
    """Writes the schedule and returns the simulator's prediction (soma-autoscale-window)."""
    args = [window_bin, "--compress", str(sc.compress), "--from-min", str(sc.from_min), "--to-min", str(sc.to_min),
            "--interval-s", str(sc.interval_s), "--start-delay", str(sc.start_delay_s), "--slo-wait",
            str(sc.slo_wait_s), "--soma-config", json.dumps(sc.soma_config()), "--schedule", str(schedule)]
    if sc.trace is not None:
        args += ["--trace", str(sc.trace)]
    for k, v in sc.ramp.items():
        args += [f"--ramp-{k.replace('_', '-')}", str(v)]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout)


@dataclass
class Request:
    i: int
    at: float  # scheduled arrival, seconds from the run's start
    input_tokens: int
    output_tokens: int
    service_s: float
    started: float | None = None
    ended: float | None = None
    ok: bool = False
    tries: int = 0


def read_schedule(path: pathlib.Path) -> list[Request]:
    with open(path) as f:
        return [Request(i, float(r["arrival_s"]), int(r["input_tokens"]), int(r["output_tokens"]),
                        float(r["service_s"])) for i, r in enumerate(csv.DictReader(f))]


class Service:
    """The queue in front of the Agent's pods, and each pod's agent working one task at a time.

    A pod's worker starts `start_delay` after the pod appears; a pod that is deleted takes no new
    task and finishes the one it has (its sidecar drains on SIGTERM). A task that meets a sidecar
    that is already gone goes back to the head of the queue."""

    def __init__(self, pods: Any, token: str, start_delay: float, report_queue: bool = True):
        self.pods, self.token, self.start_delay = pods, token, start_delay
        self.queue: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self.workers: dict[str, dict[str, Any]] = {}  # pod uid → {url, appeared, gone, busy}
        self.stopping = threading.Event()
        self.t0 = self.horizon = math.inf  # set by begin()
        self.replica_seconds = 0.0
        self._counted_to = math.inf
        self.poller = threading.Thread(target=self._poll, daemon=True)
        self.poller.start()
        self.reporter = threading.Thread(target=self._report, daemon=True)
        if report_queue:
            self.reporter.start()

    def begin(self, horizon_s: float) -> float:
        """Starts the clock once a pod exists: the pods present now are Ready at once (the
        simulator starts from one Ready pod); replica time counts from now to `horizon_s`."""
        deadline = time.monotonic() + 60
        while not self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError("no pod of the Agent appeared within 60 s")
            time.sleep(0.05)
        with self.cv:
            now = time.monotonic()
            for w in self.workers.values():
                w["appeared"] = now - self.start_delay
            self.t0, self.horizon, self._counted_to = now, now + horizon_s, now
        return now

    def now(self) -> float:
        return time.monotonic() - self.t0

    def submit(self, r: Request) -> None:
        with self.cv:
            self.queue.append(r)
            self.cv.notify_all()

    def alive(self) -> int:
        """Pods paid for: present, or deleted and still finishing a task."""
        with self.cv:
            return sum(1 for w in self.workers.values() if not w["gone"] or w["busy"])

    def waiting(self) -> int:
        with self.cv:
            return len(self.queue)

    def count(self) -> None:
        """Adds the pods alive since the last count, up to the horizon."""
        now = min(time.monotonic(), self.horizon)
        if now > self._counted_to:
            self.replica_seconds += self.alive() * (now - self._counted_to)
            self._counted_to = now

    def _poll(self) -> None:
        while not self.stopping.is_set():
            self.count()
            try:
                self.pods.sync()
                with self.pods.lock:
                    live = {uid: url for uid, (_, url) in self.pods.sidecars.items()}
            except requests.RequestException:
                live = None  # the stand-in did not answer this time: keep what we know
            if live is not None:
                with self.cv:
                    for uid, url in live.items():
                        if uid not in self.workers:
                            w = {"url": url, "appeared": time.monotonic(), "gone": False, "busy": False}
                            self.workers[uid] = w
                            threading.Thread(target=self._work, args=(uid, w), daemon=True).start()
                    for uid, w in self.workers.items():
                        if uid not in live and not w["gone"]:
                            w["gone"] = True
                            self.cv.notify_all()
            self.stopping.wait(0.1)

    def _report(self) -> None:
        """Each serving pod's agent reports its share of the queue to its sidecar when the share
        changes, and at least every 5 s (the sidecar forgets a report after 30 s)."""
        session = requests.Session()
        headers = {"authorization": f"Bearer {self.token}"}
        sent: dict[str, tuple[int, float]] = {}  # url → (share, when)
        while not self.stopping.is_set():
            with self.cv:
                urls = sorted(w["url"] for w in self.workers.values() if w.get("serving") and not w["gone"])
                queued = len(self.queue)
            now = time.monotonic()
            for i, url in enumerate(urls):
                share = queued // len(urls) + (1 if i < queued % len(urls) else 0)
                last = sent.get(url)
                if last is not None and last[0] == share and now - last[1] < 5.0:
                    continue
                try:
                    base = url.rsplit("/v1/", 1)[0]
                    r = session.put(f"{base}/v1/queue", json={"waiting": share}, headers=headers, timeout=5)
                    if r.status_code == 204:
                        sent[url] = (share, now)
                except requests.RequestException:
                    pass  # the pod is going away; the next round reports to those left
            self.stopping.wait(0.1)

    def _work(self, uid: str, w: dict[str, Any]) -> None:
        while time.monotonic() < w["appeared"] + self.start_delay:
            if w["gone"] or self.stopping.is_set():
                return
            time.sleep(0.02)
        w["serving"] = True
        session = requests.Session()
        headers = {"authorization": f"Bearer {self.token}"}
        while True:
            with self.cv:
                while not self.queue and not w["gone"] and not self.stopping.is_set():
                    self.cv.wait(0.5)
                if w["gone"] or self.stopping.is_set():
                    return
                r = self.queue.popleft()
                w["busy"] = True
            r.tries += 1
            if r.started is None:
                r.started = self.now()
            body = {"model": "gpt-4o-mini", "max_tokens": max(1, min(r.output_tokens, 256)),
                    "messages": [{"role": "user", "content": f"SCENARIO:hold-{round(r.service_s * 1000)} task {r.i}"}]}
            try:
                resp = session.post(w["url"], json=body, headers=headers, timeout=120)
                r.ok = resp.status_code == 200
                r.ended = self.now()
            except requests.RequestException:
                r.started = None  # never served here: back to the head of the queue
                with self.cv:
                    self.queue.appendleft(r)
                    w["busy"] = False
                    self.cv.notify_all()
                time.sleep(0.05)
                continue
            with self.cv:
                w["busy"] = False

    def stop(self) -> None:
        self.stopping.set()
        with self.cv:
            self.cv.notify_all()
        self.poller.join(timeout=10)
        if self.reporter.is_alive():
            self.reporter.join(timeout=10)


def p95(xs: list[float]) -> float:
    """Nearest-rank P95, as the simulator computes it."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


def reversals(counts: list[int]) -> int:
    last_dir, n = 0, 0
    for a, b in zip(counts, counts[1:]):
        d = (b > a) - (b < a)
        if d:
            if last_dir and d != last_dir:
                n += 1
            last_dir = d
    return n


def run(sc: Scenario, work: pathlib.Path, window_bin: str, log: Any = sys.stdout) -> dict[str, Any]:
    """One scenario end to end; returns the measured and predicted figures."""
    import test_scaling as ts  # reads the binaries' paths from the environment at import
    from test_convergence import AGENTS, Operator

    work.mkdir(parents=True, exist_ok=True)
    schedule = work / "schedule.csv"
    sim = predict(window_bin, sc, schedule)
    reqs = read_schedule(schedule)
    c = sc.compress
    minute = 60.0 / c
    slo = sc.slo_wait_s / c
    duration = reqs[-1].at
    horizon_rel = math.floor(duration / minute) * minute + minute
    print(f"[{sc.name}] {sim['trace']}: {len(reqs)} requests over {duration:.0f} s (x{c:g} faster: "
          f"{duration * c / 60:.1f} trace minutes), mean service {sim['mean_service_s'] * 1000:.0f} ms, "
          f"offered load {sim['offered_erlangs']:.1f} Erlangs; scaling {json.dumps(sc.scaling_spec())}",
          file=log, flush=True)

    standin = StandIn(work, "--deployment-pods", crds=REPO / "crds")
    upstream = pods = service = operator = None
    admin_port = free_port()
    samples: list[dict[str, Any]] = []
    try:
        upstream, upstream_url = ts.start_upstream(work)
        pods = ts.Pods(work, standin, upstream_url, admin_port)
        operator = Operator(work, standin.write_kubeconfig(work / "kubeconfig"), "soma-operator-closed-loop",
                            "--no-leader-election", "--scaling-interval-seconds", str(sc.interval_s),
                            "--sidecar-admin-port", str(admin_port))
        k = standin.kube
        k.ensure_namespace(ts.NS)
        k.apply({"apiVersion": AGENTS, "kind": "Budget", "metadata": {"name": "team", "namespace": ts.NS},
                 "spec": {"limits": {"costMicros": 50_000_000_000}, "period": {"calendar": "month", "timeZone": "UTC"}}},
                manager="kubectl")
        k.apply({"apiVersion": AGENTS, "kind": "Agent", "metadata": {"name": ts.NAME, "namespace": ts.NS},
                 "spec": {"image": "registry.example.com/agents/echo@sha256:" + "ab" * 32,
                          "model": {"provider": "openai", "name": "gpt-4o-mini"}, "budgetRef": {"name": "team"},
                          "scaling": sc.scaling_spec()}}, manager="kubectl")
        deadline = time.monotonic() + 120
        while not (pods.sync() and ts.managers(standin) == ["soma-autoscaler"]):
            if time.monotonic() > deadline:
                raise RuntimeError("the Agent's first pod and the autoscaler's ownership of spec.replicas "
                                   f"did not appear within 120 s:\n{operator.log_tail()}")
            time.sleep(0.2)
        service = Service(pods, ts.TOKEN, sc.start_delay_s / c, sc.report_queue)
        t0 = service.begin(horizon_rel)
        stop_sampling = threading.Event()

        def sample() -> None:
            last_step = None
            while not stop_sampling.is_set():
                try:
                    d = k.get("apps/v1", "deployments", ts.NS, ts.NAME)
                    a = k.get(AGENTS, "agents", ts.NS, ts.NAME)
                except (requests.RequestException, AssertionError):
                    stop_sampling.wait(0.25)
                    continue
                s = (a.get("status") or {}).get("scaling") or {}
                cond = next((x for x in (a.get("status") or {}).get("conditions") or [] if x["type"] == "Scaling"), {})
                samples.append({"t": time.monotonic() - t0, "replicas": d["spec"].get("replicas"),
                                "pods": service.alive(), "queue": service.waiting(), "desired": s.get("desiredReplicas"),
                                "reason": s.get("reason"), "arrival_rate": s.get("arrivalRate"),
                                "service_s": s.get("serviceTimeS"), "erlang_floor": s.get("erlangFloor"),
                                "conductance": s.get("conductance"), "step": s.get("lastStepTime"),
                                "new_step": s.get("lastStepTime") != last_step, "message": cond.get("message")})
                last_step = s.get("lastStepTime")
                stop_sampling.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # Open loop: each request joins the queue at its scheduled time, whatever came before.
        for r in reqs:
            delay = t0 + r.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            service.submit(r)
        # Let the queue drain (bounded), then run to the end of the window's last minute.
        drain_deadline = time.monotonic() + max(120.0, duration)
        while (service.waiting() or any(r.ended is None for r in reqs)) and time.monotonic() < drain_deadline:
            time.sleep(0.2)
        while time.monotonic() < t0 + horizon_rel:
            time.sleep(0.1)
        service.count()
        end = time.monotonic() - t0
        # Sample on for two scaling steps: a change of replicas seen at the very end is then
        # followed by the samples that carry its status (read for the explanation, not counted).
        time.sleep(2 * sc.interval_s + 0.5)
        stop_sampling.set()
        sampler.join(timeout=10)
        events = [e for e in k.list("events.k8s.io/v1", "events", ts.NS)["items"]
                  if e.get("regarding", {}).get("name") == ts.NAME and e.get("action") == "Scale"]
    finally:
        if service is not None:
            service.stop()
        if pods is not None:
            pods.stop()
        if operator is not None:
            operator.stop()
        if upstream is not None:
            stop_process(upstream)
        standin.stop()

    # Measured, in trace time.
    waits: dict[int, list[float]] = collections.defaultdict(list)
    unserved = 0
    failed = 0
    for r in reqs:
        w = (r.started if r.started is not None else end) - r.at
        if r.ended is None:
            unserved += 1
        elif not r.ok:
            failed += 1
        waits[int(r.at // minute)].append(w)
    minute_p95 = {m: p95(ws) for m, ws in waits.items()}
    violation_min = sum(1 for v in minute_p95.values() if v > slo)
    after = [s for s in samples if s["t"] > end]
    samples = [s for s in samples if s["t"] <= end]
    counts = [s["replicas"] for s in samples if s["replicas"] is not None]
    changes = []
    for prev, s in zip(samples, samples[1:]):
        if s["replicas"] != prev["replicas"]:
            changes.append(s)
    # Each change of replicas with the status written by the same step (the operator applies
    # spec.replicas, then status: the next samples carry it).
    explained = []
    for ch in changes:
        later = [s for s in samples + after if ch["t"] <= s["t"] <= ch["t"] + 2 * sc.interval_s]
        explained.append(any(s["desired"] == ch["replicas"] and s["reason"] for s in later))
    hold = sc.scaling_spec()["reversalHoldSeconds"]
    max_rev = 2 * math.ceil(end / hold) + 1 if hold > 0 else None
    latencies = [r.ended - r.at for r in reqs if r.ended is not None]
    measured = {
        "replica_min": service.replica_seconds * c / 60.0 if service else 0.0,
        "violation_min": violation_min,
        "minutes_with_traffic": len(minute_p95),
        "reversals": reversals(counts),
        "max_reversals_allowed": max_rev,
        "scale_events": len(changes),
        "steps_explained": sum(explained),
        "peak_replicas": max(counts, default=0),
        "final_replicas": counts[-1] if counts else None,
        "p95_wait_s": p95([w for ws in waits.values() for w in ws]) * c,
        "p95_latency_s": p95(latencies) * c,
        "unserved": unserved,
        "failed": failed,
        "events": len(events),
        "reasons": sorted({s["reason"] for s in samples if s["reason"]}),
        "minute_p95_wait_s": {m: v * c for m, v in sorted(minute_p95.items())},
    }
    (work / "samples.json").write_text(json.dumps(samples))
    report = {"scenario": sc.name, "trace": sim["trace"], "requests": len(reqs), "compress": c, "view": sc.view(),
              "scaling": sc.scaling_spec(), "measured": measured, "sim": sim["runs"], "work": str(work)}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print_timeline(sc, samples, sim, measured, minute, log)
    return report


def print_timeline(sc: Scenario, samples: list[dict[str, Any]], sim: dict[str, Any], measured: dict[str, Any],
                   minute: float, log: Any) -> None:
    """Per trace minute: the closed loop's replicas (at the minute's end), the reason status gave,
    the measured P95 wait, and the simulator's replicas and P95 wait (the loop's own signal view,
    and the queue view of `bench/autoscaler`)."""
    def sim_replicas(view: str, t: float) -> int:
        n = 1
        for at, k in sim["runs"][view]["timeline"]:
            if at <= t:
                n = k
        return n

    print(f"[{sc.name}] per trace minute: closed loop (replicas at the minute's end, reason, queue, P95 wait s) | "
          f"simulator, {sc.view()} view (replicas, P95 wait s) | simulator, queue view", file=log)
    c = sc.compress

    def show(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    def sim_p95(view: str, m: int) -> float | None:
        ws = sim["runs"][view]["minute_p95_wait_s"]
        return ws[m] * c if m < len(ws) and ws[m] is not None else None

    last = samples[-1]["t"] if samples else 0.0
    m = 0
    while m * minute < last:
        t = (m + 1) * minute
        at = [s for s in samples if s["t"] <= t]
        s = at[-1] if at else {}
        print(f"  min {m:3d}: {s.get('replicas', '-'):>3} {str(s.get('reason')):<14} q={s.get('queue', 0):<5} "
              f"p95={show(measured['minute_p95_wait_s'].get(m)):>6} | {sim_replicas(sc.view(), t):>3} "
              f"p95={show(sim_p95(sc.view(), m)):>6} | {sim_replicas('queue', t):>3} p95={show(sim_p95('queue', m)):>6}",
              file=log)
        m += 1
    log.flush()


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    c = args.compress
    out = []
    if "ramp" in args.scenario:
        out.append(Scenario("ramp", None, compress=c, interval_s=args.interval, to_min=args.ramp_minutes,
                            floor_hold_s=args.ramp_floor_hold, report_queue=not args.no_queue_report,
                            ramp={"base_rps": 0.3, "peak_rps": args.ramp_peak, "min": 4.0, "hold_min": 2.0,
                                  "tail_min": args.ramp_minutes - 10.0}))
    for label in ("code", "conv"):
        if label in args.scenario:
            out.append(Scenario(label, SHARED / f"azure-llm-inference-2023-{label}.csv", from_min=args.from_min,
                                to_min=args.from_min + args.minutes, compress=c, interval_s=args.interval,
                                max_replicas=args.max_replicas, report_queue=not args.no_queue_report))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", nargs="+", default=["ramp", "code", "conv"], choices=["ramp", "code", "conv"])
    p.add_argument("--compress", type=float, default=5.0, help="replay this many times faster (default 5)")
    p.add_argument("--interval", type=int, default=3, help="operator --scaling-interval-seconds (default 3 = 15 s / 5)")
    p.add_argument("--from-min", type=float, default=0.0, help="window start in the real traces, minutes")
    p.add_argument("--minutes", type=float, default=15.0, help="window length in the real traces, trace minutes")
    p.add_argument("--max-replicas", type=int, default=64)
    p.add_argument("--ramp-peak", type=float, default=6.0, help="the ramp's peak, req/s of trace time")
    p.add_argument("--ramp-minutes", type=float, default=16.0, help="the ramp's length in trace minutes (≥ 10)")
    p.add_argument("--ramp-floor-hold", type=float, default=300.0,
                   help="floorHoldS of the ramp's Agent, trace seconds (default 300, so the scale-down shows)")
    p.add_argument("--no-queue-report", action="store_true",
                   help="the agents do not report their queue (PUT /v1/queue): the sidecars' view alone")
    p.add_argument("--work", type=pathlib.Path, default=None, help="keep logs here (default: a temp dir, removed)")
    args = p.parse_args()
    if 15.0 / args.compress != args.interval:
        print(f"note: --interval {args.interval} s is {args.interval * args.compress:g} s of trace time "
              f"(the simulator's benchmark steps every 15 s)", file=sys.stderr)
    window_bin = os.environ["SOMA_AUTOSCALE_WINDOW_BIN"]
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="soma-closed-loop-")
        args.work = pathlib.Path(tmp.name)
    results = []
    for sc in scenarios(args):
        results.append(run(sc, args.work / sc.name, window_bin))
    print()
    print("scenario  trace                                       requests  replica_min (loop / sim, loop's view / sim queue-view)"
          "  violation_min (loop / sim / sim queue)  reversals (loop / allowed)  steps explained  view")
    for r in results:
        m, s, q = r["measured"], r["sim"][r["view"]], r["sim"]["queue"]
        print(f"{r['scenario']:<9} {r['trace']:<43} {r['requests']:>8}  {m['replica_min']:8.1f} / {s['replica_min']:6.1f} / "
              f"{q['replica_min']:6.1f}      {m['violation_min']:3d}/{m['minutes_with_traffic']} / "
              f"{s['violation_min']:3d} / {q['violation_min']:3d}                  {m['reversals']:3d} / "
              f"{m['max_reversals_allowed']}                 {m['steps_explained']}/{m['scale_events']}"
              f"  {r['view']}  (unserved {m['unserved']}, failed {m['failed']}, peak {m['peak_replicas']}, events {m['events']})")
    print()
    for r in results:
        m, s, q = r["measured"], r["sim"][r["view"]], r["sim"]["queue"]
        print(f"RESULT autoscaler-closed-loop-scenario scenario={r['scenario']} trace={r['trace']} compress={r['compress']:g} view={r['view']} "
              f"replica_min={m['replica_min']:.1f} replica_min_sim={s['replica_min']:.1f} "
              f"replica_min_sim_queue={q['replica_min']:.1f} violation_min={m['violation_min']} "
              f"violation_min_sim={s['violation_min']} violation_min_sim_queue={q['violation_min']} "
              f"reversals={m['reversals']} max_reversals_allowed={m['max_reversals_allowed']} "
              f"steps_explained={m['steps_explained']}/{m['scale_events']} unserved={m['unserved']} failed={m['failed']}")
    traces = [r for r in results if r["scenario"] != "ramp"] or results
    tot = lambda f, key: sum(f(r)[key] for r in traces)  # noqa: E731
    print(f"RESULT autoscaler-closed-loop trace={'+'.join(r['trace'] for r in traces)} "
          f"replica_min={tot(lambda r: r['measured'], 'replica_min'):.1f} "
          f"replica_min_sim={tot(lambda r: r['sim'][r['view']], 'replica_min'):.1f} "
          f"violation_min={tot(lambda r: r['measured'], 'violation_min')} "
          f"violation_min_sim={tot(lambda r: r['sim'][r['view']], 'violation_min')} "
          f"violation_min_sim_queue={tot(lambda r: r['sim']['queue'], 'violation_min')} "
          f"reversals={max(r['measured']['reversals'] for r in results)} "
          f"max_reversals_allowed={min(r['measured']['max_reversals_allowed'] for r in results)}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
