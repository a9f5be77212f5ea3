#!/usr/bin/env bash
# End to end, the way a user runs cxrtune on their own servers, on this one machine:
# `ray up cluster-onprem.yaml`, a sweep started with `ray exec`, the experiment copied
# back with `ray rsync-down`, `ray down`.
#
# The "head node" is this machine, reached over SSH as root at 127.0.0.1. Its sshd runs
# in its own PID and mount namespace (unshare), so everything started on the node,
# Ray included, lives in that namespace:
#   - `ray stop`, which `ray up` and `ray down` run on the node and which kills every
#     Ray process it can see, sees only the node's. Without the namespace it would kill
#     every Ray process on this machine, so the script refuses to run when `unshare` is
#     not allowed. Even so, don't run it beside other Ray work: it takes the CPUs, and a
#     mistake here would reach every Ray process of the machine.
#   - the node has its own /tmp/ray, so `--address auto` on the node finds this cluster,
#     and no other Ray user of this machine finds it;
#   - killing the namespace's first process ends every process started in it.
# The node's home is a fresh folder (sshd sets HOME), so the synced repo, the venv and
# the token that `ray up` copies there are the node's own, as on a real server.
# Token authentication is on (RAY_AUTH_MODE=token in the YAML); the script checks that
# the cluster refuses requests without the token, and that the node listens on
# 127.0.0.1 only.
#
# Usage: tests/e2e/ray_up_onprem.sh   (as root; `.ci/run` runs it after `make test`)
#   CXRTUNE_E2E_VENV        where the "laptop's" `ray` CLI is (default: .venv of `make test`)
#   CXRTUNE_E2E_NODE_HOME   keep the node's home in this folder between runs. The node
#       setup (`test -x ... || python3 -m venv`, `pip install -e`) then finds cxrtune
#       installed and takes seconds, as on a user's second `ray up`. Unset (CI), the node's
#       home is new each run and its setup installs everything (a few minutes).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
laptop_venv=${CXRTUNE_E2E_VENV:-$repo/.venv}
ray_cli=$laptop_venv/bin/ray
python=$laptop_venv/bin/python
steps=$repo/tests/e2e/ray_up_onprem.py
trials=3

say() { printf '\n== %s\n' "$*"; }
fail() {
    echo "ray_up_onprem: $*" >&2
    exit 1
}
listening() { "$python" -c "import socket; socket.create_connection(('127.0.0.1', $1), timeout=1)" 2>/dev/null; }

