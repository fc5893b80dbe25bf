#!/usr/bin/env python3
"""Assertions on the output of `helm template charts/soma`, for charts/test.sh.

Usage: rendered.py CHECK MANIFEST [ARG...]

Each check exits 0 when it holds, or prints why not and exits 1. The expected
RBAC rules are written out here, separately from the chart, so that a change to
the chart's permissions has to be made twice: in the chart and, deliberately,
here (and in docs/rbac.md).
"""
import sys

import yaml

# The operator's permissions wherever it reconciles Soma resources (docs/rbac.md).
ALL_WRITE = ["get", "list", "watch", "create", "patch", "update", "delete"]
EXPECTED_RULES = [
    (("soma.dev",), ("agents", "budgets", "capsules", "jobs"), ("get", "list", "watch")),
    (("soma.dev",), ("agents/status", "budgets/status", "capsules/status", "jobs/status"),
     ("get", "patch", "update")),
    (("",), ("serviceaccounts", "services", "configmaps"), tuple(ALL_WRITE)),
    (("apps",), ("deployments",), tuple(ALL_WRITE)),
    (("networking.k8s.io",), ("networkpolicies",), tuple(ALL_WRITE)),
    (("events.k8s.io",), ("events",), ("create", "patch")),
    (("",), ("events",), ("create", "patch")),
]
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace",
                  "PriorityClass", "StorageClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration", "APIService"}


class Failed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise Failed(msg)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def of_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind, name=None):
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    expect(len(found) == 1, f"expected exactly one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def normalise(rules):
    return sorted((tuple(sorted(r.get("apiGroups", []))), tuple(sorted(r.get("resources", []))),
                   tuple(sorted(r.get("verbs", []))), tuple(sorted(r.get("resourceNames", []))))
                  for r in rules)


def check_rules(rules, where):
    want = normalise([{"apiGroups": list(g), "resources": list(r), "verbs": list(v)}
                      for g, r, v in EXPECTED_RULES])
    got = normalise(rules)
    expect(got == want, f"{where}: rules differ from the expected least-privilege set\n got: {got}\nwant: {want}")
    for r in rules:
        for field in ("apiGroups", "resources", "verbs"):
            expect("*" not in r.get(field, []), f"{where}: wildcard in {field}")
        expect("secrets" not in r.get("resources", []), f"{where}: grants access to secrets")


def operator_deployment(docs):
    return one(docs, "Deployment")


def operator_container(docs):
    containers = operator_deployment(docs)["spec"]["template"]["spec"]["containers"]
    expect(len(containers) == 1, f"expected one container, found {len(containers)}")
    return containers[0]


def args_of(docs):
    return operator_container(docs)["args"]


def check_lease_role(docs, release_ns, sa_name, lease_name="soma-operator"):
    roles = [r for r in of_kind(docs, "Role") if r["metadata"]["namespace"] == release_ns
             and any("coordination.k8s.io" in rule.get("apiGroups", []) for rule in r["rules"])]
    expect(len(roles) == 1, f"expected one lease Role in {release_ns}, found {len(roles)}")
    role = roles[0]
    verbs = set()
    for rule in role["rules"]:
        expect(rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"],
               f"lease Role grants more than leases: {rule}")
        if rule.get("resourceNames"):
            expect(rule["resourceNames"] == [lease_name], f"lease Role names {rule['resourceNames']}")
        else:
            expect(rule["verbs"] == ["create"], "only `create` may be granted without resourceNames")
        verbs |= set(rule["verbs"])
    expect(verbs == {"get", "create", "update", "patch"}, f"lease verbs: {sorted(verbs)}")
    binding = [b for b in of_kind(docs, "RoleBinding")
               if b["metadata"]["namespace"] == release_ns and b["roleRef"]["name"] == role["metadata"]["name"]]
    expect(len(binding) == 1, "lease Role has no RoleBinding")
    expect(binding[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": release_ns}],
           f"lease RoleBinding subjects: {binding[0]['subjects']}")


# Only in cluster mode: Namespaces, read, for the policies' inventory.
NAMESPACES_RULE = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}


def is_webhook(obj):
    return obj["metadata"]["name"].endswith("-webhook")


def cluster_mode(docs, release_ns):
    """ClusterRole + ClusterRoleBinding; no per-namespace operator Role; all namespaces watched."""
    crs = [r for r in of_kind(docs, "ClusterRole") if not is_webhook(r)]
    expect(len(crs) == 1, f"expected one operator ClusterRole, found {len(crs)}")
    cr = crs[0]
    expect(NAMESPACES_RULE in cr["rules"], "cluster mode: Namespaces are readable for the policy inventory")
    check_rules([r for r in cr["rules"] if r != NAMESPACES_RULE], "ClusterRole")
    crbs = [b for b in of_kind(docs, "ClusterRoleBinding") if not is_webhook(b)]
    expect(len(crbs) == 1, f"expected one operator ClusterRoleBinding, found {len(crbs)}")
    crb = crbs[0]
    sa = one(docs, "ServiceAccount")
    expect(sa["metadata"]["namespace"] == release_ns, "ServiceAccount not in the release namespace")
    expect(crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": cr["metadata"]["name"]}, f"ClusterRoleBinding roleRef {crb['roleRef']}")
    expect(crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                "namespace": release_ns}], f"ClusterRoleBinding subjects {crb['subjects']}")
    other_roles = [r for r in of_kind(docs, "Role")
                   if not r["metadata"]["name"].endswith("-leader-election") and not is_webhook(r)]
    expect(not other_roles, f"cluster mode renders namespaced operator Roles: {other_roles}")
    expect(not any(a.startswith("--namespaces") for a in args_of(docs)),
           "cluster mode must not pass --namespaces")
    check_lease_role(docs, release_ns, sa["metadata"]["name"])


