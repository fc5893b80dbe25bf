#!/usr/bin/env bash
# Tests for the Soma Helm chart, offline: helm lint, helm template in both RBAC modes,
# assertions on the rendered objects (charts/tests/rendered.py), schema rejections of
# bad values (charts/tests/values/bad-*.yaml), kubernetes-validate on every
# rendered manifest, the generated dashboards and Argo CD snippet, and the alert rules
# (promtool check rules, promtool test rules). Installs its tools with
# scripts/test-deps/k8s-tools.sh and platform-tools.sh.
#
# Usage: charts/test.sh            Prints one line per check and "N passed, M failed" last;
#                                  exits non-zero when any check failed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
chart=$here/soma
values=$here/tests/values
cache=${SOMA_CACHE:-$HOME/.cache/soma}
# Kubernetes version the manifests are validated against (kubernetes-validate ships its schemas).
k8s_version=${SOMA_K8S_VALIDATE_VERSION:-1.30.0}
release_ns=soma-system

platform=$(bash "$repo/scripts/test-deps/platform-tools.sh") || {
    echo "cannot install promtool (scripts/test-deps/platform-tools.sh)" >&2
    echo "0 passed, 1 failed"
    exit 1
}
SOMA_PROMTOOL=$(sed -n 's/^SOMA_PROMTOOL=//p' <<<"$platform")
bash "$repo/scripts/test-deps/k8s-tools.sh" >/dev/null || {
    echo "cannot install helm/kubectl/kubernetes-validate (scripts/test-deps/k8s-tools.sh)" >&2
    echo "0 passed, 1 failed"
    exit 1
}
export PATH=$cache/tools/bin:$cache/venv/bin:$PATH
py=$cache/venv/bin/python
rendered=$here/tests/rendered.py

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

passed=0
failed=0
# check NAME CMD...: runs CMD, counts it, and shows its output only on failure.
check() {
    local name=$1
    shift
    if "$@" >"$out/last.log" 2>&1; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
        sed 's/^/     /' "$out/last.log"
    fi
}

# equals NAME WANT CMD...: CMD's stdout must be exactly WANT.
equals() {
    local name=$1 want=$2 got
    shift 2
    got=$("$@" 2>&1)
    check "$name" test "$got" = "$want" || true
    [[ $got == "$want" ]] || echo "     got '$got', want '$want'"
}

render() { # render OUTFILE [helm args...]
    local file=$1
    shift
    helm template soma "$chart" --namespace "$release_ns" "$@" >"$file"
}

validate() { # kubernetes-validate in strict mode; kinds it has no schema for (CRD-typed) only warn
    kubernetes-validate --strict --quiet -k "$k8s_version" "$@"
}

rejects() { # rejects VALUES_FILE: helm must fail and print the error named on its "# expect:" line
    local file=$1 want
    want=$(sed -n '1s/^# expect: //p' "$file")
    if helm template soma "$chart" --namespace "$release_ns" -f "$file" >"$out/reject.out" 2>&1; then
        echo "accepted bad values $file"
        return 1
    fi
    grep -qF -- "$want" "$out/reject.out" || {
        echo "rejected, but without '$want':"
        cat "$out/reject.out"
        return 1
    }
}

# The in-chart PostgreSQL's passwords are random at every render (kept from the live Secret only
# on a real install or upgrade): blank them before comparing two renders.
unrandom() { sed -E 's/^( +(password|admin-password|database-url): ).*/\1"<generated>"/' "$@"; }

same_render() { # same_render FILE [helm args...]: helm template with these args renders FILE
    local file=$1
    shift
    helm template soma "$chart" --namespace "$release_ns" "$@" | unrandom | cmp - <(unrandom "$file")
}

