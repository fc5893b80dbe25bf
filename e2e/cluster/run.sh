#!/usr/bin/env bash
# End-to-end suite for a REAL Kubernetes cluster (kind, or any cluster you may write to).
#
# Without a reachable cluster (KUBECONFIG unset, or `kubectl cluster-info` failing) it says
# so and exits 77 ("skipped", as automake's test drivers count it; scripts/test reports it as
# skipped, never as passed): CI machines have no cluster, and a default ~/.kube/config is
# deliberately ignored so that this suite never reaches a cluster nobody pointed it at.
#
# With one, in a temporary namespace soma-e2e-<random>:
#   1. applies crds/ (unless --installed) and waits until they are Established;
#   2. runs the operator: the locally built `soma-operator run --namespaces <ns>` in the
#      background, or (--installed) the one a `helm install` already runs;
#   3. applies examples/*.yaml (their metadata.namespace rewritten to the suite's); for every Agent waits for its Deployment, Service,
#      NetworkPolicy, ServiceAccount and ConfigMap <agent>-sidecar, checks the pod sandbox
#      (non-root, read-only root fs, RuntimeDefault seccomp, drop ALL, no privilege
#      escalation, no service-account token), default-deny egress, owner references, and
#      status.observedGeneration == metadata.generation (an Agent that uses Capsules must
#      instead report Ready=False, reason CapsuleNotReady, until Cosign verification lands);
#      The suite also applies its own minimal Agent e2e-agent + Budget e2e-budget
#      (fixtures/e2e-agent.yaml), so the baseline does not depend on what examples/ holds;
#   4. the example Jobs do what their comments say here: summarise-incident-4711 waits for its
#      Agent's Capsule (Pending, CapsuleNotReady, no batch/v1 Job); ledger-dr-drill either says
#      why it cannot start (no NATS, ledger or scratch Secret) or runs and reports its figures;
#      the suite's own Job e2e-job (fixtures/e2e-job.yaml) on e2e-agent becomes a batch/v1 Job
#      controlled by it, with a sandboxed pod and a default-deny NetworkPolicy, and fails at its
#      deadline (DeadlineExceeded); `kubectl get sjob` shows their phases;
#   5. an Agent whose Budget does not exist, and e2e-agent once its Budget is deleted,
#      must report Ready=False with reason BudgetNotFound;
#   6. with SOMA_E2E_VAULT=1, the Vault scenario (fixtures/e2e-vault.yaml): an OpenBao dev
#      server in the namespace whose Kubernetes auth reviews the sidecars' projected tokens with
#      the cluster's real TokenReview API; an Agent whose ServiceAccount its role is bound to
#      gets Ready pods (its sidecar read the key) with the token mounted into the sidecar alone,
#      and one asking for the role from another ServiceAccount is refused (VaultLoginFailed);
#      with --installed, the Agents' CredentialsUnavailable conditions say the same. Without
#      SOMA_E2E_VAULT=1 it is counted as skipped;
#   7. with SOMA_E2E_QDRANT=1 and --installed, the Qdrant scenario (fixtures/e2e-qdrant*.yaml):
#      a Qdrant server and a plain-HTTP registry in namespace soma-e2e-qdrant; a bundle packed
#      with embeddings by the local `soma` CLI, pushed and signed with a fresh cosign key; a
#      Capsule with spec.index: qdrant and an Agent holding it. The operator must load the
#      collection soma_<namespace>_sha256_<hex> (status.qdrant, QdrantLoaded=True, the points
#      counted by Qdrant itself), the sidecar must answer recall from it (a query vector equal
#      to one chunk's finds that chunk first, with its provenance), and after spec.revoked
#      recall must answer 410 capsule_revoked. Without SOMA_E2E_QDRANT=1, or without
#      --installed (a local operator outside the cluster cannot reach the in-cluster registry and
#      Qdrant under the addresses the pods use), it is counted as skipped;
#   8. deletes the namespace (and the scenarios' ClusterRoleBinding and soma-e2e-qdrant) and
#      stops the operator.
#
# Usage: e2e/cluster/run.sh [--installed] [--namespace NAME] [--keep]
#   --installed       use the operator already installed with helm (cluster-wide mode, or a
#                     namespaced install that watches --namespace)
#   --namespace NAME  use this namespace instead of a temporary one (it is not deleted;
#                     only what the suite applied is)
#   --keep            leave the namespace and its objects for inspection
# Environment:
#   SOMA_OPERATOR_BIN       operator binary (default: target/{release,debug}/soma-operator,
#                           built with cargo when missing)
#   SOMA_E2E_SIDECAR_IMAGE  --sidecar-image for the local operator
#                           (default ghcr.io/soma-dev/soma-proxy:0.1.0)
#   SOMA_E2E_TIMEOUT        seconds to wait for each expectation (default 120)
#   SOMA_E2E_VAULT=1        run the Vault scenario: the cluster must be able to pull and run the
#                           sidecar image (SOMA_E2E_SIDECAR_IMAGE, or the chart's with --installed)
#                           and SOMA_E2E_OPENBAO_IMAGE (default docker.io/openbao/openbao:2.5.4),
#                           and you must be allowed to bind system:auth-delegator
#   SOMA_E2E_QDRANT=1       run the Qdrant scenario (needs --installed): the operator installed with
#                           --set capsules.qdrantUrl=http://e2e-qdrant.soma-e2e-qdrant:6334
#                           --set signatures.insecureRegistries={e2e-registry.soma-e2e-qdrant:5000};
#                           the cluster must pull SOMA_E2E_QDRANT_IMAGE (default
#                           docker.io/qdrant/qdrant:v1.15.0), SOMA_E2E_REGISTRY_IMAGE (default
#                           docker.io/library/registry:2) and the chart's sidecar and CLI images;
#                           locally: cosign on PATH (scripts/test-deps/signing-tools.sh) and the
#                           `soma` CLI (SOMA_CLI_BIN, else target/{release,debug}/soma)
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
checks=$here/checks.py
cache=${SOMA_CACHE:-$HOME/.cache/soma}
timeout=${SOMA_E2E_TIMEOUT:-120}
installed=false
keep=false
ns=""

