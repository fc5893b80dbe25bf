#!/usr/bin/env bash
# Contract between the operator and the sidecar: the configurations `soma-operator render`
# writes for the example Agent and for the example task Job on it (with their Budgets) start
# the real `soma-proxy`, which then serves /healthz, refuses an unauthenticated call with 401 and
# charges both Budgets (as the Agent, and as the run `job/<name>`). Ports are free 127.0.0.1
# ones; writable paths (outbox, key file) move to a temporary folder; each sidecar is stopped
# by PID.
# Usage: e2e/contract/operator-config-starts-sidecar.sh TARGET_DIR   (holding debug/soma-operator and debug/soma-proxy)
set -euo pipefail
target=$1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tmp=$(mktemp -d)
pid=""
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

{ cat "$repo/examples/budget.yaml"; echo '---'; cat "$repo/examples/agent.yaml"; echo '---'; cat "$repo/examples/job.yaml"; } > "$tmp/input.yaml"
"$target/debug/soma-operator" render -f "$tmp/input.yaml" > "$tmp/children.yaml"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# check NAME INDEX AGENT: the INDEX-th sidecar configuration in the output, for AGENT.
check() {
    local name=$1 index=$2 agent=$3 proxy_port admin_port
    proxy_port=$(port); admin_port=$(port)
    python3 - "$tmp" "$proxy_port" "$admin_port" "$index" "$agent" <<'PY'
import json, sys, re
tmp, proxy, admin, index, agent = sys.argv[1:]
text = open(f"{tmp}/children.yaml").read()
# Each ConfigMap's config.yaml is JSON indented under a YAML block scalar.
blocks = re.findall(r"config\.yaml: \|-\n((?:    .*\n)+)", text)
config = json.loads("\n".join(line[4:] for line in blocks[int(index)].splitlines()))
assert config["agent"]["name"] == agent, config["agent"]
assert [b["name"] for b in config["budgets"]] == ["research-team", "acme-tenant"], config["budgets"]
config.update(listen=f"127.0.0.1:{proxy}", adminListen=f"127.0.0.1:{admin}", outboxPath=f"{tmp}/outbox-{index}.db",
              credentials={"file": f"{tmp}/key"})
json.dump(config, open(f"{tmp}/config.json", "w"))
PY
    echo "sk-contract-test" > "$tmp/key"
    SOMA_POD_UID=pod-uid-1 "$target/debug/soma-proxy" --config "$tmp/config.json" > "$tmp/proxy.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        curl -fsS "127.0.0.1:$admin_port/healthz" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || { cat "$tmp/proxy.log"; echo "FAIL: soma-proxy refused the operator's configuration for $name"; exit 1; }
        sleep 0.1
    done
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "127.0.0.1:$proxy_port/v1/chat/completions" \
        -H 'content-type: application/json' -d '{"model":"gpt-4o","messages":[]}')
    [[ $code == 401 ]] || { echo "FAIL: unauthenticated call to $name's sidecar got $code, want 401"; exit 1; }
    grep -q '"budgets":"research/research-team,research/acme-tenant"' "$tmp/proxy.log" || { cat "$tmp/proxy.log"; echo "FAIL: $name's sidecar did not load both Budgets"; exit 1; }
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    echo "ok: the operator's sidecar configuration for $name starts soma-proxy with both Budgets"
}
check "Agent research-assistant" 0 research-assistant
check "Job summarise-incident-4711" 1 job/summarise-incident-4711