[ "$(id -u)" = 0 ] || fail "must run as root (it starts an sshd and logs in as root)"
[ -x "$ray_cli" ] || fail "no ray CLI at $ray_cli (run make test first, or set CXRTUNE_E2E_VENV)"

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    # Keep the package's own sshd from starting on 0.0.0.0:22 while it installs.
    created_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    [ -z "$created_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
unshare --pid --fork --mount-proc true 2>/dev/null ||
    fail "unshare is not allowed here, and without a PID namespace 'ray down' would stop every Ray process on this machine"
# Ray's cluster launcher has no SSH port setting, so the node listens on port 22 of 127.0.0.1.
listening 22 && fail "something already listens on 127.0.0.1:22"

work=$(mktemp -d /tmp/cxrtune-ray-up.XXXXXX)
chmod 700 "$work"
node_home=${CXRTUNE_E2E_NODE_HOME:-$work/node-home}
mkdir -p "$node_home" "$work/node-tmp-ray" "$work/laptop-tmp" /run/sshd /tmp/ray
rendered=$work/cluster.yaml
experiment=ray-up-${work##*.}
namespace_pid=
node_sshd=
cluster_up=
control_dir=
# The laptop side keeps its cluster state and config cache out of this machine's /tmp.
export RAY_TMPDIR=$work/laptop-tmp TMPDIR=$work/laptop-tmp
# Otherwise Ray swaps 127.0.0.1 for this machine's outward address (as in
# search/ray_environment.py); the node gets the same setting from its sshd.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
unset RAY_ADDRESS

cleanup() {
    status=$?
    set +e
    if [ -n "$cluster_up" ]; then
        say "ray down (cleanup)"
        timeout 120 "$ray_cli" down -y "$rendered"
    fi
    if [ -n "$namespace_pid" ]; then
        # When the namespace's first process (the node's sshd) dies, the kernel ends every
        # other process of the namespace; unshare then reaps it and exits. Should unshare
        # be killed first instead, --kill-child still takes the namespace down.
        if [ -n "$node_sshd" ]; then kill -KILL "$node_sshd" 2>/dev/null; else kill -KILL "$namespace_pid"; fi
        wait "$namespace_pid" 2>/dev/null
    fi
    if [ -n "$control_dir" ]; then
        rm -rf "$control_dir"
        rmdir "$(dirname "$control_dir")" 2>/dev/null
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

say "starting sshd on 127.0.0.1:22 in its own namespace"
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/client_key"
cp "$work/client_key.pub" "$work/authorized_keys"
# The node installs packages from the same sources as this machine.
if [ -d "$HOME/.config/pip" ] && [ ! -e "$node_home/.config/pip" ]; then
    mkdir -p "$node_home/.config"
    cp -r "$HOME/.config/pip" "$node_home/.config/pip"
fi
cat >"$work/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $work/host_key
PidFile $work/sshd.pid
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 50
MaxSessions 50
SetEnv HOME=$node_home RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
EOF
unshare --pid --fork --kill-child=SIGKILL --mount-proc \
    bash -c "mount --bind '$work/node-tmp-ray' /tmp/ray && exec /usr/sbin/sshd -D -e -f '$work/sshd_config'" \
    >"$work/sshd.log" 2>&1 &
namespace_pid=$!
for _ in $(seq 50); do
    listening 22 && break
    kill -0 "$namespace_pid" 2>/dev/null || fail "sshd did not start: $(cat "$work/sshd.log")"
    sleep 0.2
done
node_sshd=$(pgrep -P "$namespace_pid")

say "rendering cluster-onprem.yaml for this machine"
# As docs/cluster.md says: the cluster's token, made once on the user's machine.
[ -e "$HOME/.ray/auth_token" ] || "$ray_cli" get-auth-token --generate >/dev/null
read -r gcs_port dashboard_port control_dir < <(
    "$python" "$steps" render "$repo/cluster-onprem.yaml" "$rendered" "$repo" "$work/client_key"
)
[ -n "$control_dir" ] || fail "could not render cluster-onprem.yaml"
echo "GCS port $gcs_port, dashboard port $dashboard_port"

say "ray up"
cluster_up=1
timeout 480 "$ray_cli" up -y --no-config-cache "$rendered"

say "checking that the node listens on loopback only and wants the token"
"$python" "$steps" listeners "$node_sshd"
token=$(cat "$HOME/.ray/auth_token")
without=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$dashboard_port/api/jobs/")
with=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" \
    "http://127.0.0.1:$dashboard_port/api/jobs/")
echo "dashboard without the token: $without; with it: $with"
[ "$without" = 401 ] || fail "the dashboard answered $without without the token (401 expected)"
[ "$with" = 200 ] || fail "the dashboard answered $with with the token (200 expected)"
RAY_AUTH_MODE=disabled timeout 60 "$python" 2>"$work/no-token.log" -c "
import ray
try:
    ray.init(address='127.0.0.1:$gcs_port', log_to_driver=False)
except ConnectionError as error:
    print('a driver without the token was refused:', error)
else:
    raise SystemExit('a driver without the token connected')
" || fail "a driver without the token was not refused: $(tail -3 "$work/no-token.log")"

say "a tiny sweep on the cluster"
timeout 420 "$ray_cli" exec --no-config-cache "$rendered" \
    "cd ~/cxrtune && cxrtune sweep sweeps/quickstart.yaml --address auto --name $experiment \
     --set num_samples=$trials --set max_epochs=1 --set synthetic.n=300"

say "ray rsync-down the experiment"
"$ray_cli" rsync-down "$rendered" "~/cxrtune/results/$experiment/" "$work/down/"
"$python" "$steps" leaderboard "$work/down" "$trials"

say "ray down"
timeout 120 "$ray_cli" down -y "$rendered"
cluster_up=
leftover=$(ssh -i "$work/client_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR root@127.0.0.1 'ps -e -o pid=,comm=' | grep -E 'raylet|gcs_server|ray::' || true)
[ -z "$leftover" ] || fail "Ray processes left on the node after ray down: $leftover"
echo "ray_up_onprem: passed"
