#!/usr/bin/env python3
"""Assertions on the output of `helm template charts/soma`, for charts/test.sh.

Usage: rendered.py CHECK MANIFEST [ARG...]

Each check exits 0 when it holds, or prints why not and exits 1. The expected
RBAC rules are written out here, separately from the chart, so that a change to
the chart's permissions has to be made twice: in the chart and, deliberately,
here (and in docs/rbac.md).
"""
import base64
import re
import sys
import urllib.parse

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
    (("soma.dev",), ("jobs",), ("delete",)),
    (("batch",), ("cronjobs", "jobs"), ("create", "get", "list", "patch", "watch")),
    (("",), ("pods",), ("get", "list")),
]
# The ledger Secrets (`<agent>-ledger`, `sjob-<job>-ledger`): with a ledger, read, applied
# (server-side apply: create, patch) and deleted; without one, only the Secrets a DR drill Job
# names are read (get), and `<agent>-ledger` deleted once (the ledger was turned off and the
# Deployment it replaces still referenced it). Never list or watch: the operator cannot
# enumerate Secrets.
LEDGER_SECRET_RULE = (("",), ("secrets",), ("get", "create", "patch", "delete"))
NO_LEDGER_SECRET_RULE = (("",), ("secrets",), ("get", "delete"))
# The key of the Secrets holding the ledger's URL (the chart's, ledger.existingSecret, and the
# per-Agent copies).
LEDGER_URL_KEY = "database-url"
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


def check_rules(rules, where, ledger):
    expected = EXPECTED_RULES + [LEDGER_SECRET_RULE if ledger else NO_LEDGER_SECRET_RULE]
    want = normalise([{"apiGroups": list(g), "resources": list(r), "verbs": list(v)}
                      for g, r, v in expected])
    got = normalise(rules)
    expect(got == want, f"{where}: rules differ from the expected least-privilege set\n got: {got}\nwant: {want}")
    for r in rules:
        for field in ("apiGroups", "resources", "verbs"):
            expect("*" not in r.get(field, []), f"{where}: wildcard in {field}")
        if "secrets" in r.get("resources", []):
            expect(not {"list", "watch"} & set(r["verbs"]), f"{where}: may list or watch Secrets: {r}")
            expect(ledger or not {"create", "patch"} & set(r["verbs"]),
                   f"{where}: writes Secrets without a ledger: {r}")


def operator_deployment(docs):
    return one(docs, "Deployment")


def operator_container(docs):
    containers = operator_deployment(docs)["spec"]["template"]["spec"]["containers"]
    expect(len(containers) == 1, f"expected one container, found {len(containers)}")
    return containers[0]


def args_of(docs):
    return operator_container(docs)["args"]


def env_of(docs):
    return {e["name"]: e for e in operator_container(docs)["env"]}


def ledger_url_ref(docs):
    """The secretKeyRef SOMA_LEDGER_URL comes from, or None without a ledger."""
    env = env_of(docs).get("SOMA_LEDGER_URL")
    if env is None:
        return None
    expect("value" not in env, "SOMA_LEDGER_URL must come from a Secret, not a literal value")
    return env["valueFrom"]["secretKeyRef"]


def is_extra_role(obj):
    """The release-namespace Roles beside the operator's rules: Lease, webhook, ledger seal key."""
    return obj["metadata"]["name"].endswith(("-leader-election", "-webhook", "-ledger"))