def namespaced_mode(docs, release_ns, namespaces):
    """Role + RoleBinding per listed namespace and nothing cluster-scoped but the webhook's
    ClusterRole for its one ValidatingWebhookConfiguration (none with webhook.enabled=false)."""
    namespaces = namespaces.split(",")
    cluster = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
               if d["kind"] in CLUSTER_SCOPED and not is_webhook(d)]
    expect(not cluster, f"namespaced mode renders cluster-scoped objects: {cluster}")
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            expect(d["metadata"].get("namespace"), f"{d['kind']}/{d['metadata']['name']} has no namespace")
    sa = one(docs, "ServiceAccount")
    for ns in namespaces:
        roles = [r for r in of_kind(docs, "Role") if r["metadata"]["namespace"] == ns
                 and not r["metadata"]["name"].endswith("-leader-election") and not is_webhook(r)]
        expect(len(roles) == 1, f"expected one operator Role in {ns}, found {len(roles)}")
        check_rules(roles[0]["rules"], f"Role in {ns}")
        rbs = [b for b in of_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == ns
               and b["roleRef"]["name"] == roles[0]["metadata"]["name"]]
        expect(len(rbs) == 1, f"expected one RoleBinding in {ns}, found {len(rbs)}")
        expect(rbs[0]["roleRef"]["kind"] == "Role", f"RoleBinding in {ns} must reference a Role")
        expect(rbs[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                       "namespace": release_ns}], f"RoleBinding in {ns}: {rbs[0]['subjects']}")
    operator_role_ns = sorted(r["metadata"]["namespace"] for r in of_kind(docs, "Role")
                              if not r["metadata"]["name"].endswith("-leader-election") and not is_webhook(r))
    expect(operator_role_ns == sorted(namespaces), f"operator Roles in {operator_role_ns}, want {namespaces}")
    expect(f"--namespaces={','.join(namespaces)}" in args_of(docs), f"args {args_of(docs)} lack --namespaces")
    check_lease_role(docs, release_ns, sa["metadata"]["name"])


