#!/usr/bin/env bash
# Validates the Kubernetes deployment under deploy/kubernetes/ offline:
#
#   bash deploy/validate.sh [TOOLS_DIR]
#
# TOOLS_DIR (default: <repository>/.tools/k8s-validate, ignored by git)
# receives a virtual environment with the pinned schema checker
# (deploy/validate-requirements.txt: kubernetes-validate, which bundles the
# Kubernetes JSON schemas). Installing it is the only step that uses the
# network (PyPI), once; everything after runs without network (inside
# `unshare --net` where that is allowed, which proves it) and takes a few
# seconds. Checks, each fatal:
#   1. every manifest: strict schema validation against Kubernetes 1.30
#      and 1.37 (K8S_VERSIONS), unknown kinds included; the policy of each
#      container (loader: drop ALL, add exactly BPF, PERFMON and NET_ADMIN;
#      envoy and pod-sync: drop ALL, add nothing; Envoy as 41053, never
#      root; nothing privileged; no hostPID; the seccomp profile
#      dns-egress-gateway.json; ...) and the references between objects
#      (deploy/check_manifests.py);
#   2. the checker catches known breaks, each for its own reason (its
#      self-test: 40 of them), and fails from the command line on broken
#      copies of the files;
#   3. gateway.toml in the ConfigMap parses as TOML (tomllib), and, when a
#      built gateway binary is at hand, as a gateway configuration
#      (`gateway envoy-config`; GATEWAY_BIN=path picks one, GATEWAY_BIN=none
#      skips it);
#   4. the kustomization renders (`kubectl kustomize`, when kubectl is
#      installed) and the rendered objects pass check 1 as well;
#   5. deploy/seccomp-profile.py turns podman's profile format into the OCI
#      one the nodes need (on a sample, and on target/image/seccomp-loader.json
#      when `cargo xtask image` has written it);
#   6. the containers' shell scripts: syntax, and their behaviour against
#      stand-ins for curl and gateway (pod-sync keeps the gates when the API
#      server fails, keeps the token off command lines, stops on SIGTERM; the
#      loader's script reloads a changed file once, hands SIGTERM to
#      `gateway run` and exits with its status once it is gone).
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$deploy")
tools=${1:-$repo/.tools/k8s-validate}
# The oldest Kubernetes the manifests are meant for (appArmorProfile is
# a field from 1.30 on), and the newest the pinned checker knows.
K8S_VERSIONS=(1.30.0 1.37.0)
requirements=$deploy/validate-requirements.txt
manifests=$deploy/kubernetes

say() { printf 'validate: %s\n' "$*"; }
fail() {
    printf 'validate: FAILED: %s\n' "$*" >&2
    exit 1
}

work=$(mktemp -d)
background=()
cleanup() {
    local pid
    for pid in "${background[@]}"; do
        kill -KILL -- "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# Polls a command for up to $1 seconds.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${seconds}s waiting for $what"
        sleep 0.1
    done
}

# --- the checker -------------------------------------------------------------
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "$python is older than Python 3.11 (tomllib is needed); set PYTHON"
venv=$tools/venv
if ! cmp -s "$requirements" "$venv/.requirements" 2>/dev/null; then
    say "installing the pinned checker into $venv"
    rm -rf "$venv"
    mkdir -p "$tools"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        --no-deps --only-binary=:all: -r "$requirements"
    "$venv/bin/pip" check --disable-pip-version-check >/dev/null
    cp "$requirements" "$venv/.requirements"
fi
say "checker: kubernetes-validate $("$venv/bin/python" -c \
    'import kubernetes_validate.version as v; print(v.__version__)') in $venv"

offline=()
if unshare --net true 2>/dev/null; then
    offline=(unshare --net --)
    say "checks run without network (unshare --net)"
else
    say "unshare --net is not allowed here: checks run with the network present (they do not use it)"
fi

k8s_args=()
for version in "${K8S_VERSIONS[@]}"; do
    k8s_args+=(-k "$version")
done
check() { "${offline[@]}" "$venv/bin/python" "$deploy/check_manifests.py" "${k8s_args[@]}" "$@"; }

