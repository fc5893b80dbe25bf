"""The API stand-in itself: the server-side behaviours a kube-rs controller relies on.

Each test states one behaviour of the real API server and checks the stand-in has it, over
HTTP, the way kube-rs sends requests (JSON bodies, apply-patch content type, watch params).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from harness import StandIn

CM = ("v1", "configmaps")
DEPLOY = ("apps", "v1", "deployments")


def cm(name: str, ns: str, labels: dict[str, str] | None = None, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, **({"labels": labels} if labels else {})}, "data": data}


def agent(name: str, ns: str, image: str = "registry.example.com/a@sha256:" + "0" * 64) -> dict[str, Any]:
    return {"apiVersion": "soma.dev/v1alpha1", "kind": "Agent", "metadata": {"name": name, "namespace": ns},
            "spec": {"image": image, "model": {"provider": "openai", "name": "gpt-4o-mini"},
                     "budgetRef": {"name": "team-budget"}}}


def deployment(name: str, ns: str, replicas: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": name}},
                            "template": {"metadata": {"labels": {"app": name}},
                                         "spec": {"containers": [{"name": "c", "image": "img"}]}}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
            "spec": spec}


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def test_create_stamps_identity_and_rejects_duplicates(standin: StandIn, ns: str) -> None:
    k = standin.kube
    a = k.create(cm("a", ns, k="v"))
    b = k.create(cm("b", ns))
    meta = a["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert rv(b) > rv(a), "resourceVersion is a monotonic global counter"
    assert a["apiVersion"] == "v1" and a["kind"] == "ConfigMap"
    dup = k.request("POST", f"/api/v1/namespaces/{ns}/configmaps", json=cm("a", ns), expect=409).json()
    assert dup["kind"] == "Status" and dup["reason"] == "AlreadyExists" and dup["code"] == 409
    missing = k.request("GET", f"/api/v1/namespaces/{ns}/configmaps/nope", expect=404).json()
    assert missing["reason"] == "NotFound"
    no_ns = k.request("POST", "/api/v1/namespaces/no-such-ns/configmaps", json=cm("x", "no-such-ns"), expect=404)
    assert 'namespaces "no-such-ns" not found' in no_ns.json()["message"]
    bad = k.request("POST", f"/api/v1/namespaces/{ns}/configmaps", json=cm("Bad_Name", ns), expect=422)
    assert bad.json()["reason"] == "Invalid"
    gen = k.create({**cm("", ns), "metadata": {"generateName": "gen-", "namespace": ns}})
    assert gen["metadata"]["name"].startswith("gen-") and len(gen["metadata"]["name"]) == 9


def test_list_has_resource_version_kind_and_namespace_scope(standin: StandIn, ns: str) -> None:
    k = standin.kube
    k.create(cm("one", ns))
    listed = k.list(*CM, ns)
    assert listed["kind"] == "ConfigMapList" and int(listed["metadata"]["resourceVersion"]) >= rv(listed["items"][0])
    assert [i["metadata"]["name"] for i in listed["items"]] == ["one"]
    everywhere = k.list(*CM)
    assert {i["metadata"]["namespace"] for i in everywhere["items"]} >= {ns}
    namespaces = k.list("v1", "namespaces")
    assert ns in [i["metadata"]["name"] for i in namespaces["items"]]
    assert k.get("v1", "namespaces", None, ns)["status"]["phase"] == "Active"


def test_list_pagination_with_limit_and_continue(standin: StandIn, ns: str) -> None:
    k = standin.kube
    for i in range(5):
        k.create(cm(f"p{i}", ns))
    first = k.list(*CM, ns, limit="2")
    assert len(first["items"]) == 2 and first["metadata"]["continue"]
    names = [i["metadata"]["name"] for i in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        page = k.list(*CM, ns, limit="2", **{"continue": token})
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"p{i}" for i in range(5)]


@pytest.mark.parametrize("selector, expected", [
    ("tier=web", {"web1", "web2"}),
    ("tier==web", {"web1", "web2"}),
    ("tier!=web", {"db", "plain"}),
    ("tier", {"web1", "web2", "db"}),
    ("!tier", {"plain"}),
    ("tier in (web, db)", {"web1", "web2", "db"}),
    ("tier notin (web)", {"db", "plain"}),
    ("tier=web,env=prod", {"web1"}),
    ("tier in (web),env", {"web1", "web2"}),
])
def test_label_selectors_on_list(standin: StandIn, selector: str, expected: set[str]) -> None:
    k, ns = standin.kube, "t-selectors"
    if k.get_opt("v1", "namespaces", None, ns) is None:
        k.ensure_namespace(ns)
        k.create(cm("web1", ns, {"tier": "web", "env": "prod"}))
        k.create(cm("web2", ns, {"tier": "web", "env": "dev"}))
        k.create(cm("db", ns, {"tier": "db"}))
        k.create(cm("plain", ns))
    got = {i["metadata"]["name"] for i in k.list(*CM, ns, labelSelector=selector)["items"]}
    assert got == expected


def test_field_selector_on_name(standin: StandIn, ns: str) -> None:
    k = standin.kube
    k.create(cm("x", ns))
    k.create(cm("y", ns))
    got = k.list(*CM, ns, fieldSelector="metadata.name=y")["items"]
    assert [i["metadata"]["name"] for i in got] == ["y"]


def test_server_side_apply_creates_then_merges_and_records_manager(standin: StandIn, ns: str) -> None:
    k = standin.kube
    created = k.apply(cm("ssa", ns, {"app": "x"}, a="1", b="2"), manager="soma.dev/agent")
    assert created["data"] == {"a": "1", "b": "2"}
    managers = {m["manager"]: m for m in created["metadata"]["managedFields"]}
    assert managers["soma.dev/agent"]["operation"] == "Apply"
    assert managers["soma.dev/agent"]["fieldsV1"]["f:data"] == {"f:a": {}, "f:b": {}}
    # Someone else adds a field with a merge patch; a re-apply keeps it (not owned by the applier).
    k.patch(*CM, ns, "ssa", {"data": {"other": "z"}})
    merged = k.apply(cm("ssa", ns, {"app": "x"}, a="1", b="3"), manager="soma.dev/agent")
    assert merged["data"] == {"a": "1", "b": "3", "other": "z"}
    # A field the applier stops applying is removed.
    dropped = k.apply(cm("ssa", ns, {"app": "x"}, a="1"), manager="soma.dev/agent")
    assert dropped["data"] == {"a": "1", "other": "z"}
    # An identical apply is a no-op: same resourceVersion.
    again = k.apply(cm("ssa", ns, {"app": "x"}, a="1"), manager="soma.dev/agent")
    assert rv(again) == rv(dropped)


def test_apply_conflicts_without_force(standin: StandIn, ns: str) -> None:
    k = standin.kube
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l", "namespace": ns},
             "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}
    k.create({**lease, "spec": {}})
    k.apply(lease, manager="a", force=False)
    taken = {**lease, "spec": {"holderIdentity": "b", "leaseDurationSeconds": 15}}
    err = k.apply(taken, manager="b", force=False, expect=409)
    assert err["reason"] == "Conflict" and "holderIdentity" in err["message"]
    same_value = k.apply({**lease, "spec": {"leaseDurationSeconds": 15}}, manager="b", force=False)
    assert same_value["spec"]["holderIdentity"] == "a", "co-owning an equal value is no conflict"
    forced = k.apply(taken, manager="b", force=True)
    assert forced["spec"]["holderIdentity"] == "b"
    assert k.apply(cm("nofm", ns), manager="", expect=400)["reason"] == "BadRequest"


def test_generation_bumps_on_spec_only(standin: StandIn, ns: str) -> None:
    k = standin.kube
    a = k.apply(agent("g", ns))
    assert a["metadata"]["generation"] == 1 and "status" not in a
    labelled = k.patch("soma.dev/v1alpha1", "agents", ns, "g", {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 1 and rv(labelled) > rv(a)
    status = k.patch("soma.dev/v1alpha1", "agents", ns, "g", {"status": {"observedGeneration": 1}}, sub="status")
    assert status["metadata"]["generation"] == 1 and status["status"] == {"observedGeneration": 1}
    spec = k.apply(agent("g", ns, image="registry.example.com/a@sha256:" + "1" * 64))
    assert spec["metadata"]["generation"] == 2
    assert spec["status"] == {"observedGeneration": 1}, "a main-resource apply leaves status alone"
    # Status in a main-resource write is ignored; spec in a /status write is ignored.
    ignored = k.patch("soma.dev/v1alpha1", "agents", ns, "g", {"status": {"observedGeneration": 9}})
    assert ignored["status"] == {"observedGeneration": 1} and rv(ignored) == rv(spec)
    st = k.apply({**agent("g", ns), "status": {"observedGeneration": 2}}, manager="soma.dev/agent", sub="status")
    assert st["status"]["observedGeneration"] == 2 and st["metadata"]["generation"] == 2
    assert st["spec"]["image"].endswith("1" * 64), "spec in a /status apply is ignored"
    assert any(m.get("subresource") == "status" for m in st["metadata"]["managedFields"])


def test_noop_writes_keep_resource_version_and_emit_nothing(standin: StandIn, ns: str) -> None:
    k = standin.kube
    obj = k.create(cm("noop", ns, a="1"))
    events: list[dict[str, Any]] = []
    watcher = threading.Thread(target=lambda: events.extend(
        k.watch(*CM, ns, resourceVersion=obj["metadata"]["resourceVersion"], timeoutSeconds="2")))
    watcher.start()
    time.sleep(0.3)
    assert rv(k.patch(*CM, ns, "noop", {"data": {"a": "1"}})) == rv(obj)
    assert rv(k.replace(obj)) == rv(obj)
    assert rv(k.patch(*CM, ns, "noop", [{"op": "replace", "path": "/data/a", "value": "1"}], kind="json")) == rv(obj)
    changed = k.patch(*CM, ns, "noop", {"data": {"a": "2"}})
    watcher.join(timeout=10)
    assert [(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in events] == \
        [("MODIFIED", changed["metadata"]["resourceVersion"])]


def test_replace_uses_optimistic_concurrency(standin: StandIn, ns: str) -> None:
    k = standin.kube
    lease = k.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                      "metadata": {"name": "leader", "namespace": ns}, "spec": {}})
    lease["spec"] = {"holderIdentity": "a", "leaseDurationSeconds": 15}
    first = k.replace(lease)
    assert first["spec"]["holderIdentity"] == "a" and rv(first) > rv(lease)
    lease["spec"]["holderIdentity"] = "b"  # still carries the old resourceVersion
    stale = k.replace(lease, expect=409)
    assert stale["reason"] == "Conflict" and "the object has been modified" in stale["message"]
    assert k.get("coordination.k8s.io/v1", "leases", ns, "leader")["spec"]["holderIdentity"] == "a"
    missing = {**lease, "metadata": {"name": "nope", "namespace": ns}}
    k.replace(missing, expect=404)


def test_merge_strategic_and_json_patches_including_status(standin: StandIn, ns: str) -> None:
    k = standin.kube
    k.apply(deployment("p", ns), manager="test")
    merged = k.patch("apps/v1", "deployments", ns, "p", {"metadata": {"annotations": {"a": "b"}},
                                                         "spec": {"paused": True}})
    assert merged["spec"]["paused"] is True and merged["metadata"]["generation"] == 2
    removed = k.patch("apps/v1", "deployments", ns, "p", {"spec": {"paused": None}}, kind="strategic")
    assert "paused" not in removed["spec"]
    status = k.patch("apps/v1", "deployments", ns, "p",
                     [{"op": "add", "path": "/status", "value": {"replicas": 7}}], kind="json", sub="status")
    assert status["status"]["replicas"] == 7
    k.patch("apps/v1", "deployments", ns, "p", [{"op": "test", "path": "/spec/replicas", "value": 99}],
            kind="json", expect=422)
    k.request("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/p", data="{}",
              headers={"Content-Type": "text/plain"}, expect=415)


def test_watch_from_list_resource_version_with_selector_transitions(standin: StandIn, ns: str) -> None:
    k = standin.kube
    k.create(cm("before", ns, {"w": "1"}))
    listed = k.list(*CM, ns, labelSelector="w=1")
    events: list[dict[str, Any]] = []
    watcher = threading.Thread(target=lambda: events.extend(k.watch(
        *CM, ns, labelSelector="w=1", resourceVersion=listed["metadata"]["resourceVersion"],
        allowWatchBookmarks="true", timeoutSeconds="3")))
    watcher.start()
    time.sleep(0.3)
    k.create(cm("x", ns, {"w": "1"}))                                   # ADDED
    k.create(cm("unlabelled", ns))                                       # not seen
    k.patch(*CM, ns, "x", {"data": {"k": "v"}})                          # MODIFIED
    k.patch(*CM, ns, "x", {"metadata": {"labels": {"w": "2"}}})          # stops matching: DELETED
    k.patch(*CM, ns, "unlabelled", {"metadata": {"labels": {"w": "1"}}})  # starts matching: ADDED
    k.delete(*CM, ns, "before")                                          # DELETED
    watcher.join(timeout=15)
    seen = [(e["type"], e["object"]["metadata"].get("name")) for e in events if e["type"] != "BOOKMARK"]
    assert seen == [("ADDED", "x"), ("MODIFIED", "x"), ("DELETED", "x"), ("ADDED", "unlabelled"),
                    ("DELETED", "before")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs), "events arrive in resourceVersion order"
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks and bookmarks[0]["object"]["kind"] == "ConfigMap" and \
        bookmarks[0]["object"]["apiVersion"] == "v1", "bookmarks carry apiVersion/kind (kube-rs needs them)"


def test_watch_without_resource_version_starts_with_current_state(standin: StandIn, ns: str) -> None:
    k = standin.kube
    k.create(cm("s1", ns))
    k.create(cm("s2", ns))
    events = list(k.watch(*CM, ns, timeoutSeconds="1"))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "s1"), ("ADDED", "s2")]
    streaming = list(k.watch(*CM, ns, sendInitialEvents="true", resourceVersionMatch="NotOlderThan",
                             allowWatchBookmarks="true", timeoutSeconds="1"))
    assert streaming[2]["type"] == "BOOKMARK" and \
        streaming[2]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_from_compacted_resource_version_is_gone(standin: StandIn, ns: str) -> None:
    k = standin.kube
    first = k.create(cm("old", ns))
    for i in range(60):  # the fixture keeps 50 events per resource
        k.patch(*CM, ns, "old", {"data": {"i": str(i)}})
    events = list(k.watch(*CM, ns, resourceVersion=first["metadata"]["resourceVersion"], timeoutSeconds="2"))
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410
    assert events[0]["object"]["reason"] == "Expired"


def test_delete_honours_finalizers(standin: StandIn, ns: str) -> None:
    k = standin.kube
    k.apply({**agent("fin", ns), "metadata": {"name": "fin", "namespace": ns, "finalizers": ["soma.dev/cleanup"]}})
    pending = k.delete("soma.dev/v1alpha1", "agents", ns, "fin")
    assert pending["metadata"]["deletionTimestamp"], "finalizers hold the object with a deletionTimestamp"
    k.patch("soma.dev/v1alpha1", "agents", ns, "fin", {"metadata": {"finalizers": None}})
    assert k.get_opt("soma.dev/v1alpha1", "agents", ns, "fin") is None
    gone = k.delete(*CM, ns, "never-was", expect=404)
    assert gone["reason"] == "NotFound"


def test_owner_reference_garbage_collection(standin: StandIn, ns: str) -> None:
    k = standin.kube
    owner = k.apply(agent("owner", ns))
    ref = {"apiVersion": "soma.dev/v1alpha1", "kind": "Agent", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    child = cm("owner-child", ns)
    child["metadata"]["ownerReferences"] = [ref]
    k.create(child)
    dep = deployment("owner", ns)
    dep["metadata"]["ownerReferences"] = [ref]
    k.apply(dep)
    orphan = cm("orphaned", ns)
    orphan["metadata"]["ownerReferences"] = [ref]
    k.create(orphan)
    k.delete(*CM, ns, "orphaned", propagationPolicy="Orphan")  # deleting a child leaves the owner
    assert k.get_opt("soma.dev/v1alpha1", "agents", ns, "owner") is not None
    k.delete("soma.dev/v1alpha1", "agents", ns, "owner", propagationPolicy="Background")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if k.get_opt(*CM, ns, "owner-child") is None and k.get_opt("apps/v1", "deployments", ns, "owner") is None:
            break
        time.sleep(0.05)
    assert k.get_opt(*CM, ns, "owner-child") is None
    assert k.get_opt("apps/v1", "deployments", ns, "owner") is None


def test_namespace_deletion_removes_contents(standin: StandIn) -> None:
    k, ns = standin.kube, "t-doomed"
    k.ensure_namespace(ns)
    k.create(cm("c", ns))
    k.delete("v1", "namespaces", None, ns)
    deadline = time.monotonic() + 5
    while k.get_opt("v1", "namespaces", None, ns) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert k.get_opt("v1", "namespaces", None, ns) is None
    assert k.get_opt(*CM, ns, "c") is None


def test_deployment_controller_reports_ready_replicas(standin: StandIn, ns: str) -> None:
    k = standin.kube
    k.apply(deployment("web", ns, replicas=3))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status = k.get("apps/v1", "deployments", ns, "web").get("status") or {}
        if status.get("readyReplicas") == 3:
            break
        time.sleep(0.05)
    assert status["observedGeneration"] == 1 and status["availableReplicas"] == 3
    assert status["updatedReplicas"] == 3 and status["replicas"] == 3
    scaled = k.apply(deployment("web", ns, replicas=1))
    assert scaled["metadata"]["generation"] == 2
    time.sleep(0.6)
    after = k.get("apps/v1", "deployments", ns, "web")
    assert after["status"]["observedGeneration"] == 2 and after["status"]["readyReplicas"] == 1
    # The controller writes status only when it changed.
    time.sleep(0.5)
    assert rv(k.get("apps/v1", "deployments", ns, "web")) == rv(after)


def test_crds_register_resources_and_discovery(standin: StandIn, ns: str) -> None:
    k = standin.kube
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.dev"},
           "spec": {"group": "example.dev", "scope": "Namespaced",
                    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                    "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                                  "schema": {"openAPIV3Schema": {"type": "object"}}}]}}
    k.create(crd)
    w = k.create({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": ns},
                  "spec": {"size": 1}})
    assert w["metadata"]["generation"] == 1
    resources = k.request("GET", "/apis/example.dev/v1", expect=200).json()["resources"]
    assert {r["name"] for r in resources} == {"widgets", "widgets/status"}
    established = k.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, "widgets.example.dev")
    assert {c["type"] for c in established["status"]["conditions"]} >= {"Established"}
    assert k.request("GET", "/apis/soma.dev/v1alpha1", expect=(200, 404)).status_code in (200, 404)


def test_request_log_counts_per_object(standin: StandIn, ns: str) -> None:
    k = standin.kube
    k.apply(cm("counted", ns, a="1"), manager="soma.dev/agent")
    k.apply(cm("counted", ns, a="1"), manager="soma.dev/agent")
    k.get(*CM, ns, "counted")
    stats = standin.stats()
    mine = {(r["verb"], r["subresource"]): r["count"] for r in stats["requests"]
            if r["namespace"] == ns and r["name"] == "counted"}
    assert mine == {("apply", ""): 2, ("get", ""): 1}
    changes = [c["count"] for c in stats["changes"] if c["namespace"] == ns and c["name"] == "counted"]
    assert changes == [1], "the second apply was a no-op: one change only"


def test_in_process_with_kmock_reactions_taking_priority() -> None:
    """Used as a library, kmock's DSL still works: a test's reaction wins over the store."""
    import asyncio

    import aiohttp
    import kmock

    from soma_apiserver import SomaApiServer

    async def scenario() -> None:
        server = SomaApiServer(deployment_controller=False)
        async with server, kmock.Server(server) as http, aiohttp.ClientSession(str(http.url)) as client:
            path = "/api/v1/namespaces/default/configmaps"
            resp = await client.post(path, json=cm("ok", "default"))
            assert resp.status == 201
            server["post " + path] << 500  # inject a failure for creates only
            assert (await client.post(path, json=cm("fails", "default"))).status == 500
            listed = await (await client.get(path)).json()
            assert [i["metadata"]["name"] for i in listed["items"]] == ["ok"]
            assert len(server["post"]) == 2, "kmock's request log still records what came in"

    asyncio.run(scenario())