def check_ledger_role(docs, release_ns, sa_name):
    """With a ledger: a Role in the release namespace for the seal key Secret (create; get by
    name) and its public key ConfigMap (create and patch by name), and nothing else."""
    args = dict(a.split("=", 1) for a in args_of(docs) if "=" in a)
    roles = [r for r in of_kind(docs, "Role") if r["metadata"]["name"].endswith("-ledger")]
    if ledger_url_ref(docs) is None:
        expect(not roles, f"no ledger, yet a ledger Role: {roles}")
        expect("--ledger-seal-key-secret" not in args, "no ledger, yet --ledger-seal-key-secret")
        return
    expect(len(roles) == 1, f"expected one ledger Role, found {len(roles)}")
    role = roles[0]
    expect(role["metadata"]["namespace"] == release_ns, "ledger Role in the release namespace")
    key = args.get("--ledger-seal-key-secret")
    expect(key, "--ledger-seal-key-secret passed")
    want = normalise([
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": [key]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"], "resourceNames": [key]},
    ])
    expect(normalise(role["rules"]) == want, f"ledger Role rules {role['rules']}")
    binding = [b for b in of_kind(docs, "RoleBinding")
               if b["metadata"]["namespace"] == release_ns and b["roleRef"]["name"] == role["metadata"]["name"]]
    expect(len(binding) == 1, "ledger Role has no RoleBinding")
    expect(binding[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": release_ns}],
           f"ledger RoleBinding subjects: {binding[0]['subjects']}")


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


def is_vault_reviewer(obj):
    """The optional system:auth-delegator binding for Vault's TokenReview (not the operator's)."""
    return obj["kind"] == "ClusterRoleBinding" and obj["metadata"]["name"].endswith("-vault-tokenreview")


def vault_tokenreview(docs, sa_name, sa_namespace):
    """`vault.tokenReviewer`: system:auth-delegator bound to Vault's service account, and the
    Vault defaults passed to the operator."""
    bindings = [b for b in of_kind(docs, "ClusterRoleBinding") if is_vault_reviewer(b)]
    expect(len(bindings) == 1, f"expected one Vault TokenReview binding, found {len(bindings)}")
    b = bindings[0]
    expect(b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "system:auth-delegator"}, f"roleRef {b['roleRef']}")
    expect(b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}],
           f"subjects {b['subjects']}")
    args = args_of(docs)
    for flag in ("--vault-address", "--vault-ca-file", "--vault-auth-mount", "--vault-role", "--vault-audience",
                 "--vault-ledger-mount", "--vault-ledger-role"):
        expect(any(a.startswith(flag + "=") for a in args), f"{flag} not passed")
    settings = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-settings")]
    expect(settings and "vault-ca.pem" in settings[0]["data"], "the Vault CA bundle is not in the settings ConfigMap")


def cluster_mode(docs, release_ns):
    """ClusterRole + ClusterRoleBinding; no per-namespace operator Role; all namespaces watched."""
    crs = [r for r in of_kind(docs, "ClusterRole") if not is_webhook(r)]
    expect(len(crs) == 1, f"expected one operator ClusterRole, found {len(crs)}")
    cr = crs[0]
    expect(NAMESPACES_RULE in cr["rules"], "cluster mode: Namespaces are readable for the policy inventory")
    check_rules([r for r in cr["rules"] if r != NAMESPACES_RULE], "ClusterRole", ledger_url_ref(docs) is not None)
    crbs = [b for b in of_kind(docs, "ClusterRoleBinding") if not is_webhook(b) and not is_vault_reviewer(b)]
    expect(len(crbs) == 1, f"expected one operator ClusterRoleBinding, found {len(crbs)}")
    crb = crbs[0]
    sa = one(docs, "ServiceAccount")
    expect(sa["metadata"]["namespace"] == release_ns, "ServiceAccount not in the release namespace")
    expect(crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": cr["metadata"]["name"]}, f"ClusterRoleBinding roleRef {crb['roleRef']}")
    expect(crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                "namespace": release_ns}], f"ClusterRoleBinding subjects {crb['subjects']}")
    other_roles = [r for r in of_kind(docs, "Role") if not is_extra_role(r)]
    expect(not other_roles, f"cluster mode renders namespaced operator Roles: {other_roles}")
    expect(not any(a.startswith("--namespaces") for a in args_of(docs)),
           "cluster mode must not pass --namespaces")
    check_lease_role(docs, release_ns, sa["metadata"]["name"])
    check_ledger_role(docs, release_ns, sa["metadata"]["name"])