def hardened(docs):
    """The operator pod itself follows the sandbox rules Soma applies to agents."""
    dep = operator_deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    expect(psc.get("runAsNonRoot") is True, "pod runAsNonRoot")
    expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccomp RuntimeDefault")
    c = operator_container(docs)
    sc = c["securityContext"]
    expect(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false")
    expect(sc.get("runAsNonRoot") is True, "container runAsNonRoot")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities drop ALL")
    expect(not sc.get("capabilities", {}).get("add"), "no added capabilities")
    expect(sc.get("privileged") in (None, False), "not privileged")
    expect(c["resources"].get("limits") and c["resources"].get("requests"), "resources requests and limits")
    expect(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness /healthz")
    expect(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness /readyz")
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    expect(c["livenessProbe"]["httpGet"]["port"] in port_names, "liveness on a named container port")
    expect(c["readinessProbe"]["httpGet"]["port"] in port_names, "readiness on a named container port")
    env = {e["name"]: e for e in c["env"]}
    expect(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "POD_NAME downward API")
    expect(env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace",
           "POD_NAMESPACE downward API")
    expect("RUST_LOG" in env, "RUST_LOG set")
    args = c["args"]
    expect(args[0] == "run", f"first arg is `run`: {args}")
    metrics = [a for a in args if a.startswith("--metrics-addr=")]
    expect(len(metrics) == 1, "--metrics-addr passed once")
    expect(metrics[0].rsplit(":", 1)[1] == str(port_names["http-metrics"]), "--metrics-addr on the probe port")
    for flag in ("--sidecar-image=", "--sidecar-port="):
        expect(any(a.startswith(flag) for a in args), f"{flag} passed")
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    expect("/tmp" in mounts, "writable /tmp for a read-only root filesystem")
    svc = one(docs, "Service", dep["metadata"]["name"] + "-metrics")
    expect(svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(),
           "metrics Service selects the operator pods")
    expect(svc["spec"]["ports"][0]["targetPort"] == "http-metrics", "metrics Service targets http-metrics")
    expect(dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(),
           "Deployment selector matches its pod labels")


def webhook(docs, release_ns):
    """The webhook: a Service on 443 to the pods' `webhook` port, the flags naming it, a Role in
    the release namespace that reads only its own Secret, and a ClusterRole for only its own
    ValidatingWebhookConfiguration."""
    dep = operator_deployment(docs)
    name = dep["metadata"]["name"]
    args = dict(a.split("=", 1) for a in args_of(docs) if "=" in a)
    ports = {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]}
    expect(args.get("--webhook-port") == str(ports.get("webhook")), f"--webhook-port vs ports {ports}")
    svc = one(docs, "Service", args.get("--webhook-service"))
    expect(svc["metadata"]["namespace"] == release_ns, "webhook Service in the release namespace")
    expect(svc["spec"]["ports"] == [{"name": "https-webhook", "port": 443, "targetPort": "webhook",
                                     "protocol": "TCP"}], f"webhook Service ports {svc['spec']['ports']}")
    expect(svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(),
           "webhook Service selects the operator pods")
    role = one(docs, "Role", f"{name}-webhook")
    expect(role["metadata"]["namespace"] == release_ns, "webhook Role in the release namespace")
    for rule in role["rules"]:
        if "secrets" in rule["resources"]:
            expect(rule.get("resourceNames") == [args["--webhook-cert-secret"]] or rule["verbs"] == ["create"],
                   f"webhook Role reads Secrets other than its own: {rule}")
        for field in ("apiGroups", "resources", "verbs"):
            expect("*" not in rule.get(field, []), f"webhook Role: wildcard in {field}")
    cr = one(docs, "ClusterRole", f"{name}-webhook")
    for rule in cr["rules"]:
        expect(rule["resources"] == ["validatingwebhookconfigurations"], f"webhook ClusterRole grants {rule}")
        expect(rule.get("resourceNames") == [args["--webhook-configuration"]] or rule["verbs"] == ["create"],
               f"webhook ClusterRole not limited to its configuration: {rule}")
    for kind, role_kind in (("RoleBinding", "Role"), ("ClusterRoleBinding", "ClusterRole")):
        b = one(docs, kind, f"{name}-webhook")
        expect(b["roleRef"]["kind"] == role_kind and b["roleRef"]["name"] == f"{name}-webhook",
               f"{kind} roleRef {b['roleRef']}")


def arg(docs, flag):
    """Print the value of --flag=VALUE (or the flag itself for a bare switch)."""
    for a in args_of(docs):
        if a == flag or a.startswith(flag + "="):
            print(a.split("=", 1)[1] if "=" in a else a)
            return
    raise Failed(f"{flag} not in {args_of(docs)}")


def image(docs):
    print(operator_container(docs)["image"])


def count(docs, kind):
    print(len(of_kind(docs, kind)))


def replicas(docs):
    print(operator_deployment(docs)["spec"]["replicas"])


CHECKS = {"cluster-mode": cluster_mode, "namespaced-mode": namespaced_mode, "hardened": hardened,
          "webhook": webhook,
          "arg": arg, "image": image, "count": count, "replicas": replicas}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(CHECKS)}}} MANIFEST [ARG...]")
    try:
        CHECKS[sys.argv[1]](load(sys.argv[2]), *sys.argv[3:])
    except Failed as e:
        print(f"  {e}", file=sys.stderr)
        sys.exit(1)
