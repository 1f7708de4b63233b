#!/usr/bin/env bash
# deploy/tests/cluster-guards.sh: checks deploy/cluster.sh's guards without building a cluster
# (no namespaces, bridge or nft table are made; the names used are this test's own):
# `down` refuses a base dir without the marker `up` writes, is a no-op without a base dir,
# kills the daemons of its pid files even when their namespace is gone and removes the cgroups
# of its agents' tag (dev-<prefix>n1) but no other agent's; `up` on a cluster with a stopped
# member says to `start` it. Run as root: bash deploy/tests/cluster-guards.sh
set -euo pipefail

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/cluster.sh
T=$(mktemp -d /tmp/berth-cluster-guards.XXXXXX)
FAKE_PIDS=()
CG_PIDS=()
# cgroups this test makes: one of the fake cluster's agent (tag dev-bgtn1), one of another
# agent (tag dev-bgtzz) that `down` must leave alone.
if [ -d /sys/fs/cgroup/pids ]; then CG=/sys/fs/cgroup/pids; else CG=/sys/fs/cgroup; fi
OURS=$CG/berth-dev-bgtn1.payload.web
OURS_MON=$CG/berth-dev-bgtn1.monitor.web
OTHER=$CG/berth-dev-bgtzz.payload.web
cleanup() {
  local p d
  for p in "${FAKE_PIDS[@]}" "${CG_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  sleep 0.1
  for d in "$OURS/inner" "$OURS" "$OURS_MON" "$OTHER"; do rmdir "$d" 2>/dev/null || true; done
  rm -rf "$T"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

export BERTH_DEV_BASE=$T/base BERTH_DEV_RUN=$T/run BERTH_DEV_PREFIX=bgt BERTH_DEV_BRIDGE=bgtbr0 \
  BERTH_DEV_NFT_TABLE=berthguardtest BERTH_DEV_CONTROLLERS=1 BERTH_DEV_NODES=1 \
  BERTH_DEV_NET=10.254.254 BERTH_DEV_INSTANCE_NET=10.253
# Fake binaries: `sleep` under the daemons' names (member_pid checks the executable's name).
mkdir -p "$T/bin"
for b in berthd berth-agent berth; do cp "$(command -v sleep)" "$T/bin/$b"; done
export BERTH_BIN=$T/bin

run() { bash "$SCRIPT" "$@" >"$T/out" 2>&1; }

# 1. No base dir: nothing to do, success, twice.
run down || fail "down without a base dir failed: $(cat "$T/out")"
grep -q "nothing to do" "$T/out" || fail "down without a base dir said: $(cat "$T/out")"
run down || fail "second down failed"

# 2. A base dir without the marker is left alone.
mkdir -p "$BERTH_DEV_BASE/keep"
touch "$BERTH_DEV_BASE/keep/file"
if run down; then fail "down removed a base dir without the marker"; fi
grep -q "refusing" "$T/out" || fail "down without a marker said: $(cat "$T/out")"
[ -f "$BERTH_DEV_BASE/keep/file" ] || fail "down touched a base dir without the marker"

# 3. A marked base dir whose daemons run without their namespaces: they are killed, the base
#    dir and the pid files removed.
cat >"$BERTH_DEV_BASE/.cluster-env" <<M
BASE=$BERTH_DEV_BASE
RUN=$BERTH_DEV_RUN
PREFIX=bgt
BRIDGE=bgtbr0
NET=10.254.254
INET=10.253
NCTL=1
NNODE=1
NFT_TABLE=berthguardtest
M
mkdir -p "$BERTH_DEV_RUN" "$BERTH_DEV_BASE/n1"
printf '[runtime]\ncgroup_tag = "dev-bgtn1"\n' >"$BERTH_DEV_BASE/n1/agent.toml"
mkdir -p "$OURS/inner" "$OURS_MON" "$OTHER"
sleep 300 & IN_OURS=$!; CG_PIDS+=($!); echo $! >"$OURS/inner/cgroup.procs"; disown
sleep 300 & IN_OTHER=$!; CG_PIDS+=($!); echo $! >"$OTHER/cgroup.procs"; disown
"$T/bin/berthd" 300 & FAKE_PIDS+=($!); echo $! >"$BERTH_DEV_RUN/c1.pid"; disown
"$T/bin/berth-agent" 300 & FAKE_PIDS+=($!); echo $! >"$BERTH_DEV_RUN/n1.pid"; disown
sleep 0.2
run down || fail "down of a marked base dir failed: $(cat "$T/out")"
sleep 0.2
for p in "${FAKE_PIDS[@]}"; do
  if kill -0 "$p" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$p/stat")" != Z ]; then
    fail "down left the daemon pid $p running"
  fi
done
[ ! -e "$BERTH_DEV_BASE" ] || fail "down left the base dir"
[ ! -e "$BERTH_DEV_RUN" ] || fail "down left the pid files"
if [ -e "$OURS" ] || [ -e "$OURS_MON" ]; then fail "down left the agent's cgroups"; fi
if kill -0 "$IN_OURS" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$IN_OURS/stat")" != Z ]; then
  fail "down left a process in the agent's cgroup running"
fi
if ! [ -d "$OTHER" ] || ! kill -0 "$IN_OTHER" 2>/dev/null; then
  fail "down touched another agent's cgroup"
fi
run down || fail "down after down failed"

# 4. The marker's settings win over the environment's, and a damaged marker is refused.
mkdir -p "$BERTH_DEV_BASE"
# shellcheck disable=SC2016  # the text itself is the test: it must not run
echo 'PREFIX=$(touch /tmp/x)' >"$BERTH_DEV_BASE/.cluster-env"
if run status; then fail "a damaged marker was accepted"; fi
grep -q "bad value" "$T/out" || fail "a damaged marker: $(cat "$T/out")"
rm -rf "$BERTH_DEV_BASE"

# 5. `up` with a member stopped suggests `start NAME`.
mkdir -p "$BERTH_DEV_BASE"
touch "$BERTH_DEV_BASE/.up"
if run up; then fail "up with stopped members succeeded"; fi
if ! grep -q "start NAME" "$T/out" || ! grep -q "c1 n1 stopped" "$T/out"; then
  fail "up with stopped members said: $(cat "$T/out")"
fi
rm -rf "$BERTH_DEV_BASE"

echo "cluster.sh guards: ok"