# --- 1 and 2: schemas, policy, references, self-test, TOML -----------------
extracted=$work/extracted
check --self-test --extract "$extracted" "$manifests" || fail "the manifests under $manifests"
for file in loader.sh pod-sync.sh gateway.toml; do
    [[ -s $extracted/$file ]] || fail "nothing extracted as $file"
done

# The same checker from the command line, on broken copies of the files:
# each must fail, naming the break.
broken_copy() {
    local name=$1 file=$2 old=$3 new=$4 expected=$5
    local dir=$work/broken-$name
    cp -r "$manifests" "$dir"
    grep -qF -- "$old" "$dir/$file" || fail "broken copy $name: '$old' is not in $file any more"
    OLD=$old NEW=$new "$python" -c 'import os, sys; p = sys.argv[1]; t = open(p).read(); open(p, "w").write(t.replace(os.environ["OLD"], os.environ["NEW"], 1))' "$dir/$file"
    local status=0
    check "$dir" >"$dir.out" 2>&1 || status=$?
    [[ $status -eq 1 ]] || fail "the checker exited with $status on the broken copy $name: $(cat "$dir.out")"
    grep -qF -- "$expected" "$dir.out" || fail "the checker missed the broken copy $name: $(cat "$dir.out")"
}
broken_copy sys-admin daemonset.yaml 'add: ["BPF", "PERFMON", "NET_ADMIN"]' \
    'add: ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"]' "container loader: capabilities.add must be exactly"
broken_copy unlisted kustomization.yaml '  - rbac.yaml' '' "rbac.yaml: not listed in"
say "the checker fails on broken copies of the files (an extra capability, an unlisted file)"

# --- 3: gateway.toml as the gateway reads it -------------------------------------
gateway_bin=${GATEWAY_BIN:-}
if [[ -z $gateway_bin ]]; then
    # The newest build, if any.
    for candidate in "$repo/target/release/gateway" "$repo/target/debug/gateway"; do
        if [[ -x $candidate && (-z $gateway_bin || $candidate -nt $gateway_bin) ]]; then
            gateway_bin=$candidate
        fi
    done
fi
config=$extracted/gateway.toml
# How a binary built before listeners.metrics existed refuses the key.
# shellcheck disable=SC2016 # the backquotes are serde's, not a command
before_metrics='unknown field `metrics`, expected one of'
if [[ $gateway_bin == none ]]; then
    say "GATEWAY_BIN=none: gateway.toml checked as TOML only"
elif [[ -n $gateway_bin ]]; then
    if "${offline[@]}" "$gateway_bin" envoy-config --config "$config" >"$work/bootstrap.json" 2>"$work/envoy-config.err"; then
        # The metrics listener is in the bootstrap, where the probes look.
        "$python" - "$work/bootstrap.json" "$config" <<'EOF' || fail "the bootstrap lacks the metrics listener"
import json, sys, tomllib
bootstrap = json.load(open(sys.argv[1]))
host, port = tomllib.load(open(sys.argv[2], "rb"))["listeners"]["metrics"].rsplit(":", 1)
found = [l["address"]["socket_address"] for l in bootstrap["static_resources"]["listeners"] if l.get("name") == "metrics"]
sys.exit(not any(a.get("address") == host and a.get("port_value") == int(port) for a in found))
EOF
        say "gateway.toml accepted by $gateway_bin envoy-config (metrics listener included)"
    elif grep -qF "$before_metrics" "$work/envoy-config.err"; then
        # Only for a binary built before listeners.metrics existed: the rest
        # of the file must still be accepted.
        grep -v '^metrics = ' "$config" >"$work/without-metrics.toml"
        "${offline[@]}" "$gateway_bin" envoy-config --config "$work/without-metrics.toml" >/dev/null ||
            fail "$gateway_bin refuses the ConfigMap's gateway.toml even without listeners.metrics"
        say "NOTE: $gateway_bin predates listeners.metrics (rebuild it); gateway.toml accepted without that line"
    else
        cat "$work/envoy-config.err" >&2
        fail "$gateway_bin refuses the ConfigMap's gateway.toml (GATEWAY_BIN=none skips this check)"
    fi
else
    [[ ${CI:-} == true ]] && fail "CI=true: no gateway binary to check the ConfigMap's gateway.toml with (build first)"
    say "no gateway binary (target/{release,debug}/gateway or GATEWAY_BIN): gateway.toml checked as TOML only"