def namespaced_mode(docs, release_ns, namespaces):
    """Role + RoleBinding per listed namespace and nothing cluster-scoped but the webhook's
    ClusterRole for its one ValidatingWebhookConfiguration (none with webhook.enabled=false)."""
    namespaces = namespaces.split(",")
    cluster = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
               if d["kind"] in CLUSTER_SCOPED and not is_webhook(d) and not is_vault_reviewer(d)]
    expect(not cluster, f"namespaced mode renders cluster-scoped objects: {cluster}")
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            expect(d["metadata"].get("namespace"), f"{d['kind']}/{d['metadata']['name']} has no namespace")
    sa = one(docs, "ServiceAccount")
    for ns in namespaces:
        roles = [r for r in of_kind(docs, "Role") if r["metadata"]["namespace"] == ns and not is_extra_role(r)]
        expect(len(roles) == 1, f"expected one operator Role in {ns}, found {len(roles)}")
        check_rules(roles[0]["rules"], f"Role in {ns}", ledger_url_ref(docs) is not None)
        rbs = [b for b in of_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == ns
               and b["roleRef"]["name"] == roles[0]["metadata"]["name"]]
        expect(len(rbs) == 1, f"expected one RoleBinding in {ns}, found {len(rbs)}")
        expect(rbs[0]["roleRef"]["kind"] == "Role", f"RoleBinding in {ns} must reference a Role")
        expect(rbs[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                       "namespace": release_ns}], f"RoleBinding in {ns}: {rbs[0]['subjects']}")
    operator_role_ns = sorted(r["metadata"]["namespace"] for r in of_kind(docs, "Role") if not is_extra_role(r))
    expect(operator_role_ns == sorted(namespaces), f"operator Roles in {operator_role_ns}, want {namespaces}")
    expect(f"--namespaces={','.join(namespaces)}" in args_of(docs), f"args {args_of(docs)} lack --namespaces")
    check_lease_role(docs, release_ns, sa["metadata"]["name"])
    check_ledger_role(docs, release_ns, sa["metadata"]["name"])


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
    expect(not any(a.startswith("--ledger-url") or "postgres://" in a for a in args),
           "the ledger's URL (it holds a password) must not be in args")
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