while [[ $# -gt 0 ]]; do
    case $1 in
        --installed) installed=true ;;
        --keep) keep=true ;;
        --namespace) ns=${2:?--namespace needs a name}; shift ;;
        -h | --help) sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Prefer the kubectl that scripts/test-deps/k8s-tools.sh installs (new enough for
# `kubectl wait --for=create`), else whatever is on PATH.
if [[ -x $cache/tools/bin/kubectl ]]; then
    export PATH=$cache/tools/bin:$PATH
fi

skip() {
    echo "no Kubernetes cluster reachable (KUBECONFIG unset or cluster down): skipping the real-cluster e2e suite"
    [[ -n ${1:-} ]] && echo "  ($1)"
    exit 77
}
[[ -n ${KUBECONFIG:-} ]] || skip
command -v kubectl >/dev/null 2>&1 || skip "kubectl not found: run scripts/test-deps/k8s-tools.sh"
kubectl cluster-info --request-timeout=10s >/dev/null 2>&1 || skip "kubectl cluster-info failed"
command -v python3 >/dev/null 2>&1 || { echo "python3 is required" >&2; exit 1; }

echo "cluster: $(kubectl config current-context 2>/dev/null) ($(kubectl version -o json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])' 2>/dev/null || echo '?'))"

work=$(mktemp -d)
own_namespace=false
if [[ -z $ns ]]; then
    ns=soma-e2e-$(head -c 64 /dev/urandom | tr -dc 'a-z0-9' | head -c 6)
    own_namespace=true
fi
operator_pid=""
proxy_pid=""
proxy_port=""
forward_pids=()
qdrant_applied=false

passed=0
failed=0
skipped=0
check() { # check NAME CMD...: run CMD, count it, show its output only when it fails
    local name=$1
    shift
    if "$@" >"$work/last.log" 2>&1; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
        sed 's/^/     /' "$work/last.log"
    fi
}

cleanup() {
    local rc=$?
    if [[ -n $operator_pid ]]; then
        kill "$operator_pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$operator_pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$operator_pid" 2>/dev/null
        if [[ $failed -gt 0 ]]; then
            echo "--- last 40 lines of the operator's log ($work/operator.log) ---"
            tail -n 40 "$work/operator.log"
        fi
    fi
    if $keep; then
        echo "kept namespace $ns (--keep)"
    elif $own_namespace; then
        kubectl delete namespace "$ns" --wait=true --timeout="${timeout}s" >/dev/null 2>&1 ||
            echo "warning: namespace $ns not deleted within ${timeout}s"
    else
        local f
        for f in "$repo"/examples/*.yaml "$here/fixtures/e2e-agent.yaml"; do
            sed -E "s/^(  namespace:).*/\1 $ns/" "$f" |
                kubectl delete -n "$ns" -f - --ignore-not-found --wait=false >/dev/null 2>&1
        done
        kubectl delete -n "$ns" agents.soma.dev e2e-no-budget --ignore-not-found --wait=false >/dev/null 2>&1
        kubectl delete -n "$ns" jobs.soma.dev e2e-job --ignore-not-found --wait=false >/dev/null 2>&1
    fi
    if [[ -n $proxy_pid ]]; then
        kill "$proxy_pid" 2>/dev/null
    fi
    local pid
    for pid in "${forward_pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
    if $qdrant_applied && ! $keep; then
        kubectl delete namespace soma-e2e-qdrant --wait=false >/dev/null 2>&1
    fi
    kubectl delete clusterrolebinding "soma-e2e-openbao-$ns" --ignore-not-found >/dev/null 2>&1
    [[ $failed -gt 0 ]] || rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- expectations --------------------------------------------------------------------

# exists_by_label KIND AGENT: some KIND labelled soma.dev/agent=AGENT appears within the timeout.
exists_by_label() {
    local kind=$1 agent=$2 deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        [[ -n $(kubectl get -n "$ns" "$kind" -l "soma.dev/agent=$agent" -o name 2>/dev/null) ]] && return 0
        sleep 2
    done
    echo "no $kind labelled soma.dev/agent=$agent after ${timeout}s"
    kubectl get -n "$ns" "$kind" --show-labels
    return 1
}

exists_by_name() { # exists_by_name KIND NAME
    kubectl wait -n "$ns" --for=create "$1/$2" --timeout="${timeout}s"
}

# children_owned AGENT: each child's controller ownerReference is the Agent.
children_owned() {
    local agent=$1 uid
    uid=$(kubectl get -n "$ns" agents.soma.dev "$agent" -o jsonpath='{.metadata.uid}') || return 1
    kubectl get -n "$ns" deployments,services,networkpolicies,serviceaccounts,configmaps \
        -l "soma.dev/agent=$agent" -o json | "$checks" controlled-by "$uid"
}

# sandboxed AGENT: the Deployment's pod template follows invariant 6 (PRODUCT.md).
sandboxed() {
    local agent=$1
    kubectl get -n "$ns" deployments -l "soma.dev/agent=$agent" -o json | "$checks" sandboxed
}

# egress_restricted AGENT: the NetworkPolicy selects the agent pods and restricts egress.
egress_restricted() {
    local agent=$1
    kubectl get -n "$ns" networkpolicies -l "soma.dev/agent=$agent" -o json | "$checks" egress-restricted
}

observed_generation_current() { # AGENT
    local gen
    gen=$(kubectl get -n "$ns" agents.soma.dev "$1" -o jsonpath='{.metadata.generation}') || return 1
    kubectl wait -n "$ns" "agents.soma.dev/$1" --timeout="${timeout}s" \
        --for=jsonpath='{.status.observedGeneration}'="$gen"
}

condition_is() { # AGENT TYPE STATUS REASON: the Agent's condition TYPE within the timeout
    if kubectl wait -n "$ns" "agents.soma.dev/$1" --timeout="${timeout}s" \
        --for=jsonpath="{.status.conditions[?(@.type==\"$2\")].status}=$3" &&
        kubectl wait -n "$ns" "agents.soma.dev/$1" --timeout="${timeout}s" \
            --for=jsonpath="{.status.conditions[?(@.type==\"$2\")].reason}=$4"; then
        return 0
    fi
    kubectl get -n "$ns" "agents.soma.dev/$1" -o jsonpath='{.status.conditions}'
    echo
    return 1
}

ready_false_because() { # AGENT REASON
    condition_is "$1" Ready False "$2"
}

# sjob_check NAME CHECK [ARG...]: the Job NAME satisfies checks.py CHECK within the timeout.
sjob_check() {
    local name=$1 deadline=$((SECONDS + timeout))
    shift
    while ((SECONDS < deadline)); do
        kubectl get -n "$ns" "jobs.soma.dev/$name" -o json 2>/dev/null | "$checks" "$@" >/dev/null 2>&1 && return 0
        sleep 2
    done
    kubectl get -n "$ns" "jobs.soma.dev/$name" -o json | "$checks" "$@"
}

# no_batch_job NAME: the Job NAME has not been started (no batch/v1 Job of that name).
no_batch_job() {
    [[ -z $(kubectl get -n "$ns" "jobs.batch/$1" -o name --ignore-not-found) ]] || {
        echo "batch/v1 Job $1 exists"
        return 1
    }
}

# job_children NAME: the batch/v1 Job, NetworkPolicy and ConfigMap of Job NAME are controlled by it.
job_children() {
    local uid
    uid=$(kubectl get -n "$ns" "jobs.soma.dev/$1" -o jsonpath='{.metadata.uid}') || return 1
    kubectl get -n "$ns" "jobs.batch/$1" "networkpolicies/sjob-$1" "configmaps/sjob-$1-sidecar" -o json |
        "$checks" controlled-by "$uid" Job
}

# agent_without_budget SOURCE_AGENT NAME: apply a copy of SOURCE_AGENT pointing at a Budget
# that does not exist.
agent_without_budget() {
    kubectl get -n "$ns" agents.soma.dev "$1" -o json | "$checks" without-budget "$2" | kubectl apply -f -
}

# apply_in_namespace FILE: apply FILE with its top-level metadata.namespace set to the suite's.
apply_in_namespace() {
    sed -E "s/^(  namespace:).*/\1 $ns/" "$1" | kubectl apply -n "$ns" -f -
}

# readyz_is AGENT [REASON]: the sidecar of AGENT's pod answers /readyz (read through the API
# server's pod proxy, so it works wherever kubectl does) ready, or not ready for REASON.
readyz_is() {
    local agent=$1 reason=${2:-} deadline=$((SECONDS + timeout)) pod port body=""
    while ((SECONDS < deadline)); do
        pod=$(kubectl get -n "$ns" pods -l "soma.dev/agent=$agent" -o jsonpath='{.items[0].metadata.name}' 2>/dev/null)
        port=$(kubectl get -n "$ns" pods -l "soma.dev/agent=$agent" \
            -o jsonpath='{.items[0].spec.initContainers[?(@.name=="soma-proxy")].ports[0].containerPort}' 2>/dev/null)
        if [[ -n $pod && -n $port ]]; then
            body=$(python3 - "http://127.0.0.1:$proxy_port/api/v1/namespaces/$ns/pods/$pod:$port/proxy/readyz" <<'PY'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except urllib.error.HTTPError as e:
    print(e.read().decode())
except Exception as e:  # not up yet
    print("{}")
PY
)
            "$checks" readyz $reason <<<"$body" >/dev/null 2>&1 && return 0
        fi
        sleep 2
    done
    echo "pod ${pod:-?} of $agent: /readyz said ${body:-nothing}"
    [[ -n $body ]] || body='{}'
    "$checks" readyz $reason <<<"$body"
}

# openbao_configured: Kubernetes auth reviewing tokens with the cluster's TokenReview (OpenBao's
# own ServiceAccount token, bound to system:auth-delegator), a role for ServiceAccount
# e2e-vault-agent of the namespace (audience vault), and the secret.
openbao_configured() {
    kubectl exec -n "$ns" e2e-openbao -- sh -c "
        set -e
        export BAO_ADDR=http://127.0.0.1:8200 BAO_TOKEN=root
        bao auth enable kubernetes
        bao write auth/kubernetes/config kubernetes_host=https://\$KUBERNETES_SERVICE_HOST:\$KUBERNETES_SERVICE_PORT
        echo 'path \"secret/data/e2e/*\" { capabilities = [\"read\"] }' | bao policy write e2e-read -
        bao write auth/kubernetes/role/e2e-vault-agent bound_service_account_names=e2e-vault-agent \
            bound_service_account_namespaces=$ns audience=vault token_policies=e2e-read token_ttl=10m
        bao kv put secret/e2e/openai api-key=sk-e2e-not-a-real-key"
}

start_kubectl_proxy() {
    proxy_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    kubectl proxy --port="$proxy_port" >"$work/kubectl-proxy.log" 2>&1 &
    proxy_pid=$!
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "http://127.0.0.1:$proxy_port/version" 2>/dev/null && return 0
        sleep 1
    done
    echo "kubectl proxy did not answer"
    return 1
}

vault_scenario() {
    local fixture=$here/fixtures/e2e-vault.yaml
    local image=${SOMA_E2E_OPENBAO_IMAGE:-docker.io/openbao/openbao:2.5.4}
    check "vault: apply OpenBao ($image), its auth-delegator binding, and Agents e2e-vault-agent, e2e-vault-stranger" \
        bash -c "sed -e 's/SOMA_E2E_NAMESPACE/$ns/g' -e 's#SOMA_E2E_OPENBAO_IMAGE#$image#g' '$fixture' | kubectl apply -f -"
    check "vault: OpenBao ready" kubectl wait -n "$ns" --for=condition=Ready pod/e2e-openbao --timeout="${timeout}s"
    check "vault: Kubernetes auth, role and secret configured" openbao_configured
    check "vault: kubectl proxy for the sidecars' /readyz" start_kubectl_proxy
    check "vault: the projected token is mounted into the sidecar alone" \
        bash -c "kubectl wait -n '$ns' --for=create deployment/e2e-vault-agent --timeout='${timeout}s' >/dev/null &&
                 kubectl get -n '$ns' deployment/e2e-vault-agent -o json | '$checks' vault-login-sidecar-only"
    check "vault: e2e-vault-agent's sidecar logged in through the TokenReview and read its key (/readyz ready)" \
        readyz_is e2e-vault-agent
    check "vault: e2e-vault-agent's pod Ready" \
        kubectl wait -n "$ns" deployment/e2e-vault-agent --for=jsonpath='{.status.readyReplicas}'=1 --timeout="${timeout}s"
    check "vault: e2e-vault-stranger (another ServiceAccount) is refused: /readyz VaultLoginFailed" \
        readyz_is e2e-vault-stranger VaultLoginFailed
    if $installed; then
        check "vault: e2e-vault-agent CredentialsUnavailable=False (CredentialsAvailable)" \
            condition_is e2e-vault-agent CredentialsUnavailable False CredentialsAvailable
        check "vault: e2e-vault-stranger CredentialsUnavailable=True (VaultLoginFailed)" \
            condition_is e2e-vault-stranger CredentialsUnavailable True VaultLoginFailed
    else
        # The local operator runs outside the cluster: it cannot reach pod IPs to ask /readyz.
        echo "skip vault: CredentialsUnavailable conditions (the operator outside the cluster cannot reach pod IPs; run with --installed)"
        skipped=$((skipped + 1))
    fi
}

# --- the Qdrant scenario ------------------------------------------------------------

qdrant_ns=soma-e2e-qdrant
qdrant_url=http://e2e-qdrant.$qdrant_ns:6334
qdrant_registry=e2e-registry.$qdrant_ns:5000

# port_forward TARGET NAMESPACE REMOTE_PORT: `kubectl port-forward` to a free local port, set
# in $forward_port once the forward answers TCP (called in this shell, never in $(...), so
# cleanup knows every forward's pid); stop_forward ends the last one.
forward_port=""
port_forward() {
    local target=$1 namespace=$2 remote=$3 port pid deadline
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    kubectl port-forward -n "$namespace" "$target" "$port:$remote" >"$work/forward-$port.log" 2>&1 &
    pid=$!
    forward_pids+=("$pid")
    deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2).close()' \
            "$port" 2>/dev/null; then
            forward_port=$port
            return 0
        fi
        sleep 1
    done
    echo "kubectl port-forward $target $remote did not answer" >&2
    return 1
}

stop_forward() {
    [[ ${#forward_pids[@]} -gt 0 ]] || return 0
    kill "${forward_pids[-1]}" 2>/dev/null
    unset 'forward_pids[-1]'
}

# installed_for_qdrant: the installed operator was given the scenario's Qdrant and registry.
installed_for_qdrant() {
    local args
    args=$(kubectl get deployments -A -l app.kubernetes.io/name=soma,app.kubernetes.io/component=operator \
        -o jsonpath='{.items[0].spec.template.spec.containers[?(@.name=="operator")].args}') || return 1
    if [[ $args != *"--qdrant-url=$qdrant_url"* || $args != *"$qdrant_registry"* ]]; then
        echo "the installed operator's args lack --qdrant-url=$qdrant_url or the insecure registry $qdrant_registry:"
        echo "  helm upgrade ... --set capsules.qdrantUrl=$qdrant_url --set 'signatures.insecureRegistries={$qdrant_registry}'"
        echo "  (args: $args)"
        return 1
    fi
}

soma_cli() {
    local bin=${SOMA_CLI_BIN:-}
    if [[ -z $bin ]]; then
        for b in "$repo/target/release/soma" "$repo/target/debug/soma"; do
            [[ -x $b ]] && { bin=$b; break; }
        done
    fi
    [[ -n $bin ]] || { echo "no soma CLI: set SOMA_CLI_BIN or cargo build -p soma-cli" >&2; return 1; }
    "$bin" "$@"
}

# qdrant_bundle: packs three one-chunk documents with one-hot 4-dimension vectors (model
# e2e-onehot-4), pushes them through a port-forward to the scenario's registry and signs the
# digest with a fresh key; leaves the digest in $work/qdrant-digest and the key in $work.
qdrant_bundle() {
    local docs=$work/qdrant-docs port digest
    mkdir -p "$docs"
    printf 'Refunds are issued within five days.' >"$docs/refunds.md"
    printf 'Shipping is free above fifty euros.' >"$docs/shipping.md"
    printf 'Support answers within one hour.' >"$docs/support.md"
    cat >"$work/qdrant-embeddings.jsonl" <<'JSONL'
{"id":"refunds.md#0","vector":[1,0,0,0]}
{"id":"shipping.md#0","vector":[0,1,0,0]}
{"id":"support.md#0","vector":[0,0,1,0]}
JSONL
    soma_cli capsule pack "$docs" --out "$work/qdrant-layout" --version 1.0.0 \
        --policy-hash "$(cat "$work/qdrant-policy-hash")" \
        --embeddings "$work/qdrant-embeddings.jsonl" --embedding-model e2e-onehot-4 || return 1
    port_forward svc/e2e-registry "$qdrant_ns" 5000 || return 1
    port=$forward_port
    digest=$(soma_cli capsule push "$work/qdrant-layout" "127.0.0.1:$port/capsules/e2e-qdrant-kb:1.0.0" \
        --insecure-registry "127.0.0.1:$port") || return 1
    digest=${digest##*@}
    echo "$digest" >"$work/qdrant-digest"
    (cd "$work" && COSIGN_PASSWORD="" cosign generate-key-pair --output-key-prefix qdrant-cosign >/dev/null) || return 1
    COSIGN_PASSWORD="" cosign sign --key "$work/qdrant-cosign.key" --tlog-upload=false --allow-http-registry \
        --allow-insecure-registry --yes "127.0.0.1:$port/capsules/e2e-qdrant-kb@$digest"
}

qdrant_tenant_objects() {
    kubectl create configmap -n "$ns" e2e-qdrant-signers --from-file=cosign.pub="$work/qdrant-cosign.pub" || return 1
    kubectl create secret generic -n "$ns" e2e-qdrant-key --from-literal=api-key=sk-e2e-not-a-real-key || return 1
    sed -e "s/SOMA_E2E_NAMESPACE/$ns/g" -e "s/SOMA_E2E_DIGEST/$(cat "$work/qdrant-digest")/g" \
        -e "s/SOMA_E2E_POLICY_HASH/$(cat "$work/qdrant-policy-hash")/g" "$here/fixtures/e2e-qdrant.yaml" |
        kubectl apply -f -
}

# qdrant_points COLLECTION WANT: Qdrant itself counts WANT points in COLLECTION (its REST API,
# through a port-forward).
qdrant_points() {
    local rc
    port_forward svc/e2e-qdrant "$qdrant_ns" 6333 || return 1
    python3 - "http://127.0.0.1:$forward_port/collections/$1" "$2" <<'PY'
import json, sys, urllib.request
info = json.load(urllib.request.urlopen(sys.argv[1], timeout=10))["result"]
size = info["config"]["params"]["vectors"]["size"]
if info.get("points_count") != int(sys.argv[2]) or size != 4:
    sys.exit(f"points_count {info.get('points_count')}, vector size {size}: want {sys.argv[2]} and 4")
PY
    rc=$?
    stop_forward
    return "$rc"
}

# recall_as_agent BODY OUT: POST /v1/recall to the sidecar of e2e-qdrant-agent's pod (its
# 127.0.0.1:4000, through a port-forward into the pod) with the pod's own token; writes
# {"status", "body"} to OUT.
recall_as_agent() {
    local pod uid rc
    pod=$(kubectl get -n "$ns" pods -l soma.dev/agent=e2e-qdrant-agent -o jsonpath='{.items[0].metadata.name}') || return 1
    uid=$(kubectl get -n "$ns" "pod/$pod" -o jsonpath='{.metadata.uid}') || return 1
    port_forward "pod/$pod" "$ns" 4000 || return 1
    python3 - "http://127.0.0.1:$forward_port/v1/recall" "$uid" "$1" >"$2" <<'PY'
import json, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[3].encode(), method="POST",
                             headers={"authorization": f"Bearer {sys.argv[2]}", "content-type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(json.dumps({"status": r.status, "body": json.load(r)}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": json.loads(e.read() or b"{}")}))
PY
    rc=$?
    stop_forward
    return "$rc"
}

# recall_answers: the best hit for shipping.md#0's own vector is that chunk, served from Qdrant
# with its provenance (retried until the collection is complete and the pod runs).
recall_answers() {
    local deadline=$((SECONDS + timeout)) out=$work/recall.json digest
    digest=$(cat "$work/qdrant-digest")
    while ((SECONDS < deadline)); do
        if recall_as_agent '{"vector": [0, 1, 0, 0], "k": 3}' "$out" 2>/dev/null &&
            python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(d["status"]!=200)' "$out" &&
            python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["body"]))' "$out" |
            "$checks" recall-hit e2e-qdrant-kb "$digest" shipping.md#0 >/dev/null 2>&1; then
            return 0
        fi
        sleep 3
    done
    cat "$out" 2>/dev/null
    return 1
}

# recall_revoked: after spec.revoked, recall answers 410 capsule_revoked (the revocation reaches
# the sidecar through the ledger, or its ConfigMap when the kubelet refreshes it: up to about
# a minute more than the timeout).
recall_revoked() {
    local deadline=$((SECONDS + timeout + 90)) out=$work/recall-revoked.json
    while ((SECONDS < deadline)); do
        recall_as_agent '{"vector": [0, 1, 0, 0], "k": 3}' "$out" 2>/dev/null &&
            "$checks" recall-refused 410 capsule_revoked <"$out" >/dev/null 2>&1 && return 0
        sleep 3
    done
    cat "$out" 2>/dev/null
    "$checks" recall-refused 410 capsule_revoked <"$out"
}

qdrant_scenario() {
    local qimage=${SOMA_E2E_QDRANT_IMAGE:-docker.io/qdrant/qdrant:v1.15.0}
    local rimage=${SOMA_E2E_REGISTRY_IMAGE:-docker.io/library/registry:2}
    local collection
    echo "sha256:$(printf 'e2e qdrant policy' | sha256sum | cut -d' ' -f1)" >"$work/qdrant-policy-hash"
    check "qdrant: the installed operator has --qdrant-url and the scenario's registry" installed_for_qdrant
    check "qdrant: apply Qdrant ($qimage) and a registry ($rimage) in $qdrant_ns" \
        bash -c "sed -e 's#SOMA_E2E_QDRANT_IMAGE#$qimage#g' -e 's#SOMA_E2E_REGISTRY_IMAGE#$rimage#g' \
                 '$here/fixtures/e2e-qdrant-servers.yaml' | kubectl apply -f -"
    qdrant_applied=true
    check "qdrant: Qdrant and the registry ready" \
        kubectl wait -n "$qdrant_ns" --for=condition=Ready pod/e2e-qdrant pod/e2e-registry --timeout="${timeout}s"
    check "qdrant: bundle with embeddings packed, pushed and signed" qdrant_bundle
    check "qdrant: Capsule e2e-qdrant-kb (spec.index qdrant) and Agent e2e-qdrant-agent applied" qdrant_tenant_objects
    collection="soma_${ns}_sha256_$(cut -d: -f2 "$work/qdrant-digest" 2>/dev/null)"
    check "qdrant: Capsule verified and loaded into $collection (status.qdrant, QdrantLoaded)" \
        bash -c "for _ in \$(seq 1 $((timeout / 2))); do
                   kubectl get -n '$ns' capsules.soma.dev/e2e-qdrant-kb -o json | '$checks' qdrant-loaded '$collection' >/dev/null 2>&1 && exit 0
                   sleep 2
                 done
                 kubectl get -n '$ns' capsules.soma.dev/e2e-qdrant-kb -o json | '$checks' qdrant-loaded '$collection'"
    check "qdrant: Qdrant counts 3 points of 4 dimensions in $collection" qdrant_points "$collection" 3
    check "qdrant: the sidecar's configuration names the collection and the server" \
        bash -c "kubectl wait -n '$ns' --for=create configmap/e2e-qdrant-agent-sidecar --timeout='${timeout}s' >/dev/null &&
                 kubectl get -n '$ns' configmap/e2e-qdrant-agent-sidecar -o jsonpath='{.data.config\.yaml}' |
                 grep -q '\"collection\": \"$collection\"' &&
                 kubectl get -n '$ns' configmap/e2e-qdrant-agent-sidecar -o jsonpath='{.data.config\.yaml}' |
                 grep -q '\"qdrantUrl\": \"$qdrant_url\"'"
    check "qdrant: e2e-qdrant-agent's pod running" \
        bash -c "kubectl wait -n '$ns' --for=create deployment/e2e-qdrant-agent --timeout='${timeout}s' >/dev/null &&
                 kubectl wait -n '$ns' deployment/e2e-qdrant-agent --for=jsonpath='{.status.readyReplicas}'=1 --timeout='${timeout}s'"
    check "qdrant: recall answers from the collection, best hit with its provenance" recall_answers
    check "qdrant: revoke Capsule e2e-qdrant-kb" \
        kubectl patch -n "$ns" capsules.soma.dev/e2e-qdrant-kb --type merge -p '{"spec":{"revoked":true}}'
    check "qdrant: recall answers 410 capsule_revoked" recall_revoked
}

# --- the operator ---------------------------------------------------------------------

start_local_operator() {
    local bin=${SOMA_OPERATOR_BIN:-}
    if [[ -z $bin ]]; then
        for b in "$repo/target/release/soma-operator" "$repo/target/debug/soma-operator"; do
            [[ -x $b ]] && { bin=$b; break; }
        done
    fi
    if [[ -z $bin ]]; then
        echo "building soma-operator (cargo build -p soma-operator)"
        (cd "$repo" && cargo build -q -p soma-operator --bin soma-operator) || return 1
        bin=$repo/target/debug/soma-operator
    fi
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    # No webhook: the API server cannot call a process outside the cluster. Policies are still
    # re-checked at reconcile time. The sidecars may reach the suite's namespace (the Vault
    # scenario's OpenBao runs there).
    echo "operator: $bin run --namespaces $ns --webhook-port 0 (metrics on 127.0.0.1:$port, log $work/operator.log)"
    POD_NAME=soma-e2e-$(hostname) POD_NAMESPACE=$ns RUST_LOG=${RUST_LOG:-info} \
        "$bin" run \
        --namespaces "$ns" \
        --metrics-addr "127.0.0.1:$port" \
        --sidecar-image "${SOMA_E2E_SIDECAR_IMAGE:-ghcr.io/soma-dev/soma-proxy:0.1.0}" \
        --sidecar-port 4000 \
        --lease-name soma-operator-e2e \
        --lease-namespace "$ns" \
        --webhook-port 0 \
        --sidecar-egress-namespaces "$ns" \
        >"$work/operator.log" 2>&1 &
    operator_pid=$!
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        kill -0 "$operator_pid" 2>/dev/null || { echo "operator exited:"; tail -n 20 "$work/operator.log"; return 1; }
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "http://127.0.0.1:$port/readyz" 2>/dev/null && return 0
        sleep 1
    done
    echo "operator not ready on /readyz within ${timeout}s"
    return 1
}

installed_operator_ready() {
    local deploy
    deploy=$(kubectl get deployments -A -l app.kubernetes.io/name=soma,app.kubernetes.io/component=operator \
        -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}' | head -n1)
    [[ -n $deploy ]] || { echo "no Deployment labelled app.kubernetes.io/name=soma,component=operator: helm install first"; return 1; }
    echo "operator: $deploy"
    kubectl rollout status -n "${deploy%%/*}" "deployment/${deploy#*/}" --timeout="${timeout}s"
}

# --- the suite --------------------------------------------------------------------

crds=(agents budgets capsules jobs)
if $own_namespace; then
    check "create namespace $ns" kubectl create namespace "$ns"
else
    check "namespace $ns exists" kubectl get namespace "$ns"
fi

if $installed; then
    for c in "${crds[@]}"; do
        check "CRD $c.soma.dev installed" kubectl get crd "$c.soma.dev"
    done
    check "installed operator rolled out" installed_operator_ready
else
    check "apply crds/" kubectl apply --server-side --force-conflicts --field-manager=soma-e2e -f "$repo/crds/"
    for c in "${crds[@]}"; do
        check "CRD $c.soma.dev Established" \
            kubectl wait --for=condition=Established "crd/$c.soma.dev" --timeout="${timeout}s"
    done
    check "local operator running and ready" start_local_operator
fi
[[ $failed -eq 0 ]] || { echo; echo "$passed passed, $failed failed"; exit 1; }

shopt -s nullglob
examples=("$repo"/examples/*.yaml)
check "examples/*.yaml present" test "${#examples[@]}" -gt 0
for f in "${examples[@]}"; do
    # The examples name their own namespace; move them into the suite's.
    check "apply examples/$(basename "$f")" \
        apply_in_namespace "$f"
done
check "apply the suite's own Agent e2e-agent and Budget e2e-budget" \
    kubectl apply -n "$ns" -f "$here/fixtures/e2e-agent.yaml"

read -r -a agents <<<"$(kubectl get -n "$ns" agents.soma.dev -o jsonpath='{.items[*].metadata.name}' 2>/dev/null)"
check "Agents to check: ${agents[*]:-none}" test "${#agents[@]}" -gt 0

for a in "${agents[@]}"; do
    # Until Cosign verification is built in, a Capsule is never Ready, so an Agent that uses one
    # is honestly not started (docs/policies.md, "Capsules: verification plumbing").
    if [[ -n $(kubectl get -n "$ns" agents.soma.dev "$a" -o jsonpath='{.spec.capsules[*].name}' 2>/dev/null) ]]; then
        check "agent $a (uses Capsules): Ready=False, reason CapsuleNotReady" ready_false_because "$a" CapsuleNotReady
        continue
    fi
    for kind in deployments services networkpolicies serviceaccounts; do
        check "agent $a: $kind created" exists_by_label "$kind" "$a"
    done
    check "agent $a: ConfigMap $a-sidecar created" exists_by_name configmap "$a-sidecar"
    check "agent $a: children controlled by the Agent" children_owned "$a"
    check "agent $a: pod sandboxed (non-root, ro rootfs, RuntimeDefault, drop ALL, no token)" sandboxed "$a"
    check "agent $a: NetworkPolicy restricts egress" egress_restricted "$a"
    check "agent $a: status.observedGeneration == metadata.generation" observed_generation_current "$a"
done

# The example Jobs, and the suite's own on e2e-agent.
if [[ -n $(kubectl get -n "$ns" jobs.soma.dev summarise-incident-4711 -o name 2>/dev/null) ]]; then
    check "job summarise-incident-4711 (its Agent's Capsule is not verified): Pending, CapsuleNotReady" \
        sjob_check summarise-incident-4711 job-waits CapsuleNotReady
    check "job summarise-incident-4711: not started (no batch/v1 Job)" no_batch_job summarise-incident-4711
fi
if [[ -n $(kubectl get -n "$ns" jobs.soma.dev ledger-dr-drill -o name 2>/dev/null) ]]; then
    check "job ledger-dr-drill: says why it cannot start here, or runs and reports its figures" \
        sjob_check ledger-dr-drill drill-state
fi
check "apply the suite's own Job e2e-job on e2e-agent" kubectl apply -n "$ns" -f "$here/fixtures/e2e-job.yaml"
check "job e2e-job: batch/v1 Job created" exists_by_name jobs.batch e2e-job
check "job e2e-job: batch/v1 Job, NetworkPolicy and ConfigMap controlled by the Job" job_children e2e-job
check "job e2e-job: pod sandboxed like an Agent's (non-root, ro rootfs, RuntimeDefault, drop ALL, no token)" \
    bash -c "kubectl get -n '$ns' jobs.batch/e2e-job -o json | '$checks' sandboxed"
check "job e2e-job: NetworkPolicy sjob-e2e-job restricts egress" \
    bash -c "kubectl get -n '$ns' networkpolicies/sjob-e2e-job -o json | '$checks' egress-restricted"
check "job e2e-job: stopped at its deadline by Kubernetes (Failed, DeadlineExceeded)" \
    sjob_check e2e-job job-failed DeadlineExceeded
check "kubectl get sjob prints phases" bash -c "kubectl get sjob -n '$ns' | grep -E '^e2e-job +Failed'"

check "apply Agent e2e-no-budget (Budget e2e-missing-budget does not exist)" \
    agent_without_budget e2e-agent e2e-no-budget
check "agent e2e-no-budget: Ready=False, reason BudgetNotFound" ready_false_because e2e-no-budget BudgetNotFound
check "agent e2e-no-budget: status.observedGeneration current" observed_generation_current e2e-no-budget

# An Agent whose Budget is deleted from under it must say so too.
check "delete Budget e2e-budget (used by e2e-agent)" \
    kubectl delete -n "$ns" budgets.soma.dev e2e-budget --wait=true --timeout="${timeout}s"
check "agent e2e-agent: Ready=False, reason BudgetNotFound after its Budget is deleted" \
    ready_false_because e2e-agent BudgetNotFound

if [[ ${SOMA_E2E_VAULT:-} == 1 ]]; then
    vault_scenario
else
    echo "skip vault scenario: set SOMA_E2E_VAULT=1 (the cluster must run the sidecar image and OpenBao; see --help)"
    skipped=$((skipped + 1))
fi

if [[ ${SOMA_E2E_QDRANT:-} == 1 ]] && $installed; then
    qdrant_scenario
elif [[ ${SOMA_E2E_QDRANT:-} == 1 ]]; then
    echo "skip qdrant scenario: it needs --installed (an operator in the cluster reaches the scenario's registry and Qdrant as the pods do; see --help)"
    skipped=$((skipped + 1))
else
    echo "skip qdrant scenario: set SOMA_E2E_QDRANT=1 with --installed (see --help)"
    skipped=$((skipped + 1))
fi

echo
echo "$passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
