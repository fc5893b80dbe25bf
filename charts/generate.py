#!/usr/bin/env python3
"""Generates what the chart ships for platform teams from one readable source, like crdgen does
for the CRDs:

    charts/soma/dashboards/soma-*.json   Grafana dashboards (the chart's ConfigMaps embed them)
    charts/soma/argocd/argocd-cm.yaml    Argo CD's resource.customizations, from argocd/*.lua

Usage: charts/generate.py            write them
       charts/generate.py --check    fail (exit 1) when a committed file differs from what
                                     would be written (scripts/test runs this)

Every panel query is PromQL over metrics Soma exports today (operator/src/metrics.rs, the
admission crate's, agents/proxy/src/metrics.rs); e2e/apiserver/test_prometheus.py runs every one
against a real Prometheus scraping a real operator and real sidecars and requires data from
each (the few that show only what its traffic cannot cause are listed there, with the reason).
Grafana variables ($namespace, ...) are `=~` matchers, so the test can substitute `.*`.
Panels for metrics that do not exist yet are text panels naming the metric they wait for.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
CHART = HERE / "soma"
DASHBOARDS = CHART / "dashboards"
ARGOCD = CHART / "argocd"

DS = {"type": "prometheus", "uid": "${datasource}"}
MICROS = 1_000_000


# --- building blocks -------------------------------------------------------------------------

class Board:
    """A dashboard being laid out on Grafana's 24-column grid, row by row."""

    def __init__(self, uid: str, title: str, description: str, variables: list[dict[str, Any]]):
        self.uid, self.title, self.description = uid, title, description
        self.variables = variables
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_height = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": self._id(),
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, kind: str, title: str, description: str, targets: list[tuple[str, str]], *,
              unit: str = "short", w: int = 12, h: int = 8, instant: bool = False,
              options: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None,
              transformations: list[dict[str, Any]] | None = None) -> None:
        if self.x + w > 24:
            self._newline()
        refs = "ABCDEFGHIJ"
        panel = {
            "type": kind, "title": title, "description": description, "id": self._id(),
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": []},
            "options": options or {},
            "targets": [
                {"refId": refs[i], "datasource": DS, "expr": expr, "legendFormat": legend,
                 "instant": instant, "range": not instant,
                 **({"format": "table"} if kind == "table" else {})}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def text(self, title: str, markdown: str, w: int = 24, h: int = 5) -> None:
        if self.x + w > 24:
            self._newline()
        self.panels.append({"type": "text", "title": title, "id": self._id(),
                            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
                            "options": {"mode": "markdown", "content": markdown}})
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["soma"], "editable": True, "graphTooltip": 1, "schemaVersion": 39,
            "time": {"from": "now-6h", "to": "now"}, "refresh": "1m", "timezone": "",
            "annotations": {"list": []},
            "templating": {"list": [datasource_variable(), *self.variables]},
            "panels": self.panels,
            "links": [{"title": "Soma dashboards", "type": "dashboards", "tags": ["soma"], "asDropdown": True}],
        }


def datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "options": []}


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value variable from `label_values(...)`; "All" matches everything (`.*`)."""
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"var-{name}"}, "definition": query,
            "multi": True, "includeAll": True, "allValue": ".*", "current": {},
            "refresh": 2, "sort": 1, "hide": 0, "options": []}


def quantiles(metric: str, by: str, sel: str, legend_prefix: str = "") -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
             f"{legend_prefix}p{int(q * 100)}") for q in (0.5, 0.95, 0.99)]


TS = "timeseries"
PER_HOUR = f"* 3600 / {MICROS}"
# soma_proxy_errors_total reasons for a stream the provider failed after the client had its 200.
STREAM_FAILURES = "stream_cut|stream_idle_timeout|stream_error_event"


def unmetered_in(sel: str, window: str) -> str:
    """Usage records with a field the sidecars did not meter, in `window`, by series. A field's
    series appears at 1 with its first record, which `increase()` alone does not see: a series
    that is new in the window counts with its whole value."""
    m = f"soma_proxy_unmetered_usage_total{{{sel}}}"
    return f"({m} unless {m} offset {window}) or increase({m}[{window}])"


# --- the dashboards ----------------------------------------------------------------------------

def spend() -> Board:
    sel = 'namespace=~"$namespace", agent=~"$agent", model=~"$model"'
    b = Board("soma-spend", "Soma / Spend and tokens",
              "What agents spent and how many tokens they used, by namespace, Agent and model, as the "
              "sidecars metered it (soma_proxy_*). Cost is in the price table's currency.",
              [variable("namespace", "Namespace", "label_values(soma_proxy_tokens_total, namespace)"),
               variable("agent", "Agent", 'label_values(soma_proxy_tokens_total{namespace=~"$namespace"}, agent)'),
               variable("model", "Model", 'label_values(soma_proxy_tokens_total{namespace=~"$namespace"}, model)')])
    b.row("Totals over the selected range")
    b.panel("stat", "Spend", "Cost metered in the range (sidecars' price table, in currency units).",
            [(f"sum(increase(soma_proxy_cost_micros_total{{{sel}}}[$__range])) / {MICROS}", "spend")],
            w=6, h=4, instant=True, defaults={"decimals": 2})
    b.panel("stat", "Tokens", "Tokens metered in the range, every kind.",
            [(f"sum(increase(soma_proxy_tokens_total{{{sel}}}[$__range]))", "tokens")], w=6, h=4, instant=True)
    b.panel("stat", "Output tokens", "Completion tokens (reasoning tokens are counted separately).",
            [(f'sum(increase(soma_proxy_tokens_total{{{sel}, kind="output"}}[$__range]))', "output")],
            w=6, h=4, instant=True)
    b.panel("stat", "Requests", "Calls the sidecars answered in the range (every status).",
            [('sum(increase(soma_proxy_requests_total{namespace=~"$namespace", agent=~"$agent", model=~"$model"}[$__range]))',
              "requests")], w=6, h=4, instant=True)
    b.row("Spend")
    b.panel(TS, "Spend per hour by namespace", "Rate of metered cost, projected to an hour.",
            [(f"sum by (namespace) (rate(soma_proxy_cost_micros_total{{{sel}}}[$__rate_interval])) {PER_HOUR}",
              "{{namespace}}")], w=8, defaults={"decimals": 4})
    b.panel(TS, "Spend per hour by Agent", "Rate of metered cost per Agent (namespace/name).",
            [(f"sum by (namespace, agent) (rate(soma_proxy_cost_micros_total{{{sel}}}[$__rate_interval])) {PER_HOUR}",
              "{{namespace}}/{{agent}}")], w=8, defaults={"decimals": 4})
    b.panel(TS, "Spend per hour by model", "The model the provider was sent (after a brown-out, the cheaper one).",
            [(f"sum by (model) (rate(soma_proxy_cost_micros_total{{{sel}}}[$__rate_interval])) {PER_HOUR}",
              "{{model}}")], w=8, defaults={"decimals": 4})
    b.row("Tokens")
    b.panel(TS, "Tokens per second by kind", "input, cached_input, cache_write_input (cache_write_1h_input is the "
            "part written for an hour), output, reasoning (part of output).",
            [(f"sum by (kind) (rate(soma_proxy_tokens_total{{{sel}}}[$__rate_interval]))", "{{kind}}")])
    b.panel(TS, "Tokens per second by Agent and model", "All kinds together.",
            [(f"sum by (namespace, agent, model) (rate(soma_proxy_tokens_total{{{sel}}}[$__rate_interval]))",
              "{{namespace}}/{{agent}} {{model}}")])
    b.panel("table", "Spend and tokens by Agent and model (range)", "One row per Agent and model.",
            [(f"sum by (namespace, agent, model) (increase(soma_proxy_cost_micros_total{{{sel}}}[$__range])) / {MICROS}", "spend"),
             (f"sum by (namespace, agent, model) (increase(soma_proxy_tokens_total{{{sel}}}[$__range]))", "tokens")],
            w=24, instant=True,
            transformations=[{"id": "merge", "options": {}},
                             {"id": "organize", "options": {"excludeByName": {"Time": True},
                                                            "renameByName": {"Value #A": "spend", "Value #B": "tokens"}}}])
    b.row("Server tools and unmetered usage")
    b.panel(TS, "Server-tool uses per minute by Agent, model and tool", "Web searches and web fetches the provider "
            "ran and bills per use (priced by webSearchPerUse and webFetchPerUse).",
            [(f"sum by (namespace, agent, model, tool) (rate(soma_proxy_tool_uses_total{{{sel}}}[$__rate_interval])) * 60",
              "{{namespace}}/{{agent}} {{model}} {{tool}}")], w=12)
    agent_sel = 'namespace=~"$namespace", agent=~"$agent"'
    b.panel("stat", "Unmetered usage fields", "How often a usage record in the range carried a field the sidecars "
            "did not meter (a record with two such fields counts twice): spend may be under-metered (alert "
            "SomaUsageUnmetered). Should be 0. Not filtered by model.",
            [(f"sum({unmetered_in(agent_sel, '$__range')}) or vector(0)", "fields")], w=4, instant=True,
            options={"colorMode": "background", "graphMode": "none"},
            defaults={"decimals": 0, "thresholds": {"mode": "absolute", "steps": [
                {"color": "green", "value": None}, {"color": "red", "value": 1}]}})
    b.panel("table", "Unmetered usage fields (range)", "Each field not metered, and in how many records: unknown to "
            "the sidecar, known but unpriced, or a server-tool use without a per-use price "
            "(docs/observability.md, SomaUsageUnmetered). Empty when everything was metered.",
            [(f"sum by (namespace, agent, field) ({unmetered_in(agent_sel, '$__range')}) > 0", "records")],
            w=8, instant=True,
            transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                            "renameByName": {"Value": "records"}}}])
    return b


def budgets() -> Board:
    sel = 'namespace=~"$namespace", budget=~"$budget"'
    b = Board("soma-budgets", "Soma / Budgets",
              "Budgets as the operator reads them from the usage ledger (soma_budget_*, one series per "
              "Budget, labelled namespace and budget) and the refusals the sidecars made. Needs a ledger: "
              "without one, Budget status carries no spend and these series are not exported.",
              [variable("namespace", "Namespace", "label_values(soma_budget_used_ratio, namespace)"),
               variable("budget", "Budget", 'label_values(soma_budget_used_ratio{namespace=~"$namespace"}, budget)')])
    b.row("Now")
    b.panel("bargauge", "Used (tightest cap)", "Spent plus reserved over the tightest period cap.",
            [(f"max by (namespace, budget) (soma_budget_used_ratio{{{sel}}})", "{{namespace}}/{{budget}}")],
            unit="percentunit", w=12, h=8, instant=True,
            options={"orientation": "horizontal", "displayMode": "gradient"},
            defaults={"min": 0, "max": 1, "thresholds": {"mode": "absolute", "steps": [
                {"color": "green", "value": None}, {"color": "orange", "value": 0.8}, {"color": "red", "value": 1}]}})
    b.panel("stat", "Exhausted Budgets", "Budgets with a period cap used up now.",
            [(f"sum(soma_budget_exhausted{{{sel}}})", "exhausted")], w=6, h=4, instant=True)
    b.panel("stat", "Highest threshold reached", "The highest spec.thresholds entry reached this period, any Budget.",
            [(f"max(soma_budget_threshold_reached_ratio{{{sel}}})", "threshold")], unit="percentunit",
            w=6, h=4, instant=True)
    b.panel("table", "Budgets this period", "Spend from the ledger, caps and what is left (currency units and tokens).",
            [(f"max by (namespace, budget) (soma_budget_spent_micros{{{sel}}}) / {MICROS}", "spent"),
             (f"max by (namespace, budget) (soma_budget_limit_micros{{{sel}}}) / {MICROS}", "cap"),
             (f"max by (namespace, budget) (soma_budget_remaining_micros{{{sel}}}) / {MICROS}", "remaining"),
             (f"max by (namespace, budget) (soma_budget_spent_tokens{{{sel}}})", "spent tokens"),
             (f"max by (namespace, budget) (soma_budget_limit_tokens{{{sel}}})", "token cap")],
            w=24, instant=True,
            transformations=[{"id": "merge", "options": {}},
                             {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {
                                 "Value #A": "spent", "Value #B": "cap", "Value #C": "remaining",
                                 "Value #D": "spent tokens", "Value #E": "token cap"}}}])
    b.row("Over time")
    b.panel(TS, "Spent this period", "Resets at the start of each period.",
            [(f"max by (namespace, budget) (soma_budget_spent_micros{{{sel}}}) / {MICROS}", "{{namespace}}/{{budget}}")],
            defaults={"decimals": 4})
    b.panel(TS, "Used (tightest cap) over time", "",
            [(f"max by (namespace, budget) (soma_budget_used_ratio{{{sel}}})", "{{namespace}}/{{budget}}")],
            unit="percentunit")
    b.row("Refusals and brown-outs")
    b.panel(TS, "Refusals per minute by Budget", "Requests refused (429) because of the Budget, from its status.",
            [(f"sum by (namespace, budget) (rate(soma_budget_refusals_total{{{sel}}}[$__rate_interval])) * 60",
              "{{namespace}}/{{budget}}")], w=8)
    b.panel(TS, "Refusals per minute by limit (sidecars)", "Which cap or rate limit refused: the sidecars' own count.",
            [('sum by (budget_namespace, budget, limit) (rate(soma_proxy_budget_refusals_total{budget_namespace=~"$namespace", '
              'budget=~"$budget"}[$__rate_interval])) * 60', "{{budget_namespace}}/{{budget}} {{limit}}")], w=8)
    b.panel(TS, "Brown-outs per minute by Budget", "Requests sent to the Budget's brownOutModel instead.",
            [(f"sum by (namespace, budget) (rate(soma_budget_brownouts_total{{{sel}}}[$__rate_interval])) * 60",
              "{{namespace}}/{{budget}}")], w=8)
    b.panel(TS, "Remaining as each sidecar sees it", "Per pod: what the sidecar's share and the ledger leave it.",
            [('min by (budget_namespace, budget, pod) (soma_proxy_budget_remaining_micros{budget_namespace=~"$namespace", '
              f'budget=~"$budget"}}) / {MICROS}', "{{budget_namespace}}/{{budget}} {{pod}}")], w=24,
            defaults={"decimals": 4})
    return b


def sidecars() -> Board:
    sel = 'namespace=~"$namespace", agent=~"$agent"'
    b = Board("soma-sidecars", "Soma / Sidecars",
              "The metering sidecars (soma-proxy): the latency they add and the provider's, answers, errors "
              "and their connection to the usage ledger. Scraped per pod (the chart's PodMonitor adds "
              "namespace, pod and agent).",
              [variable("namespace", "Namespace", "label_values(soma_proxy_requests_total, namespace)"),
               variable("agent", "Agent", 'label_values(soma_proxy_requests_total{namespace=~"$namespace"}, agent)')])
    b.row("Latency")
    b.panel(TS, "Added latency", "Time the sidecar adds: before forwarding, and after the provider's body for non-streamed calls.",
            quantiles("soma_proxy_added_latency_seconds", "", sel), unit="s", w=8)
    b.panel(TS, "Added latency p99 by Agent", "",
            [(f"histogram_quantile(0.99, sum by (le, namespace, agent) (rate(soma_proxy_added_latency_seconds_bucket{{{sel}}}[$__rate_interval])))",
              "{{namespace}}/{{agent}}")], unit="s", w=8)
    b.panel(TS, "Upstream latency", "From sending to the provider until its response headers.",
            quantiles("soma_proxy_upstream_latency_seconds", "", sel), unit="s", w=8)
    b.row("Answers")
    b.panel(TS, "Requests per second by endpoint and status", "",
            [(f"sum by (endpoint, status) (rate(soma_proxy_requests_total{{{sel}}}[$__rate_interval]))",
              "{{endpoint}} {{status}}")], unit="reqps", w=8)
    b.panel(TS, "Errors per second by reason", "budget (429), budget_unavailable (503: the ledger is out of reach), "
            "overloaded (503: maxInFlight reached), upstream, upstream_timeout, outbox, stream_* (below), ...",
            [(f"sum by (reason) (rate(soma_proxy_errors_total{{{sel}}}[$__rate_interval]))", "{{reason}}")], w=8)
    b.panel(TS, "In-flight requests by Agent", "",
            [(f"sum by (namespace, agent) (soma_proxy_in_flight_requests{{{sel}}})", "{{namespace}}/{{agent}}")], w=8)
    b.panel(TS, "Usage estimated per minute", "Calls whose usage the provider did not report (cut streams, no usage): "
            "the sidecar recorded its own estimate.",
            [(f"sum by (namespace, agent) (rate(soma_proxy_estimated_records_total{{{sel}}}[$__rate_interval])) * 60",
              "{{namespace}}/{{agent}}")], w=12)
    b.panel(TS, "Live Budget updates", "Budget edits the sidecars took without a restart, by source and outcome.",
            [(f"sum by (source, outcome) (increase(soma_proxy_live_updates_total{{{sel}}}[$__rate_interval]))",
              "{{source}} {{outcome}}")], w=12)
    b.row("Streams")
    b.panel(TS, "Stream endings per minute by outcome", "How streamed answers ended: ok, client_disconnected, or the "
            "provider's failures after the 200: upstream_cut, upstream_timeout, upstream_error_event.",
            [(f"sum by (outcome) (rate(soma_proxy_stream_endings_total{{{sel}}}[$__rate_interval])) * 60",
              "{{outcome}}")], w=12)
    b.panel(TS, "Stream failures per minute by Agent", "Streams the provider failed after the client had its 200: "
            "stream_cut (connection broken), stream_idle_timeout (silent past timeouts.idleMs), stream_error_event. "
            "Metered from what was delivered (alert SomaSidecarStreamsFailing).",
            [(f'sum by (namespace, agent, reason) (rate(soma_proxy_errors_total{{{sel}, reason=~"{STREAM_FAILURES}"}}'
              f'[$__rate_interval])) * 60', "{{namespace}}/{{agent}} {{reason}}")], w=12)
    b.row("Outbox and delivery")
    b.panel(TS, "Records waiting in the outbox by sink", "Settled usage records not yet delivered to the ledger "
            "(PostgreSQL) or published to NATS, read from each sidecar's outbox when scraped.",
            [(f"sum by (namespace, agent, sink) (soma_proxy_outbox_pending_records{{{sel}}})",
              "{{namespace}}/{{agent}} {{sink}}")], w=12)
    b.panel(TS, "Oldest undelivered record by sink", "Age of the oldest record waiting for each sink, 0 when none "
            "(alert SomaOutboxBacklog past 5 minutes).",
            [(f"max by (namespace, agent, sink) (soma_proxy_outbox_oldest_pending_age_seconds{{{sel}}})",
              "{{namespace}}/{{agent}} {{sink}}")], unit="s", w=12)
    b.panel(TS, "Delivery rounds per minute by sink and outcome", "A round sends a batch of up to 500 records; "
            "an idle outbox still makes ok rounds every deliveryIntervalMs. `failed`: retried with a backoff up to "
            "30 s (alerts SomaSidecarLedgerUnreachable, SomaNatsDeliveryFailing).",
            [(f"sum by (sink, outcome) (rate(soma_proxy_deliveries_total{{{sel}}}[$__rate_interval])) * 60",
              "{{sink}} {{outcome}}")], w=12)
    b.panel(TS, "Records delivered per second by sink", "A record delivered again (its acknowledgement was lost) "
            "counts again.",
            [(f"sum by (sink) (rate(soma_proxy_delivered_records_total{{{sel}}}[$__rate_interval]))", "{{sink}}")],
            w=12)
    b.panel(TS, "Ledger transactions by kind and outcome", "The cluster budget authority's PostgreSQL transactions: "
            "top-ups (a request waited) and heartbeats. `failed`: the sidecar cannot reach the ledger.",
            [(f"sum by (kind, outcome) (rate(soma_proxy_budget_lease_transactions_total{{{sel}}}[$__rate_interval]))",
              "{{kind}} {{outcome}}")], w=12)
    b.panel(TS, "Operator's ledger errors", "The operator's reads of spend and its seals that failed "
            "(Budget status is stale meanwhile).",
            [("sum by (operation) (rate(soma_ledger_errors_total[$__rate_interval]))", "{{operation}}")], w=12)
    return b


def operator() -> Board:
    b = Board("soma-operator", "Soma / Operator",
              "The operator: reconciles, the admission webhook and its policies, signature verification "
              "of Capsules and agent images, Jobs and DR drills, and the autoscaler's decisions and brown-outs.", [])
    b.row("Reconcile")
    b.panel(TS, "Reconciles per second by controller", "",
            [("sum by (controller) (rate(soma_reconcile_total[$__rate_interval]))", "{{controller}}")], w=8)
    b.panel(TS, "Reconcile failures per second", "By controller and the error's label.",
            [("sum by (controller, reason) (rate(soma_reconcile_failures_total[$__rate_interval]))",
              "{{controller}} {{reason}}")], w=8)
    b.panel(TS, "Reconcile duration p95 by controller", "",
            [("histogram_quantile(0.95, sum by (le, controller) (rate(soma_reconcile_duration_seconds_bucket[$__rate_interval])))",
              "{{controller}}")], unit="s", w=8)
    b.panel(TS, "Writes per second", "Status and child writes: only when something changed, so a converged "
            "cluster writes nothing.",
            [("sum by (controller) (rate(soma_status_writes_total[$__rate_interval]))", "status {{controller}}"),
             ("sum by (controller) (rate(soma_child_writes_total[$__rate_interval]))", "children {{controller}}")], w=24)
    b.row("Admission webhook and policies")
    b.panel(TS, "Admission decisions per second", "allowed, denied, invalid, error (fail-closed refusals), fail_open.",
            [("sum by (decision) (rate(soma_admission_requests_total[$__rate_interval]))", "{{decision}}")], w=8)
    b.panel(TS, "Denials per second by kind", "",
            [('sum by (kind, operation) (rate(soma_admission_requests_total{decision="denied"}[$__rate_interval]))',
              "{{kind}} {{operation}}")], w=8)
    b.panel(TS, "Policy violations per second", "By policy and enforcement action (deny, warn, dryrun).",
            [("sum by (policy, action) (rate(soma_policy_violations_total[$__rate_interval]))", "{{policy}} {{action}}")], w=8)
    b.panel(TS, "Webhook latency", "Time to answer an AdmissionReview; decisions past the deadline fail.",
            quantiles("soma_admission_duration_seconds", "", ""), unit="s", w=8)
    b.panel(TS, "Webhook errors per second", "deadline, overloaded, evaluation, internal: no decision "
            "(fail-closed: refused); malformed, too_large, body: bad requests.",
            [("sum by (reason) (rate(soma_admission_errors_total[$__rate_interval]))", "{{reason}}")], w=8)
    b.panel(TS, "Policies", "Constraints enforced per replica, and policies that failed to load.",
            [("max by (instance) (soma_policy_constraints)", "constraints {{instance}}"),
             ("sum by (reason) (increase(soma_policy_load_errors_total[$__rate_interval]))", "load errors {{reason}}")], w=8)
    b.row("Signatures")
    b.panel(TS, "Signature checks per minute", "Answers of the verifier (cached answers are not counted), by kind, "
            "outcome and reason.",
            [("sum by (kind, outcome, reason) (rate(soma_signature_verifications_total[$__rate_interval])) * 60",
              "{{kind}} {{outcome}} {{reason}}")], w=8)
    b.panel(TS, "Signature check duration p95", "Registry round trips included.",
            [("histogram_quantile(0.95, sum by (le, kind) (rate(soma_signature_verification_duration_seconds_bucket[$__rate_interval])))",
              "{{kind}}")], unit="s", w=8)
    b.panel("table", "Held back by a rejected signature", "Capsules, and Agents whose image, are not trusted now.",
            [("max by (kind, namespace, name, reason) (soma_signature_rejected) == 1", "")], w=8, instant=True,
            transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}])
    b.row("Jobs and DR drills")
    b.panel(TS, "Jobs finished per hour", "Soma Jobs (one-shot tasks and drills) that finished, by namespace and "
            "phase; a failed one has a Warning Event naming why.",
            [("sum by (namespace, phase) (increase(soma_jobs_finished_total[1h]))", "{{namespace}} {{phase}}")], w=8)
    b.panel(TS, "DR drills passing", "1 when a drill's last run restored the ledger and verified it, 0 when it "
            "failed (kubectl describe sjob names the first discrepancy).",
            [("max by (namespace, name) (soma_drill_passed)", "{{namespace}}/{{name}}")], w=8)
    b.panel(TS, "DR drill recovery point and time", "The last run's RPO (seconds of committed usage the backup "
            "missed) and RTO (start of the restore to a verified restore).",
            [("max by (namespace, name) (soma_drill_rpo_seconds)", "RPO {{namespace}}/{{name}}"),
             ("max by (namespace, name) (soma_drill_rto_seconds)", "RTO {{namespace}}/{{name}}")], unit="s", w=8)
    b.panel(TS, "Records restored by the last drill", "Usage records the last run restored and verified.",
            [("max by (namespace, name) (soma_drill_records_restored)", "{{namespace}}/{{name}}")], w=8)
    b.row("Autoscaler")
    b.panel(TS, "Desired replicas by Agent", "What each autoscaled Agent's scaling loop decided at its last step "
            "(status.scaling.desiredReplicas says why).",
            [("max by (namespace, agent) (soma_autoscaler_desired_replicas)", "{{namespace}}/{{agent}}")], w=6)
    b.panel(TS, "Conductance by Agent", "Conductance C of each Agent's route, in replicas: grows with sustained "
            "flow and decays without it.",
            [("max by (namespace, agent) (soma_autoscaler_conductance)", "{{namespace}}/{{agent}}")], w=6)
    b.panel(TS, "Autoscaler decisions per minute", "By Agent, direction (up, down, none) and the rule that set the "
            "count (ErlangFloor, Conductance, FloorHold, Cap, ReversalHold, …); Cap for long: alert "
            "SomaAutoscalerAtMaxReplicas.",
            [("sum by (namespace, agent, direction, reason) (rate(soma_autoscaler_decisions_total[$__rate_interval])) * 60",
              "{{namespace}}/{{agent}} {{direction}} {{reason}}")], w=6)
    b.panel(TS, "Brown-out by Agent", "Share of each Agent's lowest-priority traffic its sidecars are asked to shed "
            "or downgrade because no count within maxReplicas meets the wait target (0: none; alert SomaAgentBrownOut).",
            [("max by (namespace, agent) (soma_autoscaler_brownout)", "{{namespace}}/{{agent}}")],
            unit="percentunit", w=6)
    return b


BOARDS = [spend, budgets, sidecars, operator]


def dashboards() -> dict[pathlib.Path, str]:
    out = {}
    for make in BOARDS:
        board = make()
        out[DASHBOARDS / f"{board.uid}.json"] = json.dumps(board.json(), indent=2) + "\n"
    return out


# --- Argo CD health checks ---------------------------------------------------------------------

ARGOCD_KINDS = ["Agent", "Budget", "Capsule", "Job"]


def argocd_snippet() -> dict[pathlib.Path, str]:
    """The argocd-cm keys that install the health checks, as a ConfigMap to merge."""
    lines = [
        "# Argo CD health checks for Soma's resources. Generated by charts/generate.py from",
        "# charts/soma/argocd/*.lua; docs/observability.md explains the mapping.",
        "# Merge into Argo CD's argocd-cm (for example `kubectl -n argocd patch configmap argocd-cm",
        "# --patch-file charts/soma/argocd/argocd-cm.yaml`), or copy the keys into the",
        "# `configs.cm` values of the argo-cd Helm chart.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: argocd-cm",
        "  namespace: argocd",
        "  labels:",
        "    app.kubernetes.io/name: argocd-cm",
        "    app.kubernetes.io/part-of: argocd",
        "data:",
    ]
    for kind in ARGOCD_KINDS:
        script = (ARGOCD / f"{kind.lower()}.lua").read_text()
        lines.append(f"  resource.customizations.health.soma.dev_{kind}: |")
        lines.extend(("    " + l).rstrip() for l in script.splitlines())
    return {ARGOCD / "argocd-cm.yaml": "\n".join(lines) + "\n"}


def main() -> int:
    check = "--check" in sys.argv[1:]
    files = {**dashboards(), **argocd_snippet()}
    stale = []
    for path, text in files.items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(HERE.parent)))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(HERE.parent)}")
    if check:
        known = {p.name for p in files if p.parent == DASHBOARDS}
        stray = [p.name for p in DASHBOARDS.glob("*.json") if p.name not in known]
        if stale or stray:
            print("charts/generate.py: out of date (run `charts/generate.py`): " + ", ".join(stale + stray),
                  file=sys.stderr)
            return 1
        print(f"{len(files)} generated files up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