def ledger(docs, release_ns):
    """The in-chart PostgreSQL: a Secret with a generated password and the URL of the Service,
    a Service on 5432 selecting only the PostgreSQL pod, a hardened StatefulSet of one replica
    with its data on a ReadWriteOnce claim; the operator reads the URL from that Secret and the
    release namespace is open to the sidecars' egress."""
    sts = one(docs, "StatefulSet")
    name = sts["metadata"]["name"]
    secret = one(docs, "Secret", name)
    expect(secret["metadata"]["namespace"] == release_ns, "ledger Secret in the release namespace")
    expect(secret["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep",
           "ledger Secret kept on uninstall (its password goes with the kept volume)")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    expect(set(data) == {"password", "admin-password", LEDGER_URL_KEY}, f"ledger Secret keys {sorted(data)}")
    password = data["password"]
    for key in ("password", "admin-password"):
        expect(len(data[key]) == 32 and data[key].isalnum(), f"{key}: a generated 32-character alphanumeric password")
    expect(data["admin-password"] != password, "the superuser and the ledger role share a password")
    expect(sts["metadata"]["namespace"] == release_ns, "StatefulSet in the release namespace")
    spec = sts["spec"]
    expect(spec["replicas"] == 1, "one PostgreSQL replica")
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    user, db = env["SOMA_LEDGER_USER"]["value"], env["SOMA_LEDGER_DATABASE"]["value"]
    expect(env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "admin-password"},
           "POSTGRES_PASSWORD (the superuser's) from the Secret's admin-password")
    expect(env["SOMA_LEDGER_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "password"},
           "SOMA_LEDGER_PASSWORD (the ledger role's) from the Secret's password")
    svc = one(docs, "Service", name)
    expect(data[LEDGER_URL_KEY] ==
           f"postgres://{user}:{password}@{name}.{release_ns}.svc:5432/{db}?sslmode=disable",
           f"database-url {data[LEDGER_URL_KEY]!r}")
    expect(svc["spec"]["ports"] == [{"name": "postgres", "port": 5432, "targetPort": "postgres",
                                     "protocol": "TCP"}], f"ledger Service ports {svc['spec']['ports']}")
    pod_labels = spec["template"]["metadata"]["labels"]
    expect(svc["spec"]["selector"].items() <= pod_labels.items(), "ledger Service selects the PostgreSQL pod")
    expect(spec["selector"]["matchLabels"].items() <= pod_labels.items(), "StatefulSet selector matches its pods")
    op_labels = operator_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    for other in of_kind(docs, "Service"):
        if other["metadata"]["name"] != name:
            expect(not other["spec"]["selector"].items() <= pod_labels.items(),
                   f"Service {other['metadata']['name']} selects the PostgreSQL pod")
    expect(not svc["spec"]["selector"].items() <= op_labels.items(), "ledger Service selects operator pods")
    expect(spec["serviceName"] == name, "StatefulSet serviceName")
    # Hardened like the operator pod, as uid 70 (postgres in the alpine images).
    psc = pod["securityContext"]
    expect(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 70 and psc.get("fsGroup") == 70,
           f"pod runs as uid 70, non-root, fsGroup 70: {psc}")
    expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccomp RuntimeDefault")
    expect(pod.get("automountServiceAccountToken") is False, "no API token in the PostgreSQL pod")
    sc = c["securityContext"]
    expect(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"),
           "capabilities drop ALL")
    expect(c["resources"].get("limits") and c["resources"].get("requests"), "resources requests and limits")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        expect(c[probe]["exec"]["command"][0] == "pg_isready", f"{probe} runs pg_isready")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/run/postgresql", "/tmp"):
        expect(path in mounts and "emptyDir" in volumes[mounts[path]], f"writable emptyDir at {path}")
    claims = {t["metadata"]["name"]: t["spec"] for t in spec["volumeClaimTemplates"]}
    data_dir = next(p for p, v in mounts.items() if v in claims)
    expect(env["PGDATA"]["value"].startswith(data_dir + "/"), f"PGDATA {env['PGDATA']['value']} below {data_dir}")
    claim = claims[mounts[data_dir]]
    expect(claim["accessModes"] == ["ReadWriteOnce"], "ReadWriteOnce claim")
    expect(ledger_url_ref(docs) == {"name": name, "key": LEDGER_URL_KEY},
           f"SOMA_LEDGER_URL from {ledger_url_ref(docs)}, want the chart's Secret {name}")
    egress = dict(a.split("=", 1) for a in args_of(docs) if "=" in a).get("--sidecar-egress-namespaces", "")
    expect(release_ns in egress.split(","), f"release namespace not in --sidecar-egress-namespaces={egress}")
    expect(len(egress.split(",")) == len(set(egress.split(","))), f"duplicates in egress namespaces: {egress}")


def psql_vars(script):
    """psql variables the init script sets from the environment: {var: ENV_NAME}."""
    return dict(re.findall(r'-v\s+(\w+)="\$\{?(\w+)\}?"', script))


def ledger_roles(docs, want_user=None, want_db=None):
    """The in-chart PostgreSQL's roles: its superuser is `postgres` (POSTGRES_USER, password
    `admin-password`); an init script mounted at /docker-entrypoint-initdb.d creates the ledger
    role with LOGIN, NOSUPERUSER, NOCREATEDB, NOCREATEROLE and the Secret's `password`, and the
    database owned by it; `database-url`, which every Agent namespace gets a copy of, names
    that role and database, never the superuser."""
    sts = one(docs, "StatefulSet")
    name = sts["metadata"]["name"]
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    expect(env["POSTGRES_USER"].get("value") == "postgres", f"POSTGRES_USER {env['POSTGRES_USER']}, want postgres")
    expect(env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "admin-password"},
           "the superuser's password from admin-password")
    expect(env.get("POSTGRES_DB", {}).get("value", "postgres") == "postgres",
           "POSTGRES_DB: the superuser's own database, not the ledger's")
    # The init script, from a ConfigMap mounted at /docker-entrypoint-initdb.d.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    mount = mounts.get("/docker-entrypoint-initdb.d")
    expect(mount is not None, "nothing mounted at /docker-entrypoint-initdb.d")
    expect(mount.get("readOnly") is True, "init scripts mounted read-only")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    expect("configMap" in volume, f"init scripts from a ConfigMap: {volume}")
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    expect(cm["metadata"]["namespace"] == sts["metadata"]["namespace"], "init ConfigMap beside the StatefulSet")
    scripts = {k: v for k, v in cm["data"].items() if k.endswith((".sh", ".sql"))}
    expect(len(scripts) == 1, f"expected one init script, found {sorted(cm['data'])}")
    (file, script), = scripts.items()
    if file.endswith(".sh"):
        # Not executable, the entrypoint would source it into its own shell instead of running it.
        expect(volume["configMap"].get("defaultMode", 0o644) & 0o111 == 0o111, f"{file} is not executable")
        expect(script.startswith("#!/bin/sh\n") or script.startswith("#!/bin/bash\n"), f"{file} has no shebang")

    def value(var):
        """The value of psql variable `var`: {"value": ...} or {"secret": key} from the pod's env."""
        e = env.get(psql_vars(script).get(var, ""))
        expect(e is not None, f"psql variable {var} is not set from the container's environment")
        if "value" in e:
            return {"value": e["value"]}
        ref = e["valueFrom"]["secretKeyRef"]
        expect(ref["name"] == name, f"{var} from Secret {ref['name']}, want {name}")
        return {"secret": ref["key"]}

    sql = " ".join(script.split())
    role = re.search(r'CREATE ROLE :"(\w+)" (?:WITH )?(.*?);', sql, re.I)
    expect(role, f"{file} creates no role:\n{script}")
    role_var, attrs = role.group(1), role.group(2).upper().split()
    for attr in ("LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE"):
        expect(attr in attrs, f"CREATE ROLE without {attr}: {role.group(0)}")
    for attr in ("SUPERUSER", "CREATEDB", "CREATEROLE", "REPLICATION", "BYPASSRLS"):
        expect(attr not in attrs, f"CREATE ROLE with {attr}: {role.group(0)}")
    password = re.search(r"PASSWORD :'(\w+)'", role.group(0))
    expect(password, f"CREATE ROLE sets no password from a psql variable: {role.group(0)}")
    expect(value(password.group(1)) == {"secret": "password"}, "the role's password is not the Secret's password")
    user = value(role_var).get("value")
    expect(user and user != "postgres", f"the init script's role is {user!r}")
    database = re.search(r'CREATE DATABASE :"(\w+)" (?:WITH )?OWNER :"(\w+)"', sql, re.I)
    expect(database, f"{file} creates no database owned by the ledger role:\n{script}")
    expect(database.group(2) == role_var, f"database owned by :{database.group(2)}, want :{role_var}")
    db = value(database.group(1)).get("value")
    expect(not re.search(r"ALTER ROLE|GRANT\s+(pg_|postgres)", sql, re.I), f"{file} widens the role: {sql}")
    # database-url: the ledger role, its password and database, never the superuser.
    secret = one(docs, "Secret", name)
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    url = urllib.parse.urlsplit(data[LEDGER_URL_KEY])
    expect(url.username == user, f"database-url connects as {url.username!r}, want the ledger role {user!r}")
    expect(url.username != "postgres", "database-url names the superuser")
    expect(url.password == data["password"] and url.password != data["admin-password"],
           "database-url does not carry the ledger role's password")
    expect(url.path == f"/{db}", f"database-url database {url.path}, want /{db}")
    if want_user:
        expect(user == want_user, f"ledger role {user}, want {want_user}")
    if want_db:
        expect(db == want_db, f"ledger database {db}, want {want_db}")


