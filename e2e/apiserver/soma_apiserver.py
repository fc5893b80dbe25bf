"""A Kubernetes API stand-in, built on kmock, that a kube-rs controller can run against over HTTP.

No real API server can run on the machines Soma is developed on, so the running controller loop
(`soma-operator run`) is exercised against this process instead. It serves the REST surface a
kube-rs client and kube-runtime's watcher/Controller/Recorder actually use, with the server-side
semantics a controller's correctness depends on:

    kube-rs client ──HTTP──▶ kmock.Server (aiohttp) ──▶ SomaApiServer(kmock.KubernetesScaffold)
                                                          │  kmock: request log, DSL reactions,
                                                          │         discovery, error rendering
                                                          ▼
                                                        store: objects, per-resource event history,
                                                               managed fields, request counters

kmock 0.8's own stateful ``KubernetesEmulator`` merges dicts and replays everything on watch; it
has no uid/resourceVersion/generation stamping, no list resourceVersion, no watch-from-version,
no label selectors, no create-by-apply, no PUT, no status subresource and no optimistic locking,
and its path parser crashes on ``/api/v1/namespaces``. This module keeps kmock's plumbing (HTTP
server, request recording, user reactions with priority over the store — so a test can still
inject ``srv['post /api/v1/namespaces/x/configmaps'] << 500`` — discovery and the 404 fallback)
and replaces the object store with one that behaves like the real API server in those respects.

What it emulates, what it does not: see README.md beside this file.

Run:  python soma_apiserver.py --port 0 --crds crds/ [--port-file F] [--no-deployment-controller] [--deployment-pods]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import random
import re
import signal
import string
import sys
import uuid
from typing import Any, Iterable

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import parsing as _kmock_parsing

log = logging.getLogger("soma-apiserver")

# ---------------------------------------------------------------------------------------------
# kmock 0.8 fix: its path parser raises ValueError on `/api/v1/namespaces` (and reads
# `/api/v1/namespaces/foo` as "namespace foo, no resource"), which turns every namespace
# request into a 500 before any handler runs. Namespaces are a resource like any other here.
# ---------------------------------------------------------------------------------------------
_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?")
_kmock_parse_path = _kmock_parsing.parse_path


def _parse_path(path: str) -> _kmock_parsing.ParsedPath:
    m = _NAMESPACE_PATH.fullmatch(path)
    if m:
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None, m.group(1), m.group(2))
    return _kmock_parse_path(path)


_kmock_parsing.parse_path = _parse_path

# ---------------------------------------------------------------------------------------------
# Resource kinds
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False  # has a /status subresource
    generation: bool = True  # metadata.generation is maintained
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.group}/{self.version}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource(self) -> str:
        """The `plural.group` name used in API error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


BUILTIN_KINDS = [
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, status=True, generation=False, short_names=("ns",)),
    Kind("", "v1", "configmaps", "ConfigMap", generation=False, short_names=("cm",)),
    Kind("", "v1", "secrets", "Secret", generation=False),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", generation=False, short_names=("sa",)),
    Kind("", "v1", "services", "Service", status=True, generation=False, short_names=("svc",)),
    Kind("", "v1", "events", "Event", generation=False, short_names=("ev",)),
    Kind("", "v1", "pods", "Pod", status=True, generation=False, short_names=("po",)),
    Kind("apps", "v1", "deployments", "Deployment", status=True, short_names=("deploy",)),
    Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
    Kind("coordination.k8s.io", "v1", "leases", "Lease", generation=False),
    Kind("events.k8s.io", "v1", "events", "Event", generation=False, short_names=("ev",)),
    Kind("batch", "v1", "jobs", "Job", status=True),
    Kind("batch", "v1", "cronjobs", "CronJob", status=True),
    Kind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", status=True, short_names=("pdb",)),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role", generation=False),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", generation=False),
    Kind("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations",
         "ValidatingWebhookConfiguration", namespaced=False),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
         namespaced=False, status=True, short_names=("crd", "crds")),
]

CRD_KEY = "apiextensions.k8s.io/v1/customresourcedefinitions"
NAMESPACE_KEY = "/v1/namespaces"
DEPLOYMENT_KEY = "apps/v1/deployments"
SERVICE_KEY = "/v1/services"
JOB_KEY = "batch/v1/jobs"
CRONJOB_KEY = "batch/v1/cronjobs"
POD_KEY = "/v1/pods"


def kinds_from_crd(crd: dict[str, Any]) -> list[Kind]:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out = []
    for ver in spec.get("versions") or []:
        if not ver.get("served", True):
            continue
        out.append(Kind(
            group=spec["group"], version=ver["name"], plural=names["plural"], kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            status="status" in ((ver.get("subresources") or {})),
            singular=names.get("singular", ""),
            short_names=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()),
        ))
    return out


# ---------------------------------------------------------------------------------------------
# Small helpers: errors, time, selectors, field paths
# ---------------------------------------------------------------------------------------------