crds_in_sync() { # the chart's crds/ are crdgen's copy of the repo's crds/
    local f n=0
    for f in "$repo"/crds/*.yaml; do
        [[ -e $f ]] || continue
        n=$((n + 1))
        cmp "$f" "$chart/crds/$(basename "$f")" || return 1
    done
    for f in "$chart"/crds/*.yaml; do
        [[ -e $f ]] || continue
        [[ -e $repo/crds/$(basename "$f") ]] || { echo "$f has no counterpart in crds/"; return 1; }
    done
    echo "$n CRD files compared"
}

echo "helm $(helm version --short), kubernetes-validate against Kubernetes $k8s_version"

# --- lint ------------------------------------------------------------------
check "helm lint (cluster-wide)" helm lint --strict "$chart"
check "helm lint (namespaced)" helm lint --strict "$chart" -f "$values/namespaced.yaml"
check "helm lint (everything on)" helm lint --strict "$chart" -f "$values/everything.yaml"

# --- cluster-wide mode (defaults) -------------------------------------------
check "render cluster-wide" render "$out/cluster.yaml"
check "cluster-wide: ClusterRole + ClusterRoleBinding with least-privilege rules, lease Role" \
    "$py" "$rendered" cluster-mode "$out/cluster.yaml" "$release_ns"
equals "cluster-wide: two ClusterRoles (operator, webhook)" 2 "$py" "$rendered" count "$out/cluster.yaml" ClusterRole
equals "cluster-wide: two ClusterRoleBindings" 2 "$py" "$rendered" count "$out/cluster.yaml" ClusterRoleBinding
check "cluster-wide: webhook Service, flags, Role for its Secret, ClusterRole for its configuration" \
    "$py" "$rendered" webhook "$out/cluster.yaml" "$release_ns"
equals "default webhook port" 9443 "$py" "$rendered" arg "$out/cluster.yaml" --webhook-port
equals "default policy deadline" 1500 "$py" "$rendered" arg "$out/cluster.yaml" --policy-deadline
equals "fail closed by default" 0 bash -c "grep -c -- '--policy-fail-open' '$out/cluster.yaml'"
check "cluster-wide: operator pod hardened, probes, downward API, flags" \
    "$py" "$rendered" hardened "$out/cluster.yaml"
# The chart's defaults name Soma's images by the digests scripts/release --update-chart wrote.
default_digest() { "$py" -c 'import sys, yaml; v = yaml.safe_load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v = v[k]
print(v["digest"])' "$chart/values.yaml" "$1"; }
equals "default image is ghcr.io/soma-dev/soma-operator by digest" \
    "ghcr.io/soma-dev/soma-operator@$(default_digest image)" "$py" "$rendered" image "$out/cluster.yaml"
equals "default replicas 2" 2 "$py" "$rendered" replicas "$out/cluster.yaml"
equals "default sidecar image by digest" "ghcr.io/soma-dev/soma-proxy@$(default_digest sidecar.image)" \
    "$py" "$rendered" arg "$out/cluster.yaml" --sidecar-image
check "default digests are set (sha256) for the operator, the sidecar and soma" "$py" -c 'import re, sys, yaml
v = yaml.safe_load(open(sys.argv[1]))
ds = [v["image"]["digest"], v["sidecar"]["image"]["digest"], v["cliImage"]["digest"]]
print(ds)
sys.exit(0 if all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in ds) else 1)' "$chart/values.yaml"
equals "default sidecar port" 4000 "$py" "$rendered" arg "$out/cluster.yaml" --sidecar-port
equals "default metrics address" 0.0.0.0:8080 "$py" "$rendered" arg "$out/cluster.yaml" --metrics-addr
equals "lease in the release namespace" "$release_ns" "$py" "$rendered" arg "$out/cluster.yaml" --lease-namespace
equals "lease name" soma-operator "$py" "$rendered" arg "$out/cluster.yaml" --lease-name
equals "PodDisruptionBudget with 2 replicas" 1 "$py" "$rendered" count "$out/cluster.yaml" PodDisruptionBudget
equals "no ServiceMonitor by default" 0 "$py" "$rendered" count "$out/cluster.yaml" ServiceMonitor
check "default: in-chart PostgreSQL (Secret, Service, StatefulSet), SOMA_LEDGER_URL from its Secret, release namespace in egress" \
    "$py" "$rendered" ledger "$out/cluster.yaml" "$release_ns"
check "default: PostgreSQL superuser is postgres; the init script creates the NOSUPERUSER role soma owning soma; database-url names it" \
    "$py" "$rendered" ledger-roles "$out/cluster.yaml" soma soma
equals "default: SOMA_LEDGER_URL from soma-ledger/database-url" soma-ledger/database-url \
    "$py" "$rendered" ledger-url "$out/cluster.yaml"
equals "default: sidecar egress to the release namespace" "$release_ns" \
    "$py" "$rendered" arg "$out/cluster.yaml" --sidecar-egress-namespaces
equals "default PostgreSQL image" docker.io/library/postgres:15-alpine \
    "$py" "$rendered" postgres-image "$out/cluster.yaml"
equals "default PostgreSQL claim: default StorageClass, 10Gi" "- 10Gi" "$py" "$rendered" claim "$out/cluster.yaml"
equals "default seal key Secret" soma-ledger-seal-key \
    "$py" "$rendered" arg "$out/cluster.yaml" --ledger-seal-key-secret
equals "default Budget refresh" 5 "$py" "$rendered" arg "$out/cluster.yaml" --budget-refresh-seconds
equals "default CLI image for DR drills" "ghcr.io/soma-dev/soma:0.1.0" \
    "$py" "$rendered" arg "$out/cluster.yaml" --cli-image
equals "default task Jobs per namespace" 10 "$py" "$rendered" arg "$out/cluster.yaml" --job-concurrency
check "kubernetes-validate cluster-wide" validate "$out/cluster.yaml"

# --- namespaced mode ---------------------------------------------------------
check "render namespaced (team-a, team-b)" render "$out/namespaced.yaml" -f "$values/namespaced.yaml"
check "namespaced: a Role + RoleBinding per namespace, nothing cluster-scoped, --namespaces" \
    "$py" "$rendered" namespaced-mode "$out/namespaced.yaml" "$release_ns" team-a,team-b
equals "namespaced: only the webhook's ClusterRole" 1 "$py" "$rendered" count "$out/namespaced.yaml" ClusterRole
equals "namespaced: only the webhook's ClusterRoleBinding" 1 "$py" "$rendered" count "$out/namespaced.yaml" ClusterRoleBinding
check "namespaced: webhook RBAC limited to its Secret and configuration" \
    "$py" "$rendered" webhook "$out/namespaced.yaml" "$release_ns"
check "render namespaced without the webhook" render "$out/namespaced-nowebhook.yaml" \
    -f "$values/namespaced.yaml" --set webhook.enabled=false
equals "namespaced without the webhook: zero ClusterRoles" 0 \
    "$py" "$rendered" count "$out/namespaced-nowebhook.yaml" ClusterRole
equals "without the webhook: --webhook-port=0" 0 \
    "$py" "$rendered" arg "$out/namespaced-nowebhook.yaml" --webhook-port
check "namespaced: operator pod hardened" "$py" "$rendered" hardened "$out/namespaced.yaml"
check "namespaced: in-chart PostgreSQL in the release namespace, open to the sidecars" \
    "$py" "$rendered" ledger "$out/namespaced.yaml" "$release_ns"
check "kubernetes-validate namespaced" validate "$out/namespaced.yaml"
check "namespaced via --set-json works the same" \
    same_render "$out/namespaced.yaml" --set-json 'watchNamespaces=["team-a","team-b"]'

# --- options -------------------------------------------------------------------
check "render everything on" render "$out/everything.yaml" -f "$values/everything.yaml"
equals "digest wins over tag" \
    "ghcr.io/soma-dev/soma-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" \
    "$py" "$rendered" image "$out/everything.yaml"
equals "sidecar digest wins over tag" \
    "ghcr.io/soma-dev/soma-proxy@sha256:2222222222222222222222222222222222222222222222222222222222222222" \
    "$py" "$rendered" arg "$out/everything.yaml" --sidecar-image
equals "sidecar tag override" "ghcr.io/soma-dev/soma-proxy:0.1.0-rc1" bash -c \
    "helm template soma '$chart' -n $release_ns --set sidecar.image.tag=0.1.0-rc1 --set sidecar.image.digest= >'$out/tag.yaml' && '$py' '$rendered' arg '$out/tag.yaml' --sidecar-image"
equals "metrics port follows values.metrics.port" 0.0.0.0:9090 \
    "$py" "$rendered" arg "$out/everything.yaml" --metrics-addr
equals "ServiceMonitor when enabled" 1 "$py" "$rendered" count "$out/everything.yaml" ServiceMonitor
check "everything on: operator pod hardened" "$py" "$rendered" hardened "$out/everything.yaml"
check "kubernetes-validate everything on (ServiceMonitor may only warn)" validate "$out/everything.yaml"
equals "cert-manager Certificate when enabled" 1 "$py" "$rendered" count "$out/everything.yaml" Certificate
equals "cert-manager mode flag" --webhook-cert-manager \
    "$py" "$rendered" arg "$out/everything.yaml" --webhook-cert-manager
equals "fail-open switch" --policy-fail-open "$py" "$rendered" arg "$out/everything.yaml" --policy-fail-open
check "OTEL_EXPORTER_OTLP_ENDPOINT rendered" grep -q 'name: OTEL_EXPORTER_OTLP_ENDPOINT' "$out/everything.yaml"
equals "sidecar OTLP endpoint flag" http://otel-collector.observability:4317 \
    "$py" "$rendered" arg "$out/everything.yaml" --sidecar-otlp-endpoint
equals "sidecar OTLP protocol flag" grpc "$py" "$rendered" arg "$out/everything.yaml" --sidecar-otlp-protocol
check "everything on: in-chart PostgreSQL with the custom user and database" \
    "$py" "$rendered" ledger "$out/everything.yaml" "$release_ns"
check "everything on: the init script creates the NOSUPERUSER role soma_operator owning soma_ledger; database-url names it" \
    "$py" "$rendered" ledger-roles "$out/everything.yaml" soma_operator soma_ledger
equals "egress namespaces merged with the release namespace, no duplicates" "soma-system,observability" \
    "$py" "$rendered" arg "$out/everything.yaml" --sidecar-egress-namespaces
equals "PostgreSQL digest wins over tag" \
    "registry.example.com/mirror/postgres@sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789" \
    "$py" "$rendered" postgres-image "$out/everything.yaml"
equals "PostgreSQL claim: storageClassName and storage" "fast-ssd 50Gi" \
    "$py" "$rendered" claim "$out/everything.yaml"
equals "seal key Secret override" soma-seals "$py" "$rendered" arg "$out/everything.yaml" --ledger-seal-key-secret
equals "Budget refresh override" 30 "$py" "$rendered" arg "$out/everything.yaml" --budget-refresh-seconds
equals "CLI image digest wins over tag" \
    "registry.example.com/mirror/soma@sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210" \
    "$py" "$rendered" arg "$out/everything.yaml" --cli-image
equals "task Jobs per namespace override" 4 "$py" "$rendered" arg "$out/everything.yaml" --job-concurrency
check "everything on: RBAC with the ledger (seal key Role names soma-seals)" \
    "$py" "$rendered" cluster-mode "$out/everything.yaml" "$release_ns"
check "everything on: Vault defaults passed, CA bundle in settings, system:auth-delegator bound to vault/vault" \
    "$py" "$rendered" vault-tokenreview "$out/everything.yaml" vault vault

check "render ledger.existingSecret" render "$out/ledger-existing.yaml" -f "$values/ledger-existing.yaml"
check "existingSecret: no PostgreSQL rendered" "$py" "$rendered" no-postgres "$out/ledger-existing.yaml"
equals "existingSecret: SOMA_LEDGER_URL from my-ledger/database-url" my-ledger/database-url \
    "$py" "$rendered" ledger-url "$out/ledger-existing.yaml"
equals "existingSecret: egress namespaces only as listed" databases \
    "$py" "$rendered" arg "$out/ledger-existing.yaml" --sidecar-egress-namespaces
check "existingSecret: RBAC with the ledger" "$py" "$rendered" cluster-mode "$out/ledger-existing.yaml" "$release_ns"
check "existingSecret: operator pod hardened, no URL in args" "$py" "$rendered" hardened "$out/ledger-existing.yaml"
check "kubernetes-validate existingSecret" validate "$out/ledger-existing.yaml"

check "render ledger.enabled=false" render "$out/ledger-off.yaml" -f "$values/ledger-off.yaml"
check "no ledger: no PostgreSQL rendered" "$py" "$rendered" no-postgres "$out/ledger-off.yaml"
equals "no ledger: no SOMA_LEDGER_URL" none "$py" "$rendered" ledger-url "$out/ledger-off.yaml"
equals "no ledger: no ledger flags, no egress flag" 0 \
    bash -c "grep -cE -- '--(ledger-seal-key-secret|budget-refresh-seconds|sidecar-egress-namespaces)' '$out/ledger-off.yaml'"
check "no ledger: Secrets only read (a drill's) and deleted, never written; no seal key Role" \
    "$py" "$rendered" cluster-mode "$out/ledger-off.yaml" "$release_ns"
check "no ledger, namespaced: the same in each Role" bash -c \
    "helm template soma '$chart' -n $release_ns -f '$values/ledger-off.yaml' -f '$values/namespaced.yaml' >'$out/ledger-off-ns.yaml' \
        && '$py' '$rendered' namespaced-mode '$out/ledger-off-ns.yaml' $release_ns team-a,team-b"
check "kubernetes-validate no ledger" validate "$out/ledger-off.yaml"

check "render single replica without leader election" render "$out/single.yaml" -f "$values/single.yaml"
equals "single: --no-leader-election" --no-leader-election \
    "$py" "$rendered" arg "$out/single.yaml" --no-leader-election
equals "single: no Lease Role" 0 \
    bash -c "grep -c 'coordination.k8s.io' '$out/single.yaml'"
equals "single: no PodDisruptionBudget" 0 "$py" "$rendered" count "$out/single.yaml" PodDisruptionBudget
check "kubernetes-validate single" validate "$out/single.yaml"

# --- the platform team's observability (docs/observability.md) ----------------------
check "dashboards and the Argo CD snippet are what charts/generate.py writes" "$py" "$here/generate.py" --check
check "render observability on" render "$out/observability.yaml" -f "$values/observability.yaml"
check "observability: PodMonitor (job soma-proxy, agent label, every namespace), ServiceMonitor job soma-operator, PrometheusRule = rules file, 4 dashboards, NetworkPolicy" \
    "$py" "$rendered" observability "$out/observability.yaml" "$chart" any
equals "observability: sidecar metrics port opened to the scrape namespaces" monitoring \
    "$py" "$rendered" arg "$out/observability.yaml" --sidecar-metrics-namespaces
equals "observability: scrape annotations flag" --sidecar-scrape-annotations \
    "$py" "$rendered" arg "$out/observability.yaml" --sidecar-scrape-annotations
equals "default: no monitors, rules, dashboards or NetworkPolicy" 0 bash -c \
    "grep -cE '^kind: (PodMonitor|PrometheusRule|NetworkPolicy)$|grafana_dashboard' '$out/cluster.yaml'"
equals "default: sidecar metrics open to any pod, no scrape annotations" 0 bash -c \
    "grep -cE -- '--sidecar-(metrics-namespaces|scrape-annotations)' '$out/cluster.yaml'"
check "kubernetes-validate observability (monitoring.coreos.com kinds may only warn)" validate "$out/observability.yaml"
check "observability, namespaced: the PodMonitor selects the watched namespaces" bash -c \
    "helm template soma '$chart' -n $release_ns -f '$values/observability.yaml' -f '$values/namespaced.yaml' >'$out/obs-ns.yaml' \
        && '$py' '$rendered' observability '$out/obs-ns.yaml' '$chart' team-a,team-b"
check "promtool check rules: the chart's rules file" "$SOMA_PROMTOOL" check rules "$chart/rules/soma.rules.yaml"
check "promtool test rules: a unit test per alert" bash -c "cd '$here/tests/rules' && '$SOMA_PROMTOOL' test rules soma.rules.test.yaml"
check "every alert has a firing unit test and a runbook section" "$py" "$rendered" alerts "$chart/rules/soma.rules.yaml" \
    "$here/tests/rules/soma.rules.test.yaml" "$repo/docs/observability.md"
check "render a signed release (imageSignatures.required with the release key)" render "$out/signed.yaml" -f "$values/signed-release.yaml"
check "signed release: verify-images init container checks the three images by digest with the release key" \
    "$py" "$rendered" verify-images "$out/signed.yaml"
check "kubernetes-validate signed release" validate "$out/signed.yaml"
equals "default: no verify-images init container" 0 bash -c "grep -c 'verify-images' '$out/cluster.yaml'"

# --- bad values are rejected with a clear error --------------------------------
for bad in "$values"/bad-*.yaml; do
    check "rejects $(basename "$bad" .yaml): $(sed -n '1s/^# expect: //p' "$bad")" rejects "$bad"
done

# --- CRDs (generated by crdgen into crds/ and charts/soma/crds/) ---------------
if compgen -G "$chart/crds/*.yaml" >/dev/null; then
    check "chart crds/ identical to the repo's crds/" crds_in_sync
    check "kubernetes-validate chart CRDs" validate "$chart"/crds/*.yaml
    check "helm template --include-crds renders them" \
        bash -c "helm template soma '$chart' --include-crds | grep -q 'kind: CustomResourceDefinition'"
else
    echo "skip CRD checks: charts/soma/crds/ has no YAML yet (crdgen writes it)"
fi

echo
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