fi

# --- 4: the kustomization ------------------------------------------------------
if command -v kubectl >/dev/null 2>&1; then
    "${offline[@]}" kubectl kustomize "$manifests" >"$work/rendered.yaml" ||
        fail "kubectl kustomize $manifests"
    check "$work/rendered.yaml" >/dev/null || fail "the output of kubectl kustomize $manifests"
    say "kubectl kustomize renders the same objects, which pass the same checks"
else
    say "kubectl is not installed: the kustomization's rendering is not checked (its resources are)"
fi

# --- 5: the nodes' seccomp profile ---------------------------------------------
seccomp=$deploy/seccomp-profile.py
cat >"$work/podman-format.json" <<'EOF'
{
  "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "defaultErrno": "ENOSYS",
  "archMap": [
    {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}
  ],
  "syscalls": [
    {"names": ["read", "setns"], "action": "SCMP_ACT_ALLOW", "args": [], "comment": "", "includes": {}, "excludes": {}},
    {"names": ["chroot"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_CHROOT"]}},
    {"names": ["chroot", "setns"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "excludes": {"caps": ["CAP_SYS_CHROOT"]}},
    {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64", "x32"]}},
    {"names": ["syslog"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_NET_ADMIN"]}},
    {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
    {"names": ["bpf", "perf_event_open"], "action": "SCMP_ACT_ALLOW", "comment": "dns-egress-gateway"}
  ]
}
EOF
for arch in amd64 arm64; do
    "${offline[@]}" "$python" "$seccomp" --arch "$arch" -o "$work/oci-$arch.json" "$work/podman-format.json" 2>/dev/null ||
        fail "$seccomp refused the sample profile ($arch)"
done
"$python" - "$work" <<'EOF' || fail "$seccomp: unexpected output for the sample profile"
import json, sys
work = sys.argv[1]
errno1 = {"names": ["chroot", "setns"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
common = [
    {"names": ["read"], "action": "SCMP_ACT_ALLOW"},  # setns: allowed and refused, so refused
    errno1,                                           # chroot: no CAP_SYS_CHROOT; syslog: CAP_NET_ADMIN held
    {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
    {"names": ["bpf", "perf_event_open"], "action": "SCMP_ACT_ALLOW"},
]
expected = {
    "amd64": {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
              "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
              "syscalls": common[:2] + [{"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW"}] + common[2:]},
    "arm64": {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
              "architectures": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"], "syscalls": common},
}
for arch, want in expected.items():
    got = json.load(open(f"{work}/oci-{arch}.json"))
    if got != want:
        sys.exit(f"{arch}: got {json.dumps(got)}")
EOF
sed -e 's/"bpf", //' "$work/podman-format.json" >"$work/no-bpf.json"
! "$python" "$seccomp" "$work/no-bpf.json" >/dev/null 2>&1 || fail "$seccomp accepted a profile that refuses bpf()"
if [[ -s $repo/target/image/seccomp-loader.json ]]; then
    "${offline[@]}" "$python" "$seccomp" -o "$work/node-profile.json" "$repo/target/image/seccomp-loader.json" 2>"$work/seccomp.err" ||
        fail "$seccomp refused target/image/seccomp-loader.json: $(cat "$work/seccomp.err")"
    "$python" - "$work/node-profile.json" <<'EOF' || fail "the node profile made from target/image/seccomp-loader.json is not plain OCI"
import json, sys
profile = json.load(open(sys.argv[1]))
assert set(profile) <= {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}, set(profile)
for rule in profile["syscalls"]:
    assert set(rule) <= {"names", "action", "errnoRet", "args"}, rule
EOF
    say "seccomp: the sample converts as expected; target/image/seccomp-loader.json converts ($(tail -n 1 "$work/seccomp.err" | sed 's/^seccomp-profile: //'))"
else
    [[ ${CI:-} == true ]] && fail "CI=true: target/image/seccomp-loader.json missing (cargo xtask image writes it)"
    say "seccomp: the sample converts as expected (target/image/seccomp-loader.json absent: \`cargo xtask image\` writes it)"
fi

# --- 6: the containers' scripts --------------------------------------------------
for script in loader.sh pod-sync.sh; do
    sh -n "$extracted/$script" || fail "shell syntax of the $script container script"
done

# pod-sync: rounds 1 and 4 list pods, round 2 fails (HTTP 503), round 3
# answers something that is no PodList, later rounds list no pod.
test_pod_sync() {
    local dir=$work/pod-sync
    mkdir -p "$dir/bin" "$dir/sa"
    printf 'token-that-must-stay-off-argv' >"$dir/sa/token"
    : >"$dir/sa/ca.crt"
    cat >"$dir/bin/curl" <<'EOF'
#!/bin/sh
n=$(( $(cat "$STUB_DIR/rounds" 2>/dev/null || echo 0) + 1 ))
printf '%s\n' "$*" >>"$STUB_DIR/curl-argv"
cat >>"$STUB_DIR/curl-stdin"
case $n in
    1 | 4) printf '{"kind":"PodList","apiVersion":"v1","items":[{"metadata":{"uid":"pod-of-round-%s"}}]}' "$n" ;;
    2) echo "curl: (22) The requested URL returned error: 503" >&2; echo "$n" >"$STUB_DIR/rounds"; exit 22 ;;
    3) printf '<html>a proxy in the way</html>' ;;
    *) printf '{"kind":"PodList","apiVersion":"v1","items":[]}' ;;
esac
echo "$n" >"$STUB_DIR/rounds"
EOF
    cat >"$dir/bin/gateway" <<'EOF'
#!/bin/sh
printf '%s <<< %s\n' "$*" "$(cat)" >>"$STUB_DIR/gateway-calls"
EOF
    chmod +x "$dir/bin/curl" "$dir/bin/gateway"

    STUB_DIR=$dir PATH="$dir/bin:$PATH" SERVICEACCOUNT_DIR=$dir/sa \
        KUBERNETES_SERVICE_HOST=fd00::1 KUBERNETES_SERVICE_PORT=6443 NODE_NAME=node-a \
        GATE_SELECTOR=dns-egress-gateway.io/gate=true KUBEPODS_ROOT=/sys/fs/cgroup/kubepods.slice \
        CONFIG=/etc/dns-egress-gateway/gateway.toml SYNC_INTERVAL=0.1 \
        sh "$extracted/pod-sync.sh" >"$dir/output" 2>&1 &
    local pid=$!
    background+=("$pid")
    rounds_done() { [[ $(cat "$dir/rounds" 2>/dev/null || echo 0) -ge 5 ]]; }
    wait_until 60 "five pod-sync rounds" rounds_done
    kill -TERM "$pid"
    local status=0
    wait "$pid" || status=$?
    [[ $status -eq 0 ]] || fail "pod-sync exited with $status on SIGTERM: $(cat "$dir/output")"

    local calls
    mapfile -t calls <"$dir/gateway-calls"
    [[ ${#calls[@]} -ge 3 ]] || fail "pod-sync called gateway ${#calls[@]} times in 5 rounds: ${calls[*]}"
    local expected="gate-pods --config /etc/dns-egress-gateway/gateway.toml --kubepods-root /sys/fs/cgroup/kubepods.slice --pod-list -"
    [[ ${calls[0]} == "$expected <<< "*pod-of-round-1* ]] || fail "first gate-pods call: ${calls[0]}"
    [[ ${calls[1]} == "$expected <<< "*pod-of-round-4* ]] ||
        fail "a failed or odd listing reached gate-pods (second call: ${calls[1]})"
    [[ ${calls[2]} == "$expected <<< "*'"items":[]'* ]] || fail "an empty listing must reach gate-pods: ${calls[2]}"
    ! grep -q token-that-must-stay-off-argv "$dir/curl-argv" || fail "the token appears on curl's command line"
    grep -qx 'Authorization: Bearer token-that-must-stay-off-argv' "$dir/curl-stdin" ||
        fail "curl did not get the token as a header on stdin"
    local argv
    argv=$(head -n 1 "$dir/curl-argv")
    for part in "--cacert $dir/sa/ca.crt" "--data-urlencode labelSelector=dns-egress-gateway.io/gate=true" \
        "--data-urlencode fieldSelector=spec.nodeName=node-a" "https://[fd00::1]:6443/api/v1/pods" "--max-time"; do
        [[ $argv == *"$part"* ]] || fail "curl's arguments lack '$part': $argv"
    done
    grep -q 'listing pods failed; gates unchanged' "$dir/output" || fail "no message for the failed listing"
    grep -q 'did not answer with a PodList; gates unchanged' "$dir/output" || fail "no message for the odd answer"
    say "pod-sync: gates only on complete lists, token off argv, stops on SIGTERM"
}

# The loader's script: gateway run in the background, a reload for each
# change of the file, SIGTERM handed to gateway run (which, with
# --keep-attached, leaves the programs attached), and the script's exit
# only once gateway run is gone, with its status, the reload loop gone too.
test_loader_script() {
    local dir=$work/loader
    mkdir -p "$dir/bin"
    cat >"$dir/bin/gateway" <<'EOF'
#!/bin/sh
case $1 in
    run)
        [ -z "${STUB_EXIT:-}" ] || exit "$STUB_EXIT"
        echo $$ >"$STUB_DIR/run.pid"
        # Takes a moment to stop, and says so, like the real one.
        trap 'echo "run got SIGTERM" >>"$STUB_DIR/log"; sleep 0.3; echo "run stopped" >>"$STUB_DIR/log"; exit 7' TERM
        echo "$*" >>"$STUB_DIR/log"
        while :; do sleep 0.1; done ;;
    reload) echo "$*" >>"$STUB_DIR/log" ;;
    *) echo "unexpected: $*" >>"$STUB_DIR/log"; exit 2 ;;
esac
EOF
    chmod +x "$dir/bin/gateway"
    printf 'cgroup = "kubepods.slice"\n' >"$dir/gateway.toml"
    local -a env=(STUB_DIR="$dir" PATH="$dir/bin:$PATH" CONFIG="$dir/gateway.toml" RELOAD_CHECK_INTERVAL=0.2)
    # Its own session, to see that nothing is left (but zombies, which the
    # host's init reaps when it likes; a container ends with its init).
    # shellcheck disable=SC2009 # pgrep cannot leave zombies out everywhere
    group_gone() { ! ps -o stat= -s "$1" | grep -qv '^Z'; }

    env "${env[@]}" setsid sh "$extracted/loader.sh" >"$dir/output" 2>&1 &
    local pid=$!
    background+=("-$pid")
    wait_until 30 "gateway run to start" test -s "$dir/run.pid"
    local run_pid
    run_pid=$(cat "$dir/run.pid")
    grep -qx "run --config $dir/gateway.toml --envoy-user dns-gateway-envoy --external-envoy --keep-attached" "$dir/log" ||
        fail "gateway run started as: $(cat "$dir/log")"
    sleep 0.5 # the reload loop has read the file by now
    printf 'gate = []\n' >>"$dir/gateway.toml"
    reloaded() { grep -qx "reload --config $dir/gateway.toml" "$dir/log"; }
    wait_until 30 "a reload of the changed file" reloaded
    sleep 0.6
    [[ $(grep -c '^reload' "$dir/log") -eq 1 ]] || fail "reloads of an unchanged file: $(cat "$dir/log")"

    kill -TERM "$pid"
    local status=0
    wait "$pid" || status=$?
    grep -qx 'run got SIGTERM' "$dir/log" || fail "gateway run did not get the container's SIGTERM: $(cat "$dir/log")"
    grep -qx 'run stopped' "$dir/log" || fail "the script exited before gateway run had stopped"
    [[ $status -eq 7 ]] || fail "the script exited with $status after SIGTERM, gateway run with 7"
    ! kill -0 "$run_pid" 2>/dev/null || fail "gateway run still runs after the script exited"
    wait_until 20 "the reload loop to end with the script" group_gone "$pid"

    status=0
    env "${env[@]}" STUB_EXIT=3 setsid sh "$extracted/loader.sh" >"$dir/output2" 2>&1 &
    pid=$!
    background+=("-$pid")
    wait "$pid" || status=$?
    [[ $status -eq 3 ]] || fail "the script exited with $status when gateway run exited with 3"
    wait_until 20 "the reload loop to end with the script" group_gone "$pid"
    say "loader: reloads a changed file once, hands SIGTERM to gateway run, exits with its status once it is gone"
}

test_pod_sync
test_loader_script
say "all checks passed"