def no_postgres(docs):
    """No PostgreSQL rendered: no StatefulSet, no claim, no Secret, no init ConfigMap."""
    expect(not [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-ledger-init")],
           "a ledger init ConfigMap rendered")
    for kind in ("StatefulSet", "PersistentVolumeClaim", "Secret"):
        expect(not of_kind(docs, kind), f"{kind} rendered: {[d['metadata']['name'] for d in of_kind(docs, kind)]}")
    expect(not [s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-ledger")],
           "a ledger Service rendered")


def ledger_url(docs):
    """Print SECRET/KEY that SOMA_LEDGER_URL comes from, or `none`."""
    ref = ledger_url_ref(docs)
    print(f"{ref['name']}/{ref['key']}" if ref else "none")


def claim(docs):
    """Print the PostgreSQL claim: STORAGECLASS STORAGE (`-` for the default class)."""
    spec = one(docs, "StatefulSet")["spec"]["volumeClaimTemplates"][0]["spec"]
    print(spec.get("storageClassName", "-"), spec["resources"]["requests"]["storage"])


def postgres_image(docs):
    print(one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"])


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


def observability(docs, chart, namespaces):
    """PodMonitor for the sidecars (job soma-proxy, agent label; every namespace or the watched
    ones), ServiceMonitor relabelled to job soma-operator, a PrometheusRule with exactly the
    rules file's groups, one dashboard ConfigMap per dashboards/*.json with the sidecar's label,
    and the operator's NetworkPolicy (webhook from anywhere, metrics from the scrape namespaces)."""
    import json
    import pathlib
    chart = pathlib.Path(chart)
    pm = one(docs, "PodMonitor")
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    expect(endpoint["port"] == "proxy-admin" and endpoint["path"] == "/metrics", f"PodMonitor endpoint {endpoint}")
    expect(endpoint.get("honorLabels") is True, "PodMonitor honorLabels")
    relabel = {r.get("targetLabel"): r for r in endpoint.get("relabelings", [])}
    expect(relabel.get("job", {}).get("replacement") == "soma-proxy", f"PodMonitor job relabel: {relabel}")
    expect(relabel.get("agent", {}).get("sourceLabels") == ["__meta_kubernetes_pod_label_soma_dev_agent"],
           f"PodMonitor agent relabel: {relabel}")
    expect(pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "soma-agent",
                                                     "app.kubernetes.io/managed-by": "soma-operator"},
           f"PodMonitor selector {pm['spec']['selector']}")
    ns = pm["spec"]["namespaceSelector"]
    if namespaces == "any":
        expect(ns == {"any": True}, f"PodMonitor namespaceSelector {ns}")
    else:
        expect(ns == {"matchNames": namespaces.split(",")}, f"PodMonitor namespaceSelector {ns}")
    expect(pm["metadata"]["labels"].get("release") == "kube-prometheus-stack", "PodMonitor extra labels")
    expect((endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s"), "podMonitor.interval, scrapeTimeout")
    sm = one(docs, "ServiceMonitor")
    relabel = {r.get("targetLabel"): r for r in sm["spec"]["endpoints"][0].get("relabelings", [])}
    expect(relabel.get("job", {}).get("replacement") == "soma-operator", f"ServiceMonitor job relabel {relabel}")
    rule = one(docs, "PrometheusRule")
    expect(rule["metadata"]["labels"].get("release") == "kube-prometheus-stack", "prometheusRule.labels")
    want = yaml.safe_load((chart / "rules" / "soma.rules.yaml").read_text())["groups"]
    expect(rule["spec"]["groups"] == want, "PrometheusRule groups differ from rules/soma.rules.yaml")
    boards = sorted((chart / "dashboards").glob("*.json"))
    maps = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    expect(len(maps) == len(boards) == 4, f"{len(maps)} dashboard ConfigMaps for {len(boards)} dashboards")
    for cm in maps:
        expect(cm["metadata"]["namespace"] == "monitoring", "dashboards in grafana.dashboards.namespace")
        expect(cm["metadata"].get("annotations", {}).get("grafana_folder") == "Soma", "dashboard annotations")
        (name, text), = cm["data"].items()
        expect(json.loads(text) == json.loads((chart / "dashboards" / name).read_text()), f"{name} differs")
    np = one(docs, "NetworkPolicy")
    expect(np["spec"]["policyTypes"] == ["Ingress"], "operator NetworkPolicy is ingress only")
    rules = np["spec"]["ingress"]
    webhook = [r for r in rules if r["ports"][0]["port"] == 9443]
    metrics = [r for r in rules if r["ports"][0]["port"] == 8080]
    expect(len(webhook) == 1 and "from" not in webhook[0], f"webhook port open to any address: {rules}")
    expect(len(metrics) == 1 and metrics[0]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"]
           == ["monitoring"], f"metrics port from the scrape namespaces: {rules}")


def alerts(docs, tests, runbooks):
    """Every alert of the rules file has a unit test that expects it to fire, and a runbook
    section (its anchor, the alert's name in lower case) in docs/observability.md."""
    import pathlib
    import re
    names = [r["alert"] for g in docs[0]["groups"] for r in g["rules"] if "alert" in r]
    cases = yaml.safe_load(pathlib.Path(tests).read_text())["tests"]
    firing = {t["alertname"] for c in cases for t in c.get("alert_rule_test", []) if t.get("exp_alerts")}
    expect(not set(names) - firing, f"alerts without a firing unit test: {sorted(set(names) - firing)}")
    text = pathlib.Path(runbooks).read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for r in (r for g in docs[0]["groups"] for r in g["rules"] if "alert" in r):
        anchor = r["annotations"]["runbook_url"].split("#", 1)[1]
        expect(anchor == r["alert"].lower(), f"{r['alert']}: runbook_url anchor {anchor}")
        expect(anchor in headings, f"{r['alert']}: no section #{anchor} in {runbooks}")


def verify_images(docs):
    """With imageSignatures.required: an init container runs `soma image verify --require-digest`
    from the cli image on the operator's, the sidecar's and its own image, all by digest, with the
    release key's ConfigMap mounted; hardened like the operator."""
    pod = operator_deployment(docs)["spec"]["template"]["spec"]
    init = [c for c in pod.get("initContainers", []) if c["name"] == "verify-images"]
    expect(len(init) == 1, "one verify-images init container")
    c = init[0]
    images = [operator_container(docs)["image"], next(a.split("=", 1)[1] for a in args_of(docs)
                                                      if a.startswith("--sidecar-image=")), c["image"]]
    expect(all("@sha256:" in i for i in images), f"images by digest: {images}")
    expect(c["args"][:4] == ["image", "verify", "--require-digest", "--key=/etc/soma/release/cosign.pub"], c["args"])
    expect(c["args"][-3:] == images, f"verifies {c['args'][-3:]}, want {images}")
    expect("--insecure-registry=registry.soma-system:5000" in c["args"], "insecure registries passed on")
    expect(c["securityContext"].get("readOnlyRootFilesystem") is True and
           c["securityContext"].get("runAsNonRoot") is True, "init container hardened")
    key = one(docs, "ConfigMap", "soma-operator-release-key")
    expect("BEGIN PUBLIC KEY" in key["data"]["cosign.pub"], "release key ConfigMap")
    vol = [v for v in pod["volumes"] if v["name"] == "release-key"]
    expect(vol and vol[0]["configMap"]["name"] == "soma-operator-release-key", "release key volume")


CHECKS = {"cluster-mode": cluster_mode, "namespaced-mode": namespaced_mode, "hardened": hardened,
          "webhook": webhook, "ledger": ledger, "ledger-roles": ledger_roles, "no-postgres": no_postgres,
          "ledger-url": ledger_url, "claim": claim, "postgres-image": postgres_image,
          "arg": arg, "image": image, "count": count, "replicas": replicas,
          "observability": observability, "alerts": alerts, "verify-images": verify_images,
          "vault-tokenreview": vault_tokenreview}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(CHECKS)}}} MANIFEST [ARG...]")
    try:
        CHECKS[sys.argv[1]](load(sys.argv[2]), *sys.argv[3:])
    except Failed as e:
        print(f"  {e}", file=sys.stderr)
        sys.exit(1)