class ApiError(Exception):
    """A failure rendered as a `kind: Status` body, as the real API server does."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def body(self) -> dict[str, Any]:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind.resource} "{name}" not found',
                    {"name": name, "group": kind.group, "kind": kind.plural})


def conflict(kind: Kind, name: str, why: str = "the object has been modified; please apply your "
             "changes to the latest version and try again") -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.resource} "{name}": {why}',
                    {"name": name, "group": kind.group, "kind": kind.plural})


_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def validate_labels(kind: Kind, obj: dict[str, Any]) -> None:
    """Label values as the real API server checks them on create and apply: at most 63
    characters, alphanumerics with '-', '_' and '.' inside (422 Invalid otherwise)."""
    meta = obj.get("metadata") or {}
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE_RE.fullmatch(value):
            raise ApiError(422, "Invalid", f'{kind.kind} "{meta.get("name")}" is invalid: metadata.labels: '
                           f'Invalid value: "{value}": must be no more than 63 characters and consist of '
                           "alphanumeric characters, '-', '_' or '.', starting and ending with one (label "
                           f"{key})")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclasses.dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # '=', '!=', 'in', 'notin', 'exists', '!exists'
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # '!=' and 'notin' match objects without the label, as in Kubernetes.
        return labels.get(self.key) not in self.values


_SET_RE = re.compile(r"\s*([^\s!=,()]+)\s+(in|notin)\s*\(([^)]*)\)\s*")
_EQ_RE = re.compile(r"\s*([^\s!=,()]+)\s*(==|=|!=)\s*([^\s!=,()]*)\s*")
_EXISTS_RE = re.compile(r"\s*(!?)\s*([^\s!=,()]+)\s*")


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse `a=b,c!=d,e,!f,g in (x,y),h notin (z)` into requirements (all must hold)."""
    if not text:
        return []
    reqs: list[Requirement] = []
    parts, depth, cur = [], 0, ""
    for ch in text:  # split on commas outside parentheses
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in parts:
        if m := _SET_RE.fullmatch(part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(Requirement(m.group(1), m.group(2), values))
        elif m := _EQ_RE.fullmatch(part):
            reqs.append(Requirement(m.group(1), "!=" if m.group(2) == "!=" else "=", frozenset([m.group(3)])))
        elif m := _EXISTS_RE.fullmatch(part):
            reqs.append(Requirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r} in labelSelector {text!r}")
    return reqs


def parse_field_selector(text: str | None) -> list[tuple[tuple[str, ...], bool, str]]:
    """`metadata.name=x,metadata.namespace!=y` → [(path, equal?, value)]."""
    out = []
    for part in filter(None, (text or "").split(",")):
        m = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        out.append((tuple(m.group(1).split(".")), m.group(2) != "!=", m.group(3)))
    return out


_MISSING = object()


def get_path(obj: Any, path: Iterable[str]) -> Any:
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return _MISSING
        obj = obj[p]
    return obj


def del_path(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    parents = []
    for p in path[:-1]:
        if not isinstance(obj.get(p), dict):
            return
        parents.append((obj, p))
        obj = obj[p]
    obj.pop(path[-1], None)
    # Prune maps the removal left empty (but never the object's top-level sections).
    for parent, key in reversed(parents[1:]):
        if parent[key] == {}:
            del parent[key]


# Paths no field manager owns: identity and server-maintained metadata.
_UNOWNED = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"),
            ("metadata", "resourceVersion"), ("metadata", "uid"), ("metadata", "managedFields"),
            ("metadata", "creationTimestamp"), ("metadata", "generation"),
            ("metadata", "deletionTimestamp"), ("metadata", "deletionGracePeriodSeconds"),
            ("metadata", "generateName")}


def leaf_paths(obj: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Field paths of a JSON object: maps are walked, everything else (lists too) is atomic."""
    if isinstance(obj, dict) and (obj or not prefix):
        out: set[tuple[str, ...]] = set()
        for k, v in obj.items():
            out |= leaf_paths(v, prefix + (k,))
        return out
    return {prefix}


def owned_paths(obj: dict[str, Any], section: str | None) -> set[tuple[str, ...]]:
    """The fields a write of `obj` claims: `section` is 'status' for /status, else None (main)."""
    # Empty maps are structure, not values: nobody owns them (a Lease created with `spec: {}`
    # must not make every later `spec.*` apply conflict with its creator).
    paths = {p for p in leaf_paths(obj) if not any(p[:len(u)] == u for u in _UNOWNED) and get_path(obj, p) != {}}
    if section == "status":
        return {p for p in paths if p[0] == "status"}
    return paths


def diff_paths(a: Any, b: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    if isinstance(a, dict) or isinstance(b, dict):
        if not isinstance(a, dict) or not isinstance(b, dict):  # a map appeared, vanished or changed type
            paths = {prefix} if any(not isinstance(x, dict) and x is not _MISSING for x in (a, b)) else set()
            for x in (a, b):
                if isinstance(x, dict):
                    paths |= leaf_paths(x, prefix)
            return paths
        out: set[tuple[str, ...]] = set()
        for k in set(a) | set(b):
            out |= diff_paths(a.get(k, _MISSING), b.get(k, _MISSING), prefix + (k,))
        return out
    return set() if a == b else {prefix}


def overlaps(p: tuple[str, ...], q: tuple[str, ...]) -> bool:
    n = min(len(p), len(q))
    return p[:n] == q[:n]


def fields_v1(paths: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for p in path:
            node = node.setdefault(f"f:{p}", {})
    return root


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge and, without nulls, for apply)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strip_for_compare(obj: dict[str, Any]) -> dict[str, Any]:
    o = dict(obj)
    meta = dict(o.get("metadata") or {})
    meta.pop("resourceVersion", None)
    meta.pop("managedFields", None)
    o["metadata"] = meta
    return o


def non_meta(obj: dict[str, Any]) -> dict[str, Any]:
    """What generation tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

ObjKey = tuple[str, str, str]  # (kind.key, namespace or '', name)


@dataclasses.dataclass
class WatchEvent:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclasses.dataclass
class Manager:
    paths: set[tuple[str, ...]]
    api_version: str
    time: str


@attrs.define(kw_only=True)
class SomaApiServer(kmock.KubernetesScaffold):
    """kmock's Kubernetes scaffold plus a stateful object store that behaves like the real thing."""

    deployment_controller: bool = True
    deployment_delay: float = 0.2  # seconds between a Deployment write and its status update
    # Test-only: a Deployment's replicas become Running, Ready pods with distinct loopback IPs
    # (127.0.0.2 …), so tests can serve each pod's ports with a real process on that address.
    deployment_pods: bool = False
    job_controller: bool = True
    job_delay: float = 0.2  # seconds between two steps of the batch/v1 Job emulation
    bookmark_interval: float = 5.0
    history_limit: int = 20000  # watch events kept per resource before a watch gets 410 Gone
    request_log_limit: int = 2000  # requests kmock keeps for DSL assertions (counters are separate)

    kinds: dict[str, Kind] = attrs.field(factory=dict, init=False)
    objects: dict[ObjKey, dict[str, Any]] = attrs.field(factory=dict, init=False)  # type: ignore[assignment]
    managers: dict[ObjKey, dict[tuple[str, str, str], Manager]] = attrs.field(factory=dict, init=False)
    history: dict[str, list[WatchEvent]] = attrs.field(factory=lambda: collections.defaultdict(list), init=False)
    compacted: dict[str, int] = attrs.field(factory=dict, init=False)  # kind → last dropped rv
    rv: int = attrs.field(default=1000, init=False)
    request_counts: collections.Counter[tuple[str, str, str, str, str]] = attrs.field(
        factory=collections.Counter, init=False)
    change_counts: collections.Counter[tuple[str, str, str]] = attrs.field(factory=collections.Counter, init=False)
    # Writes by client: (verb, resource, namespace, name, subresource, the client's bearer token).
    # A test that gives each process its own token (its kubeconfig's user.token) sees who wrote.
    write_counts: collections.Counter[tuple[str, str, str, str, str, str]] = attrs.field(
        factory=collections.Counter, init=False)
    _changed: asyncio.Condition | None = attrs.field(default=None, init=False)
    _tasks: set[asyncio.Task[Any]] = attrs.field(factory=set, init=False)
    _ip_counter: int = attrs.field(default=0, init=False)
    # Test-only: every status a `soma.dev/*` field manager (the operator's controllers) writes
    # on a soma.dev resource, one JSON object per line (--status-log, or $SOMA_STATUS_LOG_DIR).
    status_log: Any = attrs.field(default=None, init=False)
    _writer: str = attrs.field(default="", init=False)
    # The batch/v1 Job emulation: each Job's planned attempts (set by tests), which Jobs tick.
    job_plans: dict[tuple[str, str], list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _job_ticking: set[ObjKey] = attrs.field(factory=set, init=False)
    # Service-account tokens this process issued (TokenRequest), by token, and its signing key.
    _tokens: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _token_key: pathlib.Path | None = attrs.field(default=None, init=False)

    class _Serve(Exception):
        """Raised by the fallback reaction: the request is for the store (no user reaction took it)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback["get /_stats"] << (lambda: self.stats())
        for probe in ("/healthz", "/readyz", "/livez"):
            self.fallback[f"get {probe}"] << b"ok"
        self.fallback[lambda request: request.url.path.startswith("/_jobs/")] << self._plan_endpoint
        self.fallback[lambda request: request.url.path.startswith("/_kueue/")] << self._kueue_endpoint
        self.fallback[lambda request: request.url.path.startswith("/_cronjobs/")] << self._cronjob_endpoint
        self.fallback[lambda request: self._route(request) is not None] << self._delegate
        for kind in BUILTIN_KINDS:
            self.register(kind)
        for ns in ("default", "kube-system"):
            self._create_internal(self.kinds[NAMESPACE_KEY], {"metadata": {"name": ns}})

    def _delegate(self, request: kmock.Request) -> None:
        raise SomaApiServer._Serve()

    # ---- kinds -------------------------------------------------------------------------------

    def register(self, kind: Kind) -> None:
        self.kinds[kind.key] = kind
        subresources = {"status"} if kind.status else set()
        self.resources[kmock.resource(kind.group, kind.version, kind.plural)] = kmock.ResourceInfo(
            kind=kind.kind, namespaced=kind.namespaced, singular=kind.singular or kind.kind.lower(),
            verbs={"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"},
            shortnames=set(kind.short_names), categories=set(kind.categories), subresources=subresources)

    def load_crds(self, directory: pathlib.Path) -> int:
        n = 0
        for path in sorted(directory.glob("*.y*ml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    self._create_internal(self.kinds[CRD_KEY], doc)
                    n += 1
        return n

    async def _serve_version(self, request: kmock.Request) -> Any:
        """kmock's APIResourceList, with subresources described as kubectl expects them.

        kmock 0.8 repeats the parent's categories and short names on `x/status`, so `kubectl get
        soma` tries to list "jobs/status"; and it names the core group version "/v1".
        """
        result = await super()._serve_version(request)
        result["groupVersion"] = result["groupVersion"].lstrip("/")
        for entry in result.get("resources", []):
            if "/" in entry["name"]:
                entry.update(categories=[], shortNames=[], verbs=["get", "patch", "update"])
            entry["verbs"] = sorted(entry["verbs"])
        return result

    # ---- routing -----------------------------------------------------------------------------

    def _route(self, request: kmock.Request) -> tuple[Kind, str | None, str | None, str | None] | None:
        """(kind, namespace, name, subresource) for a resource URL the store serves, else None."""
        parts = [p for p in request.url.path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            return None
        kind = self.kinds.get(f"{group}/{version}/{rest[0]}")
        if kind is None:
            return None
        if namespace is not None and not kind.namespaced:
            return None
        name = rest[1] if len(rest) >= 2 else None
        sub = rest[2] if len(rest) == 3 else None
        if sub is not None and (sub != "status" or not kind.status):
            return None
        return kind, namespace, name, sub

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        raw_request = request._raw_request
        if raw_request is not None and raw_request.method.upper() == "POST":
            authn = self._authentication(request.url.path, request.body or b"")
            if authn is not None:
                return aiohttp.web.json_response(authn[0], status=authn[1])
        # kmock 0.8 matches a request against a reaction by scanning every request recorded so
        # far (`request in view`), so each request costs O(requests served): after a few thousand
        # requests a controller's calls take 100 ms each. Keep its log bounded, and when no test
        # has added reactions of its own (everything registered is a fallback), route directly.
        if len(self._requests) > self.request_log_limit:
            del self._requests[:-self.request_log_limit // 2]
        route = self._route(request)
        if route is None or any(-math.inf not in payload.priorities for payload in self._payloads):
            try:
                return await super()._handle(request)
            except SomaApiServer._Serve:
                pass
        assert route is not None
        kind, namespace, name, sub = route
        raw = request._raw_request
        assert raw is not None
        params = dict(raw.query)
        method = raw.method.upper()
        verb = self._verb(method, name, params, raw.headers.get("Content-Type", ""))
        self.request_counts[(verb, kind.key, namespace or "", name or "", sub or "")] += 1
        if verb not in ("get", "list", "watch"):
            token = raw.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            self.write_counts[(verb, kind.key, namespace or "", name or "", sub or "", token)] += 1
        try:
            if verb == "watch":
                return await self._watch(raw, kind, namespace, name, params)
            result, status = self._dispatch(verb, kind, namespace, name, sub, params, request.body, raw)
            return aiohttp.web.json_response(result, status=status)
        except ApiError as e:
            return aiohttp.web.json_response(e.body(), status=e.code)

    @staticmethod
    def _verb(method: str, name: str | None, params: dict[str, str], ctype: str) -> str:
        if method == "GET":
            return "watch" if params.get("watch") in ("true", "1") else ("get" if name else "list")
        if method == "POST":
            return "create"
        if method == "PUT":
            return "update"
        if method == "PATCH":
            return "apply" if ctype.startswith("application/apply-patch") else "patch"
        if method == "DELETE":
            return "delete" if name else "deletecollection"
        return method.lower()

    def _dispatch(self, verb: str, kind: Kind, namespace: str | None, name: str | None, sub: str | None,
                  params: dict[str, str], body: bytes, raw: aiohttp.web.BaseRequest) -> tuple[Any, int]:
        if kind.namespaced and namespace is None and verb not in ("list", "watch"):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({kind.resource})")
        dry_run = params.get("dryRun") == "All"
        manager = params.get("fieldManager") or raw.headers.get("User-Agent", "unknown").split("/")[0]
        # The status log is for what the operator writes: a test's own writes (python-requests,
        # even under a soma.dev/* field manager) and dry runs are not logged.
        test_client = raw.headers.get("User-Agent", "").startswith("python-requests")
        self._writer = "" if dry_run or test_client else manager
        if verb == "get":
            assert name is not None
            return self._get(kind, namespace, name), 200
        if verb == "list":
            return self._list(kind, namespace, params), 200
        if "protobuf" in raw.headers.get("Content-Type", ""):
            raise ApiError(415, "UnsupportedMediaType", "protobuf bodies are not supported by this stand-in: "
                           "send JSON (e.g. `kubectl apply --server-side` instead of `kubectl create`)")
        data = self._json(body) if body else None
        if verb == "create":
            if sub is not None or name is not None:
                raise ApiError(405, "MethodNotAllowed", "create is only allowed on collections")
            return self._create(kind, namespace, data, manager, dry_run), 201
        assert name is not None or verb == "deletecollection"
        if verb == "update":
            return self._replace(kind, namespace, name, sub, data, manager, dry_run), 200
        if verb == "apply":
            force = params.get("force") in ("true", "1")
            if not params.get("fieldManager"):
                raise ApiError(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: "
                               "Required value: is required for apply patch")
            obj, created = self._apply(kind, namespace, name, sub, data, manager, force, dry_run)
            return obj, 201 if created else 200
        if verb == "patch":
            ctype = raw.headers.get("Content-Type", "").split(";")[0].strip()
            return self._patch(kind, namespace, name, sub, ctype, data, manager, dry_run), 200
        if verb == "delete":
            return self._delete(kind, namespace, name, data or {}, dry_run)
        if verb == "deletecollection":
            items = [o for o in self._select(kind, namespace, params)]
            for o in items:
                self._delete(kind, namespace, o["metadata"]["name"], data or {}, dry_run)
            return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                    "metadata": {"resourceVersion": str(self.rv)}, "items": items}, 200
        raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported")

    @staticmethod
    def _json(body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError:
            try:  # kubectl may send YAML for apply patches
                return yaml.safe_load(body)
            except yaml.YAMLError as e:
                raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {e}")

    # ---- reads -------------------------------------------------------------------------------

    def _key(self, kind: Kind, namespace: str | None, name: str) -> ObjKey:
        return (kind.key, namespace or "" if kind.namespaced else "", name)

    def _get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.objects.get(self._key(kind, namespace, name))
        if obj is None:
            raise not_found(kind, name)
        return obj

    def _matcher(self, kind: Kind, namespace: str | None, params: dict[str, str], name: str | None = None):
        labels = parse_label_selector(params.get("labelSelector"))
        fields = parse_field_selector(params.get("fieldSelector"))

        def matches(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            meta = obj.get("metadata") or {}
            if kind.namespaced and namespace is not None and meta.get("namespace") != namespace:
                return False
            if name is not None and meta.get("name") != name:
                return False
            obj_labels = meta.get("labels") or {}
            if not all(r.matches(obj_labels) for r in labels):
                return False
            for path, equal, value in fields:
                got = get_path(obj, path)
                got = "" if got is _MISSING else str(got)
                if (got == value) != equal:
                    return False
            return True
        return matches

    def _select(self, kind: Kind, namespace: str | None, params: dict[str, str]) -> list[dict[str, Any]]:
        matches = self._matcher(kind, namespace, params)
        keys = sorted(k for k in self.objects if k[0] == kind.key)
        return [self.objects[k] for k in keys if matches(self.objects[k])]

    def _list(self, kind: Kind, namespace: str | None, params: dict[str, str]) -> dict[str, Any]:
        items = self._select(kind, namespace, params)
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        start = 0
        if params.get("continue"):
            try:
                token = json.loads(base64.b64decode(params["continue"]))
                start, meta["resourceVersion"] = int(token["start"]), str(token["rv"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, "BadRequest", "invalid continue token")
        limit = int(params.get("limit") or 0)
        if limit > 0 and start + limit < len(items):
            token = {"start": start + limit, "rv": meta["resourceVersion"]}
            meta["continue"] = base64.b64encode(json.dumps(token).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
            items = items[start:start + limit]
        else:
            items = items[start:]
        return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List", "metadata": meta, "items": items}

    # ---- writes ------------------------------------------------------------------------------

    def _check_namespace(self, kind: Kind, namespace: str | None) -> None:
        if kind.namespaced:
            ns = self.objects.get((NAMESPACE_KEY, "", namespace or ""))
            if ns is None:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})

    def _validate_identity(self, kind: Kind, namespace: str | None, name: str | None, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        meta = obj.get("metadata") or {}
        if name is not None and meta.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if kind.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                           "namespace sent on the request")
        api_version, obj_kind = obj.get("apiVersion"), obj.get("kind")
        if api_version not in (None, kind.api_version) or obj_kind not in (None, kind.kind):
            raise ApiError(400, "BadRequest", f"{obj_kind} in version {api_version!r} cannot be handled as a "
                           f"{kind.kind}")

    def _create(self, kind: Kind, namespace: str | None, obj: Any, manager: str, dry_run: bool) -> dict[str, Any]:
        self._validate_identity(kind, namespace, None, obj)
        return self._create_internal(kind, obj, namespace, manager, "Update", dry_run)

    def _create_internal(self, kind: Kind, obj: dict[str, Any], namespace: str | None = None,
                         manager: str | None = None, operation: str = "Update", dry_run: bool = False,
                         owned: set[tuple[str, ...]] | None = None) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{kind.kind} is invalid: metadata.name: Required value: name or "
                           "generateName is required")
        if not _NAME_RE.fullmatch(name) or len(name) > 253:
            raise ApiError(422, "Invalid", f'{kind.kind} "{name}" is invalid: metadata.name: Invalid value: '
                           f'"{name}": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric '
                           "characters, '-' or '.'")
        validate_labels(kind, obj)
        if kind.namespaced:
            namespace = namespace or meta.get("namespace")
            meta["namespace"] = namespace
            self._check_namespace(kind, namespace)
        else:
            meta.pop("namespace", None)
        key = self._key(kind, namespace, name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{kind.resource} "{name}" already exists',
                           {"name": name, "group": kind.group, "kind": kind.plural})
        if kind.status and kind.key != NAMESPACE_KEY:
            obj.pop("status", None)  # status is written through /status only
        for server_field in ("resourceVersion", "managedFields", "deletionTimestamp", "generation"):
            meta.pop(server_field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        if kind.generation:
            meta["generation"] = 1
        self._defaults_on_create(kind, obj)
        if dry_run:
            return obj
        if manager is not None:
            paths = owned if owned is not None else owned_paths(obj, None)
            self.managers[key] = {(manager, operation, ""): Manager(paths, kind.api_version, now_rfc3339())}
        self._commit(kind, key, obj, None)
        return self.objects[key]

    def _defaults_on_create(self, kind: Kind, obj: dict[str, Any]) -> None:
        """The few server-side defaults a client may depend on."""
        if kind.key == NAMESPACE_KEY:
            obj["status"] = {"phase": "Active"}
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        elif kind.key == SERVICE_KEY:
            spec = obj.setdefault("spec", {})
            if spec.get("type") != "ExternalName" and "clusterIP" not in spec:
                self._ip_counter += 1
                ip = f"10.96.{self._ip_counter // 250}.{self._ip_counter % 250 + 1}"
                spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
        elif kind.key == CRD_KEY:
            obj["status"] = {"conditions": [
                {"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": now_rfc3339()}
                for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))],
                "acceptedNames": (obj.get("spec") or {}).get("names", {})}

    def _precondition(self, kind: Kind, name: str, old: dict[str, Any], new_meta: dict[str, Any]) -> None:
        want = new_meta.get("resourceVersion")
        if want and want != old["metadata"]["resourceVersion"]:
            raise conflict(kind, name)
        want_uid = new_meta.get("uid")
        if want_uid and want_uid != old["metadata"]["uid"]:
            raise conflict(kind, name, f"Precondition failed: UID in precondition: {want_uid}, "
                           f"UID in object meta: {old['metadata']['uid']}")

    def _merge_sections(self, kind: Kind, old: dict[str, Any], new: dict[str, Any],
                        sub: str | None) -> dict[str, Any]:
        """Apply the status-subresource split: /status writes only status, main writes never do."""
        new = copy.deepcopy(new)
        if kind.status and kind.key != NAMESPACE_KEY or sub == "status":
            if sub == "status":
                result = copy.deepcopy(old)
                if "status" in new:
                    result["status"] = new["status"]
                else:
                    result.pop("status", None)
                return result
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        # Identity and server-owned metadata always come from the stored object.
        meta = new.setdefault("metadata", {})
        for f in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
                  "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            if f in old["metadata"]:
                meta[f] = old["metadata"][f]
            else:
                meta.pop(f, None)
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind
        return new

    def _replace(self, kind: Kind, namespace: str | None, name: str, sub: str | None, obj: Any,
                 manager: str, dry_run: bool) -> dict[str, Any]:
        self._validate_identity(kind, namespace, name, obj)
        key = self._key(kind, namespace, name)
        old = self.objects.get(key)
        if old is None:
            raise not_found(kind, name)
        self._precondition(kind, name, old, obj.get("metadata") or {})
        new = self._merge_sections(kind, old, obj, sub)
        return self._update(kind, key, old, new, manager, sub, dry_run)

    def _patch(self, kind: Kind, namespace: str | None, name: str, sub: str | None, ctype: str, patch: Any,
               manager: str, dry_run: bool) -> dict[str, Any]:
        key = self._key(kind, namespace, name)
        old = self.objects.get(key)
        if old is None:
            raise not_found(kind, name)
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(400, "BadRequest", "json patch must be a list of operations")
            try:
                patched = jsonpatch.apply_patch(old, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, "Invalid", f"the server rejected our request: {e}")
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            # Strategic merge is treated as a JSON merge patch: lists are replaced, not merged by key.
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "merge patch must be a JSON object")
            self._precondition(kind, name, old, patch.get("metadata") or {})
            patched = merge_patch(old, patch)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: application/json-patch+json, "
                           f"application/merge-patch+json, application/apply-patch+yaml")
        self._validate_identity(kind, namespace, name, patched)
        new = self._merge_sections(kind, old, patched, sub)
        return self._update(kind, key, old, new, manager, sub, dry_run)

    def _update(self, kind: Kind, key: ObjKey, old: dict[str, Any], new: dict[str, Any], manager: str,
                sub: str | None, dry_run: bool) -> dict[str, Any]:
        """An Update-operation write: the manager takes ownership of every field it changed."""
        if dry_run:
            return new
        changed = {p for p in diff_paths(old, new) if get_path(new, p) not in (_MISSING, {})}
        changed = {p for p in changed if not any(p[:len(u)] == u for u in _UNOWNED)}
        if changed:
            mgrs = self.managers.setdefault(key, {})
            for m in mgrs.values():
                m.paths -= changed
            mk = (manager, "Update", sub or "")
            entry = mgrs.setdefault(mk, Manager(set(), kind.api_version, now_rfc3339()))
            entry.paths |= changed
            entry.time = now_rfc3339()
        self._commit(kind, key, new, old)
        return self.objects.get(key, new)

    def _apply(self, kind: Kind, namespace: str | None, name: str, sub: str | None, applied: Any,
               manager: str, force: bool, dry_run: bool) -> tuple[dict[str, Any], bool]:
        """Server-side apply: create when missing, else merge the applied intent and track ownership."""
        self._validate_identity(kind, namespace, name, applied)
        if not applied.get("apiVersion") or not applied.get("kind"):
            raise ApiError(400, "BadRequest", "apiVersion and kind must be set in an apply patch")
        key = self._key(kind, namespace, name)
        old = self.objects.get(key)
        paths = owned_paths(applied, sub)
        if old is None:
            if sub == "status":
                raise not_found(kind, name)
            obj = copy.deepcopy(applied)
            obj.setdefault("metadata", {})["name"] = name
            return self._create_internal(kind, obj, namespace, manager, "Apply", dry_run, paths), True
        self._precondition(kind, name, old, applied.get("metadata") or {})
        section = {k: v for k, v in applied.items() if k in ("status", "metadata")} if sub == "status" else applied
        merged = merge_patch(old, _drop_nulls(section))
        mk = (manager, "Apply", sub or "")
        mgrs = self.managers.setdefault(key, {})
        previous = mgrs[mk].paths if mk in mgrs else set()
        # Fields this manager applied before and no longer applies are removed, unless shared.
        others = set().union(*(m.paths for k, m in mgrs.items() if k != mk)) if mgrs else set()
        for p in previous - paths:
            if not any(overlaps(p, q) for q in paths) and p not in others:
                del_path(merged, p)
        new = self._merge_sections(kind, old, merged, sub)
        validate_labels(kind, new)
        # Conflicts: another manager owns a field this apply sets to a different value.
        conflicts = []
        for k, m in mgrs.items():
            if k == mk:
                continue
            for q in m.paths:
                if any(overlaps(p, q) for p in paths) and get_path(old, q) != get_path(new, q):
                    conflicts.append((k[0], q))
        if conflicts and not force:
            causes = [{"type": "FieldManagerConflict", "field": "." + ".".join(q),
                       "message": f'conflict with "{who}": .{".".join(q)}'} for who, q in conflicts]
            raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s): " +
                           "; ".join(c["message"] for c in causes),
                           {"name": name, "group": kind.group, "kind": kind.plural, "causes": causes})
        if dry_run:
            return new, False
        for k, m in mgrs.items():
            if k != mk:
                m.paths = {q for q in m.paths if not any(overlaps(p, q) for p in paths)}
        if mk not in mgrs or mgrs[mk].paths != paths:
            mgrs[mk] = Manager(paths, kind.api_version, now_rfc3339())
        self._commit(kind, key, new, old)
        return self.objects.get(key, new), False

    def _delete(self, kind: Kind, namespace: str | None, name: str, options: dict[str, Any],
                dry_run: bool) -> tuple[dict[str, Any], int]:
        key = self._key(kind, namespace, name)
        old = self.objects.get(key)
        if old is None:
            raise not_found(kind, name)
        pre = options.get("preconditions") or {}
        self._precondition(kind, name, old, pre)
        if dry_run:
            return old, 200
        orphan = options.get("propagationPolicy") == "Orphan" or options.get("orphanDependents") is True
        return self._delete_internal(kind, key, orphan)

    def _delete_internal(self, kind: Kind, key: ObjKey, orphan: bool = False) -> tuple[dict[str, Any], int]:
        old = self.objects[key]
        meta = old["metadata"]
        if kind.key == NAMESPACE_KEY:
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                new["status"] = {"phase": "Terminating"}
                self._commit(kind, key, new, old)
                for k in [k for k in self.objects if k[1] == key[2] and self.kinds[k[0]].namespaced]:
                    if k in self.objects:
                        self._delete_internal(self.kinds[k[0]], k)
            self._schedule_gc()
            return self.objects.get(key, old), 200
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                if kind.generation:
                    new["metadata"]["generation"] = meta.get("generation", 0) + 1
                self._commit(kind, key, new, old)
            return self.objects[key], 200
        self._remove(kind, key, orphan)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": key[2], "group": kind.group, "kind": kind.plural, "uid": meta["uid"]}}, 200

    def _remove(self, kind: Kind, key: ObjKey, orphan: bool = False) -> None:
        old = self.objects.pop(key)
        self.managers.pop(key, None)
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record(kind, WatchEvent(self.rv, "DELETED", gone, old))
        self.change_counts[key] += 1
        uid = old["metadata"]["uid"]
        if orphan:
            for k, o in list(self.objects.items()):
                refs = o["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == uid for r in refs):
                    new = copy.deepcopy(o)
                    new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                    self._commit(self.kinds[k[0]], k, new, o)
        self._schedule_gc()

    # ---- commit, events, background controllers ---------------------------------------------

    def _commit(self, kind: Kind, key: ObjKey, new: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Store `new` unless it equals `old`; stamp resourceVersion/generation; emit the watch event."""
        meta = new.setdefault("metadata", {})
        mgrs = self.managers.get(key, {})
        for m in mgrs.values():  # fields that no longer exist are owned by nobody
            m.paths = {p for p in m.paths if get_path(new, p) is not _MISSING}
        managed = [{"manager": mk[0], "operation": mk[1], "apiVersion": m.api_version, "time": m.time,
                    "fieldsType": "FieldsV1", "fieldsV1": fields_v1(m.paths), **({"subresource": mk[2]} if mk[2] else {})}
                   for mk, m in mgrs.items() if m.paths]
        for mk in [mk for mk, m in mgrs.items() if not m.paths]:
            del mgrs[mk]
        if managed:
            meta["managedFields"] = managed
        else:
            meta.pop("managedFields", None)
        if old is not None:
            if strip_for_compare(new) == strip_for_compare(old) and \
                    meta.get("managedFields") == old["metadata"].get("managedFields"):
                return  # a no-op write: no new resourceVersion, no watch event
            if kind.generation and non_meta(new) != non_meta(old):
                meta["generation"] = old["metadata"].get("generation", 1) + 1
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self.objects[key] = new
        self.change_counts[key] += 1
        if self.status_log is not None and kind.group == "soma.dev" and new.get("status") \
                and new.get("status") != (old or {}).get("status") and self._writer.startswith("soma.dev/"):
            self.status_log.write(json.dumps({"writer": self._writer, "object": new}) + "\n")
            self.status_log.flush()
        self._record(kind, WatchEvent(self.rv, "ADDED" if old is None else "MODIFIED", new, old))
        if old is not None and meta.get("deletionTimestamp") and not meta.get("finalizers") \
                and kind.key != NAMESPACE_KEY:
            self._remove(kind, key)
            return
        if kind.key == CRD_KEY:
            for k in kinds_from_crd(new):
                self.register(k)
        if kind.key == DEPLOYMENT_KEY and self.deployment_controller and \
                (old is None or meta.get("generation") != old["metadata"].get("generation")):
            self._later(self.deployment_delay, self._deployment_status, key)
        if kind.key == JOB_KEY and self.job_controller and key not in self._job_ticking:
            self._job_ticking.add(key)
            self._later(self.job_delay, self._job_tick, key)

    def _record(self, kind: Kind, event: WatchEvent) -> None:
        events = self.history[kind.key]
        events.append(event)
        if len(events) > self.history_limit:
            drop = len(events) - self.history_limit
            self.compacted[kind.key] = events[drop - 1].rv
            del events[:drop]
        if self._changed is not None:
            self._later(0, self._notify)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            result = fn(*args)
            if asyncio.iscoroutine(result):
                await result
        try:
            task = asyncio.get_running_loop().create_task(run())
        except RuntimeError:  # no loop yet (construction time): nothing is watching anyway
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _deployment_status(self, key: ObjKey) -> None:
        """What kube-controller-manager plus a kubelet would report for a Deployment whose pods start."""
        old = self.objects.get(key)
        if old is None:
            return
        kind = self.kinds[DEPLOYMENT_KEY]
        replicas = (old.get("spec") or {}).get("replicas", 1)
        prev = old.get("status") or {}
        conds_prev = {c.get("type"): c for c in prev.get("conditions") or []}
        status: dict[str, Any] = {"observedGeneration": old["metadata"].get("generation", 1)}
        for f in ("replicas", "readyReplicas", "availableReplicas", "updatedReplicas"):
            if replicas:
                status[f] = replicas
        conds = []
        for ctype, reason, msg in (("Available", "MinimumReplicasAvailable", "Deployment has minimum availability."),
                                   ("Progressing", "NewReplicaSetAvailable", "ReplicaSet has successfully progressed.")):
            c = conds_prev.get(ctype)
            if c and c.get("status") == "True" and c.get("reason") == reason:
                conds.append(c)
            else:
                now = now_rfc3339()
                conds.append({"type": ctype, "status": "True", "reason": reason, "message": msg,
                              "lastUpdateTime": now, "lastTransitionTime": now})
        status["conditions"] = conds
        new = copy.deepcopy(old)
        new["status"] = status
        self._update(kind, key, old, new, "kube-controller-manager", "status", False)
        if self.deployment_pods:
            self._deployment_pods(key, old, replicas)

    def _deployment_pods(self, key: ObjKey, deployment: dict[str, Any], replicas: int) -> None:
        """What a ReplicaSet plus kubelets would do, minus the ReplicaSet: as many Running, Ready
        pods as `replicas`, from the template, each with the lowest free 127.0.0.x as its IP;
        a scale-down deletes the newest first."""
        pod_kind = self.kinds[POD_KEY]
        uid = deployment["metadata"]["uid"]
        pods = sorted(((k, o) for k, o in self.objects.items() if k[0] == POD_KEY and any(
            r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])),
            key=lambda p: p[1]["metadata"]["creationTimestamp"] + p[1]["metadata"]["name"])
        for k, _ in pods[replicas:][::-1]:
            self._delete_internal(pod_kind, k)
        used = {(o.get("status") or {}).get("podIP") for k, o in self.objects.items() if k[0] == POD_KEY}
        template = (deployment.get("spec") or {}).get("template") or {}
        meta = template.get("metadata") or {}
        for _ in range(replicas - len(pods)):
            ip = next((f"127.0.0.{n}" for n in range(2, 255) if f"127.0.0.{n}" not in used), None)
            if ip is None:
                log.warning("no free 127.0.0.x address for a pod of %s", key[2])
                return
            used.add(ip)
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            pod = {"metadata": {"name": f"{key[2]}-{suffix}", "namespace": key[1],
                                "labels": dict(meta.get("labels") or {}),
                                "annotations": dict(meta.get("annotations") or {}),
                                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": key[2],
                                                     "uid": uid, "controller": True, "blockOwnerDeletion": True}]},
                   "spec": copy.deepcopy(template.get("spec") or {})}
            created = self._create_internal(pod_kind, pod, key[1], "kube-controller-manager")
            pod_key = self._key(pod_kind, key[1], created["metadata"]["name"])
            running = copy.deepcopy(created)
            stamp = now_rfc3339()
            running["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": stamp,
                                 "conditions": [{"type": t, "status": "True", "lastTransitionTime": stamp}
                                                for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]}
            self._update(pod_kind, pod_key, created, running, "kubelet", "status", False)

    # ---- batch/v1 Jobs: what kube-controller-manager's Job controller and a kubelet would do -----

    def _plan_endpoint(self, request: kmock.Request) -> dict[str, Any]:
        """`POST /_jobs/NS/NAME {"attempts": [...]}`: how the attempts of batch/v1 Job NS/NAME end.

        Each attempt is `{"exit": 0, "message": "..."}` (the agent container's exit code and
        termination message) or `{"hang": true}` (it runs until the deadline or a later plan).
        An attempt with no plan yet keeps running. Plans may come before the Job exists.
        """
        parts = request.url.path.strip("/").split("/")
        if len(parts) != 3 or request.method != "POST":
            return {"error": "POST /_jobs/NAMESPACE/NAME"}
        body = json.loads(request.body or b"{}")
        self.job_plans[(parts[1], parts[2])] = list(body.get("attempts") or [])
        key = (JOB_KEY, parts[1], parts[2])
        if key in self.objects and key not in self._job_ticking:
            self._job_ticking.add(key)
            self._later(0, self._job_tick, key)
        return {"planned": len(self.job_plans[(parts[1], parts[2])])}

    def _kueue_endpoint(self, request: kmock.Request) -> dict[str, Any]:
        """`POST /_kueue/NS/QUEUE/admit`: what Kueue does once its ClusterQueue has quota: every
        suspended Job of NS labelled `kueue.x-k8s.io/queue-name: QUEUE` is unsuspended."""
        parts = request.url.path.strip("/").split("/")
        if len(parts) != 4 or parts[3] != "admit" or request.method != "POST":
            return {"error": "POST /_kueue/NAMESPACE/QUEUE/admit"}
        kind = self.kinds[JOB_KEY]
        admitted = []
        for key, job in list(self.objects.items()):
            if key[0] != JOB_KEY or key[1] != parts[1]:
                continue
            labels = job["metadata"].get("labels") or {}
            if labels.get("kueue.x-k8s.io/queue-name") == parts[2] and (job.get("spec") or {}).get("suspend"):
                new = copy.deepcopy(job)
                new["spec"]["suspend"] = False
                self._update(kind, key, job, new, "kueue", None, False)
                admitted.append(key[2])
        return {"admitted": admitted}

    def _cronjob_endpoint(self, request: kmock.Request) -> dict[str, Any]:
        """`POST /_cronjobs/NS/NAME/run`: the CronJob controller's schedule fires: a batch/v1
        Job `NAME-<n>` from its jobTemplate, owned by the CronJob, and `lastScheduleTime`."""
        parts = request.url.path.strip("/").split("/")
        if len(parts) != 4 or parts[3] != "run" or request.method != "POST":
            return {"error": "POST /_cronjobs/NAMESPACE/NAME/run"}
        key = (CRONJOB_KEY, parts[1], parts[2])
        cron = self.objects.get(key)
        if cron is None:
            return {"error": f"no CronJob {parts[1]}/{parts[2]}"}
        template = (cron.get("spec") or {}).get("jobTemplate") or {}
        runs = sum(1 for k in self.objects if k[0] == JOB_KEY and k[1] == parts[1] and k[2].startswith(parts[2] + "-"))
        name = f"{parts[2]}-{runs + 1}"
        meta = copy.deepcopy(template.get("metadata") or {})
        meta.update(name=name, namespace=parts[1], ownerReferences=[{
            "apiVersion": "batch/v1", "kind": "CronJob", "name": parts[2], "uid": cron["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}])
        self._create_internal(self.kinds[JOB_KEY], {"metadata": meta, "spec": copy.deepcopy(template.get("spec") or {})},
                              parts[1], "kube-controller-manager")
        new = copy.deepcopy(cron)
        new["status"] = {**(cron.get("status") or {}), "lastScheduleTime": now_rfc3339()}
        self._update(self.kinds[CRONJOB_KEY], key, cron, new, "kube-controller-manager", "status", False)
        return {"job": name}

    def _job_pods(self, job: dict[str, Any]) -> list[tuple[ObjKey, dict[str, Any]]]:
        uid = job["metadata"]["uid"]
        pods = [(k, o) for k, o in self.objects.items() if k[0] == POD_KEY and any(
            r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]
        return sorted(pods, key=lambda p: int(p[1]["metadata"].get("annotations", {}).get("soma-e2e/attempt", "0")))

    def _job_tick(self, key: ObjKey) -> None:
        """One step of a batch/v1 Job: start an attempt (a pod), end it as planned, count, and
        finish the Job (Complete, or Failed by BackoffLimitExceeded or DeadlineExceeded)."""
        job = self.objects.get(key)
        if job is None:
            self._job_ticking.discard(key)
            return
        kind, pod_kind = self.kinds[JOB_KEY], self.kinds[POD_KEY]
        spec, status = job.get("spec") or {}, copy.deepcopy(job.get("status") or {})
        conditions = status.get("conditions") or []
        if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions):
            self._job_ticking.discard(key)
            return
        now = datetime.datetime.now(datetime.UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        pods = self._job_pods(job)
        active = [(k, p) for k, p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
        if spec.get("suspend"):
            for k, _ in active:  # suspending a Job deletes its running pods
                self._delete_internal(pod_kind, k)
            status = {k: v for k, v in status.items() if k not in ("startTime", "active")}
            status["conditions"] = [c for c in conditions if c.get("type") != "Suspended"] + [{
                "type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended",
                "lastProbeTime": stamp, "lastTransitionTime": stamp}]
            self._job_status(key, job, status)
            self._job_ticking.discard(key)  # unsuspending it is a write, which ticks it again
            return
        status["conditions"] = [c for c in conditions if c.get("type") != "Suspended"]
        status.setdefault("startTime", stamp)
        plan = self.job_plans.get((key[1], key[2]), [])
        # End the running attempt as planned.
        for k, p in active:
            attempt = int(p["metadata"]["annotations"]["soma-e2e/attempt"])
            step = plan[attempt - 1] if attempt - 1 < len(plan) else {"hang": True}
            if step.get("hang"):
                continue
            code = int(step.get("exit", 0))
            new = copy.deepcopy(p)
            terminated = {"exitCode": code, "reason": step.get("reason") or ("Completed" if code == 0 else "Error"),
                          "startedAt": p["metadata"]["creationTimestamp"], "finishedAt": stamp}
            if step.get("message") is not None:
                terminated["message"] = step["message"]
            new["status"] = {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
                {"name": c["name"], "ready": False, "restartCount": 0, "image": c.get("image", ""), "imageID": "",
                 "state": {"terminated": terminated}} for c in new["spec"].get("containers") or []]}
            self._update(pod_kind, k, p, new, "kubelet", "status", False)
        pods = self._job_pods(job)
        phases = [(p.get("status") or {}).get("phase") for _, p in pods]
        succeeded, failed = phases.count("Succeeded"), phases.count("Failed")
        running = phases.count("Running") + phases.count("Pending")
        deadline = spec.get("activeDeadlineSeconds")
        started = datetime.datetime.strptime(status["startTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
        backoff = spec.get("backoffLimit", 6)
        done = None
        if succeeded:
            done = ("Complete", "", "")
            status["completionTime"] = stamp
        elif deadline is not None and (now - started).total_seconds() >= deadline:
            for k, p in self._job_pods(job):
                if (p.get("status") or {}).get("phase") in ("Pending", "Running"):
                    self._delete_internal(pod_kind, k)
                    failed += 1
            running = 0
            done = ("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
        elif failed > backoff:
            done = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        elif running == 0:
            # The next attempt: a pod from the template, labelled as Kubernetes labels them.
            template = copy.deepcopy(spec.get("template") or {})
            meta = template.get("metadata") or {}
            labels = {**(meta.get("labels") or {}), "batch.kubernetes.io/job-name": key[2], "job-name": key[2],
                      "batch.kubernetes.io/controller-uid": job["metadata"]["uid"]}
            attempt = len(pods) + 1
            pod = {"metadata": {"name": f"{key[2]}-{attempt}-{random.choice(string.ascii_lowercase)}"
                                        f"{''.join(random.choices(string.ascii_lowercase + string.digits, k=4))}",
                                "namespace": key[1], "labels": labels,
                                "annotations": {**(meta.get("annotations") or {}), "soma-e2e/attempt": str(attempt)},
                                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": key[2],
                                                     "uid": job["metadata"]["uid"], "controller": True,
                                                     "blockOwnerDeletion": True}]},
                   "spec": template.get("spec") or {}}
            created = self._create_internal(pod_kind, pod, key[1], "kube-controller-manager")
            pod_key = self._key(pod_kind, key[1], created["metadata"]["name"])
            running_pod = copy.deepcopy(created)
            running_pod["status"] = {"phase": "Running", "containerStatuses": [
                {"name": c["name"], "ready": True, "restartCount": 0, "image": c.get("image", ""), "imageID": "",
                 "state": {"running": {"startedAt": stamp}}} for c in created["spec"].get("containers") or []]}
            self._update(pod_kind, pod_key, created, running_pod, "kubelet", "status", False)
            running = 1
        status.update(active=running, succeeded=succeeded, failed=failed)
        status = {k: v for k, v in status.items() if v != 0 or k in ("succeeded", "failed")}
        if done is not None:
            kind_, reason, message = done
            cond = {"type": kind_, "status": "True", "lastProbeTime": stamp, "lastTransitionTime": stamp}
            if reason:
                cond.update(reason=reason, message=message)
            status["conditions"] = status.get("conditions", []) + [cond]
            status.pop("active", None)
        self._job_status(key, job, status)
        if done is not None:
            self._job_ticking.discard(key)
            return
        self._later(self.job_delay, self._job_tick, key)

    def _job_status(self, key: ObjKey, job: dict[str, Any], status: dict[str, Any]) -> None:
        if not status.get("conditions"):
            status.pop("conditions", None)
        if (job.get("status") or {}) == status:
            return
        new = copy.deepcopy(job)
        new["status"] = status
        self._update(self.kinds[JOB_KEY], key, job, new, "kube-controller-manager", "status", False)

    def _schedule_gc(self) -> None:
        self._later(0.05, self._collect_garbage)

    def _collect_garbage(self) -> None:
        """Background cascading deletion: dependents whose owners are all gone are deleted."""
        progress = True
        while progress:
            progress = False
            uids = {o["metadata"]["uid"] for o in self.objects.values()}
            for key, obj in list(self.objects.items()):
                if key not in self.objects:
                    continue
                meta = obj["metadata"]
                refs = meta.get("ownerReferences") or []
                if refs and not any(r.get("uid") in uids for r in refs) and not meta.get("deletionTimestamp"):
                    self._delete_internal(self.kinds[key[0]], key)
                    progress = True
            for key, ns in list(self.objects.items()):
                if key[0] == NAMESPACE_KEY and ns["metadata"].get("deletionTimestamp") and \
                        not any(k[1] == key[2] and self.kinds[k[0]].namespaced for k in self.objects):
                    self._remove(self.kinds[NAMESPACE_KEY], key)
                    progress = True

    # ---- watch -------------------------------------------------------------------------------

    async def _watch(self, raw: aiohttp.web.BaseRequest, kind: Kind, namespace: str | None, name: str | None,
                     params: dict[str, str]) -> aiohttp.web.StreamResponse:
        if self._changed is None:
            self._changed = asyncio.Condition()
        matches = self._matcher(kind, namespace, params, name)
        bookmarks = params.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(params.get("timeoutSeconds") or 1800)
        deadline = asyncio.get_running_loop().time() + timeout
        rv_param = params.get("resourceVersion") or ""
        initial = params.get("sendInitialEvents") in ("true", "1")

        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(raw)

        async def send(event: dict[str, Any]) -> None:
            await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")

        def bookmark(rv: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if annotations:
                meta["annotations"] = annotations
            return {"type": "BOOKMARK", "object": {"kind": kind.kind, "apiVersion": kind.api_version,
                                                    "metadata": meta}}

        try:
            if rv_param in ("", "0") or initial:
                last = self.rv
                current = sorted((o for k, o in self.objects.items() if k[0] == kind.key and matches(o)),
                                 key=lambda o: int(o["metadata"]["resourceVersion"]))
                for obj in current:
                    await send({"type": "ADDED", "object": obj})
                if initial and bookmarks:
                    await send(bookmark(last, {"k8s.io/initial-events-end": "true"}))
            else:
                try:
                    last = int(rv_param)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}")
                if last < self.compacted.get(kind.key, 0):
                    gone = ApiError(410, "Expired", f"too old resource version: {last} "
                                    f"({self.compacted[kind.key] + 1})")
                    await send({"type": "ERROR", "object": gone.body()})
                    return response
            next_bookmark = asyncio.get_running_loop().time() + self.bookmark_interval
            while True:
                events = self.history[kind.key]
                idx = bisect.bisect_right(events, last, key=lambda e: e.rv)
                for ev in events[idx:]:
                    last = ev.rv
                    now_in, was_in = matches(ev.obj), matches(ev.old)
                    if ev.type == "ADDED" and now_in or ev.type == "DELETED" and (now_in or was_in):
                        await send({"type": ev.type, "object": ev.obj})
                    elif ev.type == "MODIFIED" and (now_in or was_in):
                        typ = "MODIFIED" if now_in and was_in else ("ADDED" if now_in else "DELETED")
                        await send({"type": typ, "object": ev.obj})
                # Caught up with this resource: everything up to the global rv has been seen.
                last = max(last, self.rv)
                loop_now = asyncio.get_running_loop().time()
                if loop_now >= deadline or raw.transport is None or raw.transport.is_closing():
                    break
                if bookmarks and loop_now >= next_bookmark:
                    await send(bookmark(last))
                    next_bookmark = loop_now + self.bookmark_interval
                async with self._changed:
                    try:
                        wait = min(deadline, next_bookmark if bookmarks else deadline, loop_now + 1.0) - loop_now
                        await asyncio.wait_for(self._changed.wait(), timeout=max(wait, 0.01))
                    except asyncio.TimeoutError:
                        pass
        except (ConnectionError, asyncio.CancelledError):
            return response
        except ApiError as e:
            await send({"type": "ERROR", "object": e.body()})
        try:
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    # ---- service-account tokens: TokenRequest and TokenReview --------------------------------

    def _authentication(self, path: str, body: bytes) -> tuple[dict[str, Any], int] | None:
        """`POST .../serviceaccounts/NAME/token` (TokenRequest) and `POST /apis/authentication.k8s.io/
        v1/tokenreviews` (TokenReview, as Vault's and OpenBao's Kubernetes auth method call it), else
        None. Tokens are RS256 JWTs signed with a key this process makes (with the `openssl` CLI),
        carrying the claims a kubelet-projected token carries; a review accepts only a token this
        process issued, unexpired, whose ServiceAccount still exists with the same uid, for one of
        the audiences asked about (none asked: the API server's own)."""
        parts = [p for p in path.split("/") if p]
        try:
            if parts[:4] == ["apis", "authentication.k8s.io", "v1", "tokenreviews"] and len(parts) == 4:
                return self._token_review(self._json(body) if body else {}), 201
            if (len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "serviceaccounts"
                    and parts[6] == "token"):
                return self._token_request(parts[3], parts[5], self._json(body) if body else {}), 201
        except ApiError as e:
            return e.body(), e.code
        return None

    API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"

    def _sign(self, claims: dict[str, Any]) -> str:
        import subprocess
        import tempfile
        if self._token_key is None:
            key = pathlib.Path(tempfile.mkdtemp(prefix="soma-standin-sa-")) / "sa.key"
            subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                            "-out", str(key)], check=True, capture_output=True)
            self._token_key = key

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        header = {"alg": "RS256", "typ": "JWT", "kid": "soma-standin"}
        signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self._token_key)],
                                   input=signing_input.encode(), check=True, capture_output=True).stdout
        return signing_input + "." + b64(signature)

    def _token_request(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        sa = self._get(self.kinds["/v1/serviceaccounts"], namespace, name)
        spec = body.get("spec") or {}
        audiences = list(spec.get("audiences") or [self.API_AUDIENCE])
        ttl = int(spec.get("expirationSeconds") or 3600)
        if ttl < 1:
            raise ApiError(422, "Invalid", "spec.expirationSeconds: Invalid value: must be positive")
        now = datetime.datetime.now(datetime.timezone.utc)
        exp = int(now.timestamp()) + ttl
        uid = sa["metadata"]["uid"]
        claims = {"iss": self.API_AUDIENCE, "sub": f"system:serviceaccount:{namespace}:{name}", "aud": audiences,
                  "iat": int(now.timestamp()), "nbf": int(now.timestamp()), "exp": exp,
                  "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}}}
        token = self._sign(claims)
        self._tokens[token] = {"namespace": namespace, "name": name, "uid": uid, "audiences": audiences, "exp": exp}
        expires = datetime.datetime.fromtimestamp(exp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"audiences": audiences, "expirationSeconds": ttl},
                "status": {"token": token, "expirationTimestamp": expires}}

    def _token_review(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = body.get("spec") or {}
        token = spec.get("token") or ""
        asked = list(spec.get("audiences") or [self.API_AUDIENCE])
        out: dict[str, Any] = {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                               "metadata": {"creationTimestamp": None}, "spec": spec}
        issued = self._tokens.get(token)
        error = None
        if issued is None:
            error = "invalid bearer token, token lookup failed"
        elif issued["exp"] <= int(datetime.datetime.now(datetime.timezone.utc).timestamp()):
            error = "invalid bearer token, token has expired"
        elif not set(asked) & set(issued["audiences"]):
            error = "invalid bearer token, token audiences is invalid for the current issuer"
        else:
            sa = self.objects.get(("/v1/serviceaccounts", issued["namespace"], issued["name"]))
            if sa is None or sa["metadata"]["uid"] != issued["uid"]:
                error = "invalid bearer token, service account has been deleted or recreated"
        if error is not None:
            out["status"] = {"authenticated": False, "user": {}, "error": error}
            return out
        assert issued is not None
        ns = issued["namespace"]
        out["status"] = {"authenticated": True, "audiences": sorted(set(asked) & set(issued["audiences"])),
                         "user": {"username": f"system:serviceaccount:{ns}:{issued['name']}", "uid": issued["uid"],
                                  "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}",
                                             "system:authenticated"]}}
        return out

    # ---- test-only endpoint -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Request counts by (verb, resource, namespace, name, subresource), writes by client (the
        bearer token it sent) and changes per object."""
        return {
            "resourceVersion": self.rv,
            "requests": [{"verb": v, "resource": r.lstrip("/"), "namespace": ns, "name": n, "subresource": s, "count": c}
                         for (v, r, ns, n, s), c in sorted(self.request_counts.items())],
            "writes": [{"verb": v, "resource": r.lstrip("/"), "namespace": ns, "name": n, "subresource": s,
                        "client": t, "count": c}
                       for (v, r, ns, n, s, t), c in sorted(self.write_counts.items())],
            "changes": [{"resource": r.lstrip("/"), "namespace": ns, "name": n, "count": c}
                        for (r, ns, n), c in sorted(self.change_counts.items())],
        }


def _drop_nulls(obj: Any) -> Any:
    """Apply patches have no delete-by-null: a null means 'unset', which the merge must not remove."""
    if isinstance(obj, dict):
        return {k: _drop_nulls(v) for k, v in obj.items() if v is not None}
    return obj


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

async def serve(args: argparse.Namespace) -> None:
    server = SomaApiServer(deployment_controller=not args.no_deployment_controller,
                           deployment_pods=args.deployment_pods,
                           deployment_delay=args.deployment_delay, bookmark_interval=args.bookmark_interval,
                           history_limit=args.history_limit, job_controller=not args.no_job_controller,
                           job_delay=args.job_delay)
    for directory in args.crds or []:
        n = server.load_crds(pathlib.Path(directory))
        log.info("registered %d CRDs from %s", n, directory)
    status_log = args.status_log
    if status_log is None and os.environ.get("SOMA_STATUS_LOG_DIR"):
        status_log = str(pathlib.Path(os.environ["SOMA_STATUS_LOG_DIR"]) / f"statuses-{os.getpid()}.jsonl")
    if status_log:
        pathlib.Path(status_log).parent.mkdir(parents=True, exist_ok=True)
        server.status_log = open(status_log, "a")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server, kmock.Server(server, host=args.host, port=args.port) as http:
        url = f"http://{args.host}:{http.port}"
        log.info("serving the Kubernetes API stand-in on %s", url)
        if args.port_file:
            tmp = pathlib.Path(args.port_file + ".tmp")
            tmp.write_text(str(http.port))
            tmp.rename(args.port_file)
        print(url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (see --port-file)")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--crds", action="append", help="directory of CRD YAML files to register (repeatable)")
    parser.add_argument("--no-deployment-controller", action="store_true",
                        help="do not emulate Deployment status (ready replicas) after writes")
    parser.add_argument("--deployment-delay", type=float, default=0.2)
    parser.add_argument("--deployment-pods", action="store_true",
                        help="turn a Deployment's replicas into Running, Ready pods with IPs 127.0.0.2, 127.0.0.3, …")
    parser.add_argument("--no-job-controller", action="store_true",
                        help="do not emulate batch/v1 Jobs (pods, attempts, status)")
    parser.add_argument("--job-delay", type=float, default=0.2, help="seconds between two steps of a batch/v1 Job")
    parser.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between watch bookmarks")
    parser.add_argument("--history-limit", type=int, default=20000,
                        help="watch events kept per resource; older resourceVersions get 410 Gone")
    parser.add_argument("--status-log", help="append every status the operator writes on a soma.dev "
                        "resource to this file, one JSON line each (default: a file in $SOMA_STATUS_LOG_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
