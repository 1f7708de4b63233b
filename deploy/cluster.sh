#!/usr/bin/env bash
# deploy/cluster.sh: a Berth cluster of several "hosts" on this one machine, for development,
# tests and failure drills. Every controller (c1 c2 c3) and every agent (n1 n2 n3) runs in its
# own network namespace with its own address on a test bridge, so any one of them can be
# killed, restarted, cut off and healed.
#
#   deploy/cluster.sh up            create the network, bootstrap c1, join c2 c3 and n1 n2 n3,
#                                   wait until 3 controllers and 3 online nodes show, write a
#                                   CLI config, print `export BERTH_CONF=...`
#   deploy/cluster.sh status        who runs, addresses, pids, links; the cluster's own view
#   deploy/cluster.sh env           the exports for the CLI
#   deploy/cluster.sh kill NAME     SIGKILL that member's daemon (an agent's instances keep running)
#   deploy/cluster.sh start NAME    start it again with the same state
#   deploy/cluster.sh cut NAME      cut its network (link down on the host side of its veth)
#   deploy/cluster.sh heal NAME     restore it
#   deploy/cluster.sh exec NAME -- COMMAND...   run a command in that member's network namespace
#   deploy/cluster.sh down          stop everything, kill the instances the dev cluster made,
#                                   unmount, detach loop devices, remove namespaces, veths,
#                                   bridge, nft table and the base dir (safe to run twice, and
#                                   after a failed up). It acts only on a base dir holding the
#                                   marker `up` writes first (<base>/.cluster-env, the settings
#                                   `up` ran with, which every later command uses)
#
# It builds nothing: binaries (berthd, berth-agent, berth) come from $BERTH_BIN, else the first
# directory holding all three of $CARGO_TARGET_DIR/debug, <repo>/target/debug,
# /var/cache/berth-target/debug, else $PATH. Build first: `cargo build --workspace --bins`.
#
# Settings (environment):
#   BERTH_DEV_BASE        base directory (default /var/lib/berth-dev): <base>/<name>/ per member,
#                         <base>/logs/<name>.log, <base>/cli/ (BERTH_CONF)
#   BERTH_DEV_RUN         pid files (default /run/<base dir's name>)
#   BERTH_DEV_PREFIX      prefix of the network namespace names (default none: c1 ... n3),
#                         up to 10 characters. A second dev cluster on the same machine needs
#                         its own prefix, bridge, nets, nft table and base dir
#   BERTH_DEV_BRIDGE      host bridge (default berthdev0)
#   BERTH_DEV_NET         first three octets of the test /24 (default 10.99.0): host .1,
#                         controllers .11 .12 ..., agents .21 .22 ...
#   BERTH_DEV_INSTANCE_NET first two octets of the agents' instance subnets (default 10.100):
#                         a /22 each (1021 addresses, room for 1000 instances): n1 gets
#                         10.100.4.0/22, n2 10.100.8.0/22, ... n9 10.100.36.0/22
#   BERTH_DEV_CONTROLLERS number of controllers (default 3, at most 9)
#   BERTH_DEV_NODES       number of agents (default 3, at most 9)
#   BERTH_DEV_NFT_TABLE   host nft table for the test network's NAT (default berthdev)
#   BERTH_DEV_LOOP_SIZE   each agent's sparse btrfs loop file (default 10GiB)
#   BERTH_DEV_WAIT        seconds `up` waits for the cluster (default 120)
#   BERTH_DEV_OFFLINE_THRESHOLD  controllers' offline_threshold in seconds (default: berthd's, 10)
#   BERTH_LOG             daemons' log filter (default info); OTEL_* are passed through
#
# Processes start with `nsenter --net=/run/netns/<prefix>NAME` (only the network namespace): a
# restarted agent sees the same mounts as its running instances, which `ip netns exec` (a new
# mount namespace) would hide from it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE=${BERTH_DEV_BASE:-/var/lib/berth-dev}
RUN=${BERTH_DEV_RUN:-/run/$(basename "$BASE")}
PREFIX=${BERTH_DEV_PREFIX:-}
BRIDGE=${BERTH_DEV_BRIDGE:-berthdev0}
NET=${BERTH_DEV_NET:-10.99.0}
INET=${BERTH_DEV_INSTANCE_NET:-10.100}
NCTL=${BERTH_DEV_CONTROLLERS:-3}
NNODE=${BERTH_DEV_NODES:-3}
NFT_TABLE=${BERTH_DEV_NFT_TABLE:-berthdev}
LOOP_SIZE=${BERTH_DEV_LOOP_SIZE:-10GiB}
WAIT=${BERTH_DEV_WAIT:-120}
OFFLINE=${BERTH_DEV_OFFLINE_THRESHOLD:-}
API_PORT=8443
PEER_PORT=8444
AGENT_PORT=8445
HOST_IP=$NET.1
LOGS=$BASE/logs
CONF=$BASE/cli

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }

[[ $NCTL =~ ^[1-9]$ ]] || die "BERTH_DEV_CONTROLLERS must be 1 to 9"
[[ $PREFIX =~ ^[a-z0-9-]{0,10}$ ]] || die "BERTH_DEV_PREFIX must be up to 10 of a-z 0-9 -"
[[ $NNODE =~ ^[1-9]$ ]] || die "BERTH_DEV_NODES must be 1 to 9"

while [[ $BASE == */ && $BASE != / ]]; do BASE=${BASE%/}; done
[[ $BASE =~ ^/[^/]+ && $BASE != *//* && $BASE != *..* ]] ||
  die "BERTH_DEV_BASE must be an absolute path below / (not \"$BASE\")"

# The marker `up` writes into the base dir before anything else: the settings it ran with.
# `down` removes nothing without it (it guards the unmounting and the `rm -rf` under $BASE).
MARKER=$BASE/.cluster-env
MARKER_KEYS="BASE RUN PREFIX BRIDGE NET INET NCTL NNODE NFT_TABLE"

derive_members() {
  local i
  CONTROLLERS=()
  for i in $(seq 1 "$NCTL"); do CONTROLLERS+=("c$i"); done
  NODES=()
  for i in $(seq 1 "$NNODE"); do NODES+=("n$i"); done
  MEMBERS=("${CONTROLLERS[@]}" "${NODES[@]}")
}
derive_members

write_marker() {
  local k
  for k in $MARKER_KEYS; do printf '%s=%s\n' "$k" "${!k}"; done >"$MARKER"
}

# Reads the marker's settings over the environment's (lines KEY=VALUE of known keys only;
# nothing is executed). Fails on a missing or damaged marker.
load_marker() {
  [ -f "$MARKER" ] || return 1
  local line k v want=$BASE
  while IFS= read -r line || [ -n "$line" ]; do
    [ -n "$line" ] || continue
    k=${line%%=*}; v=${line#*=}
    [[ " $MARKER_KEYS " == *" $k "* ]] || die "$MARKER: unknown setting \"$k\""
    [[ $v =~ ^[A-Za-z0-9_./-]*$ ]] || die "$MARKER: bad value for $k"
    printf -v "$k" '%s' "$v"
  done <"$MARKER"
  [ "$BASE" = "$want" ] || die "$MARKER names another base dir ($BASE): was the directory moved?"
  if ! [[ $NCTL =~ ^[1-9]$ && $NNODE =~ ^[1-9]$ ]]; then die "$MARKER: bad member counts"; fi
  HOST_IP=$NET.1
  derive_members
}

is_member() { local m; for m in "${MEMBERS[@]}"; do [ "$m" = "$1" ] && return 0; done; return 1; }
is_controller() { [[ $1 == c[1-9] ]]; }
index_of() { echo "${1#?}"; }
addr_of() { if is_controller "$1"; then echo "$NET.1$(index_of "$1")"; else echo "$NET.2$(index_of "$1")"; fi; }
ns_of() { echo "$PREFIX$1"; }
veth_of() { echo "bd-$PREFIX$1"; }
api_of() { echo "$(addr_of "$1"):$API_PORT"; }
# The first three octets of agent $1's instance /22 (n1: $INET.4, n2: $INET.8, ...).
instance_net_of() { echo "$INET.$(($(index_of "$1") * 4))"; }

find_bin() {
  local d
  if [ -n "${BERTH_BIN:-}" ]; then
    for b in berthd berth-agent berth; do [ -x "$BERTH_BIN/$b" ] || die "BERTH_BIN=$BERTH_BIN has no $b"; done
    echo "$BERTH_BIN"; return
  fi
  for d in ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/debug"} "$REPO/target/debug" /var/cache/berth-target/debug; do
    if [ -x "$d/berthd" ] && [ -x "$d/berth-agent" ] && [ -x "$d/berth" ]; then echo "$d"; return; fi
  done
  for b in berthd berth-agent berth; do command -v "$b" >/dev/null || die "no $b found: build with \`cargo build --workspace --bins\` or set BERTH_BIN"; done
  dirname "$(command -v berthd)"
}

need_root() { [ "$(id -u)" = 0 ] || die "run me as root (network namespaces, btrfs loop files, cgroups)"; }

need_tools() {
  local t
  for t in ip nsenter nft curl jq losetup mount umount; do
    command -v "$t" >/dev/null || die "$t is needed (apt-get install iproute2 util-linux nftables curl jq)"
  done
}

# --- processes -------------------------------------------------------------------------------

pidfile() { echo "$RUN/$1.pid"; }

# The member's daemon pid, when it runs (the pid file's process must still be that binary).
member_pid() {
  local f pid exe
  f=$(pidfile "$1")
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}  # the binary was rebuilt since
  case "$exe" in
    */berthd|*/berth-agent) echo "$pid" ;;
    *) return 1 ;;
  esac
}

log_of() { echo "$LOGS/$1.log"; }

# start_daemon NAME BINARY ARGS...: runs it in NAME's network namespace, detached.
start_daemon() {
  local name=$1; shift
  mkdir -p "$RUN" "$LOGS"
  echo "--- $(date -u +%FT%TZ) starting: $*" >>"$(log_of "$name")"
  # setsid (no fork: this shell does no job control, so the child leads no group) then nsenter
  # (exec) keep $! as the daemon's own pid.
  local envs=("BERTH_LOG=${BERTH_LOG:-info}")
  # A controller's join token goes through the environment, not the command line (ps).
  if [ -n "${JOIN_TOKEN:-}" ]; then envs+=("BERTHD_JOIN_TOKEN=$JOIN_TOKEN"); fi
  env "${envs[@]}" setsid nsenter --net="/run/netns/$(ns_of "$name")" -- "$@" \
    </dev/null >>"$(log_of "$name")" 2>&1 &
  echo $! >"$(pidfile "$name")"
  disown || true
  sleep 0.2
  member_pid "$name" >/dev/null || die "$name exited at once; see $(log_of "$name")"
}

start_member() {
  local name=$1; shift
  if is_controller "$name"; then
    start_daemon "$name" "$BIN/berthd" --config "$BASE/$name/berthd.toml" "$@"
  else
    start_daemon "$name" "$BIN/berth-agent" --config "$BASE/$name/agent.toml" "$@"
  fi
}

kill_member() {
  local pid
  if pid=$(member_pid "$1"); then
    kill -9 "$pid"
    for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    say "killed $1 (pid $pid)"
  else
    say "$1 is not running"
  fi
  rm -f "$(pidfile "$1")"
}

# --- the API ---------------------------------------------------------------------------------

admin_key() { cat "$BASE/c1/state/admin.key"; }
ca_file() { echo "$BASE/c1/state/cluster.crt"; }

# A root-only file with the admin key's header, so the key never shows on a command line.
auth_header() {
  local f=$RUN/auth-header key
  if [ ! -s "$f" ]; then
    key=$(admin_key 2>/dev/null) && [ -n "$key" ] || return 1
    mkdir -p "$RUN"
    (umask 077 && echo "Authorization: Bearer $key" >"$f")
  fi
  echo "$f"
}

# api METHOD PATH [BODY]: tries every controller in turn; prints the JSON envelope.
api() {
  local method=$1 path=$2 body=${3:-} c out
  for c in "${CONTROLLERS[@]}"; do
    if out=$(curl -sS --max-time 5 --cacert "$(ca_file)" -H "@$(auth_header)" \
        -H 'Content-Type: application/json' -X "$method" ${body:+--data "$body"} \
        "https://$(api_of "$c")$path" 2>/dev/null) && [ -n "$out" ]; then
      if [ "$(jq -r '.type // empty' <<<"$out")" = error ] && [ "$(jq -r '.error_code // 0' <<<"$out")" = 503 ]; then
        continue
      fi
      echo "$out"; return 0
    fi
  done
  return 1
}

# token KIND NAME: a join token from the cluster (KIND: join-tokens or controller-tokens).
token() {
  local out tok
  out=$(api POST "/1.0/cluster/$1" "{\"name\":\"$2\"}") || die "no controller answered the $1 request for $2"
  tok=$(jq -r '.metadata.token // empty' <<<"$out")
  [ -n "$tok" ] || die "the cluster refused a token for $2: $(jq -r '.error // .' <<<"$out")"
  echo "$tok"
}

cluster_json() { api GET /1.0/cluster | jq -c '.metadata // empty'; }

# wait_until SECONDS WHAT COMMAND...
wait_until() {
  local secs=$1; shift 2  # $2 names what is awaited, for readers
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      return 1
    fi
    sleep 0.5
  done
}

controllers_ready() { # N: N voting controllers (the leader among them), exactly one leader
  local j; j=$(cluster_json) || return 1
  [ "$(jq '[.controllers[] | select(.role == "leader" or .role == "voter")] | length' <<<"$j")" -ge "$1" ] &&
    [ "$(jq '[.controllers[] | select(.role == "leader")] | length' <<<"$j")" = 1 ]
}

nodes_online() { # N
  local j; j=$(cluster_json) || return 1
  [ "$(jq '[.nodes[] | select((.status | ascii_downcase) == "online")] | length' <<<"$j")" -ge "$1" ]
}

fail_up() {
  printf 'cluster.sh: %s\n' "$1" >&2
  printf '  logs: %s/<name>.log (' "$LOGS" >&2
  ls "$LOGS" 2>/dev/null | tr '\n' ' ' >&2
  printf ')\n  clean up with: %s down\n' "$0" >&2
  exit 1
}

# --- network ---------------------------------------------------------------------------------

net_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_IP/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  # Members reach the outside (the Debian mirror for image builds) through the host.
  if [ "$(sysctl -n net.ipv4.ip_forward)" != 1 ]; then
    mkdir -p "$RUN" && echo 0 >"$RUN/ip_forward.orig"
    sysctl -qw net.ipv4.ip_forward=1
  fi
  nft delete table ip "$NFT_TABLE" 2>/dev/null || true
  nft -f - <<EOF
table ip $NFT_TABLE {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr $NET.0/24 oifname != "$BRIDGE" masquerade
  }
}
EOF
  local m ns
  for m in "${MEMBERS[@]}"; do
    ns=$(ns_of "$m")
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip link show "$(veth_of "$m")" >/dev/null 2>&1; then
      ip link add "$(veth_of "$m")" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$(veth_of "$m")" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "$(addr_of "$m")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route replace default via "$HOST_IP"
  done
  # Instances on different agents reach each other through the host.
  for m in "${NODES[@]}"; do
    ip route replace "$(instance_net_of "$m").0/22" via "$(addr_of "$m")" dev "$BRIDGE"
  done
}

# --- configs ---------------------------------------------------------------------------------

write_configs() {
  local m i
  mkdir -p "$BASE" "$LOGS" "$CONF"
  chmod 0711 "$BASE"  # unprivileged instances traverse it to reach their root filesystems
  for m in "${CONTROLLERS[@]}"; do
    i=$(index_of "$m")
    mkdir -p "$BASE/$m"
    cat >"$BASE/$m/berthd.toml" <<EOF
# $m of the dev cluster (deploy/cluster.sh)
name = "$m"
state_dir = "$BASE/$m/state"
api_listen = "$(addr_of "$m"):$API_PORT"
peer_listen = "$(addr_of "$m"):$PEER_PORT"
EOF
    # Only the first controller bootstraps with a fixed id; the others get theirs at join.
    if [ "$i" = 1 ]; then echo 'node_id = 1' >>"$BASE/$m/berthd.toml"; fi
    if [ -n "$OFFLINE" ]; then echo "offline_threshold = $OFFLINE" >>"$BASE/$m/berthd.toml"; fi
  done
  for m in "${NODES[@]}"; do
    i=$(index_of "$m")
    mkdir -p "$BASE/$m" "$BASE/$m/images"
    chmod 0711 "$BASE/$m"
    cat >"$BASE/$m/agent.toml" <<EOF
# $m of the dev cluster (deploy/cluster.sh)
name = "$m"
state_dir = "$BASE/$m/state"
run_dir = "$BASE/$m/run"
listen = "$(addr_of "$m"):$AGENT_PORT"

[labels]
rack = "r$i"

[runtime]
lxcfs_dir = "$BASE/$m/lxcfs"
# Agents on one host must not share cgroups (instance names repeat across nodes).
cgroup_tag = "$(tag_of "$m")"
# 1000 instances' worth of host ids each, above the host's /etc/subuid ranges.
idmap_start = $((200000000 + (i - 1) * 65536000))
idmap_size = 65536000

[storage]
driver = "btrfs"
loop_file = "$BASE/$m/disk.img"
loop_size = "$LOOP_SIZE"
mount = "$BASE/$m/pool"

[network]
bridge = "berthbr0"
ipv4_cidr = "$(instance_net_of "$m").1/22"
nat = true

[images]
cache_dir = "$BASE/$m/images"
EOF
    # A debian rootfs tarball the host already built saves each agent a debootstrap.
    local t
    for t in /var/cache/berth/images/debian-12-*.tar; do
      [ -f "$t" ] && ln -f "$t" "$BASE/$m/images/" 2>/dev/null || true
    done
  done
}

write_cli_config() {
  local urls="" c first=""
  install -m 0600 "$BASE/c1/state/admin.key" "$CONF/admin.key"
  install -m 0644 "$BASE/c1/state/cluster.crt" "$CONF/ca.pem"
  for c in "${CONTROLLERS[@]}"; do
    if [ -z "$first" ]; then first="https://$(api_of "$c")"; else urls="$urls${urls:+, }\"https://$(api_of "$c")\""; fi
  done
  {
    echo 'default-remote = "dev"'
    echo
    echo '[remotes.dev]'
    echo "url = \"$first\""
    [ -n "$urls" ] && echo "addresses = [$urls]"
    echo "key-file = \"$CONF/admin.key\""
    echo "ca-file = \"$CONF/ca.pem\""
  } >"$CONF/config.toml"
  chmod 0700 "$CONF"
}

print_env() {
  echo "export BERTH_CONF=$CONF"
  echo "export PATH=$BIN:\$PATH"
}

# --- commands --------------------------------------------------------------------------------

cmd_up() {
  need_root; need_tools
  BIN=$(find_bin)
  local m running=0
  for m in "${MEMBERS[@]}"; do member_pid "$m" >/dev/null && running=$((running + 1)); done
  if [ -f "$BASE/.up" ] && [ "$running" = "${#MEMBERS[@]}" ]; then
    say "the dev cluster is already up"
    print_env; return 0
  fi
  if [ -f "$BASE/.up" ]; then
    local stopped=()
    for m in "${MEMBERS[@]}"; do member_pid "$m" >/dev/null || stopped+=("$m"); done
    die "the dev cluster is up but ${stopped[*]} stopped: \`$0 start NAME\` for each (or \`$0 down\`, then \`$0 up\` for a fresh one)"
  fi
  [ -e "$BASE" ] && die "$BASE exists (a cluster left from an earlier run?): \`$0 down\` first"
  say "binaries from $BIN"
  # The marker first: whatever a failed `up` leaves, `down` can then clean up.
  mkdir -p "$BASE"
  write_marker
  net_up
  write_configs

  say "bootstrapping ${CONTROLLERS[0]} at $(api_of "${CONTROLLERS[0]}")"
  start_member "${CONTROLLERS[0]}"
  wait_until 60 "the first controller" test -s "$BASE/c1/state/admin.key" ||
    fail_up "c1 did not bootstrap within 60 s"
  wait_until 60 "the first controller" controllers_ready 1 ||
    fail_up "c1's API does not answer at $(api_of c1)"

  local n=1 tok
  for m in "${CONTROLLERS[@]:1}"; do
    n=$((n + 1))
    say "joining $m"
    tok=$(token controller-tokens "$m")
    JOIN_TOKEN=$tok start_member "$m" --join "$(api_of c1)"
    wait_until 60 "$m" controllers_ready "$n" ||
      fail_up "$m did not join within 60 s (the cluster shows $(cluster_json | jq -r '[.controllers[].name] | join(",")' 2>/dev/null))"
  done

  for m in "${NODES[@]}"; do
    say "joining agent $m"
    tok=$(token join-tokens "$m")
    (umask 077 && echo "$tok" >"$BASE/$m/join-token")
    start_member "$m" --join-token-file "$BASE/$m/join-token"
  done
  say "waiting for ${#CONTROLLERS[@]} controllers and ${#NODES[@]} online nodes (up to $WAIT s)"
  wait_until "$WAIT" "the cluster" nodes_online "${#NODES[@]}" ||
    fail_up "not every node came online within $WAIT s ($(cluster_json | jq -r '[.nodes[] | "\(.name)=\(.status)"] | join(" ")' 2>/dev/null))"
  wait_until 30 "the controllers" controllers_ready "${#CONTROLLERS[@]}" ||
    fail_up "the cluster does not show ${#CONTROLLERS[@]} controllers with one leader"
  for m in "${NODES[@]}"; do rm -f "$BASE/$m/join-token"; done
  for m in "${MEMBERS[@]}"; do
    member_pid "$m" >/dev/null || fail_up "$m stopped; see $(log_of "$m")"
  done

  write_cli_config
  touch "$BASE/.up"
  cmd_status
  say "the dev cluster is up; for the CLI:"
  print_env
}

# up, cut (administratively down) or none.
link_state() {
  local flags
  flags=$(ip -o link show "$1" 2>/dev/null | sed -n 's/^[^<]*<\([^>]*\)>.*/\1/p')
  if [ -z "$flags" ]; then echo none; return; fi
  case ",$flags," in
    *,UP,*) echo up ;;
    *) echo cut ;;
  esac
}

cmd_status() {
  local m pid link state
  BIN=${BIN:-$(find_bin 2>/dev/null || echo "?")}
  printf '%-4s %-10s %-22s %-8s %-8s %s\n' NAME ROLE ADDRESS PID LINK LOG
  for m in "${MEMBERS[@]}"; do
    pid=$(member_pid "$m" || echo -)
    link=$(link_state "$(veth_of "$m")")
    if is_controller "$m"; then state=controller; else state=agent; fi
    printf '%-4s %-10s %-22s %-8s %-8s %s\n' "$m" "$state" \
      "$(addr_of "$m"):$(is_controller "$m" && echo $API_PORT || echo $AGENT_PORT)" "$pid" "$link" "$(log_of "$m")"
  done
  local j
  if [ -f "$BASE/c1/state/admin.key" ] && j=$(cluster_json) && [ -n "$j" ]; then
    echo
    echo "cluster (as $(jq -r '.answered_by' <<<"$j") sees it):"
    jq -r '.controllers[] | "  controller \(.name)  \(.role)  \(.state)  api \(.api_address)  peer \(.peer_address)"' <<<"$j"
    jq -r '.nodes[] | "  node \(.name)  \(.status)  instances \(.instances)  labels \(.labels | to_entries | map("\(.key)=\(.value)") | join(","))"' <<<"$j"
  else
    echo
    echo "no controller answers"
  fi
}

# Runs a command in a member's network namespace (e.g. to ask a cut-off controller).
cmd_exec() {
  need_root; is_member "$1" || die "unknown member $1 (one of: ${MEMBERS[*]})"
  local name=$1; shift
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || die "exec needs a command"
  exec nsenter --net="/run/netns/$(ns_of "$name")" -- "$@"
}

cmd_kill() { need_root; is_member "$1" || die "unknown member $1 (one of: ${MEMBERS[*]})"; kill_member "$1"; }

cmd_start() {
  need_root; is_member "$1" || die "unknown member $1 (one of: ${MEMBERS[*]})"
  BIN=$(find_bin)
  [ -e "/run/netns/$(ns_of "$1")" ] || die "no network namespace $(ns_of "$1"): is the dev cluster up?"
  if pid=$(member_pid "$1"); then say "$1 already runs (pid $pid)"; return 0; fi
  start_member "$1"
  say "started $1 (pid $(member_pid "$1"))"
}

cmd_cut() {
  need_root; is_member "$1" || die "unknown member $1 (one of: ${MEMBERS[*]})"
  ip link set "$(veth_of "$1")" down
  say "cut $1 off the network"
}

cmd_heal() {
  need_root; is_member "$1" || die "unknown member $1 (one of: ${MEMBERS[*]})"
  ip link set "$(veth_of "$1")" up
  say "healed $1"
}

# Kills an instance's whole pid namespace through its init, when the recorded pid still is it.
kill_instance_init() {
  local f=$1 pid start now
  [ -f "$f" ] || return 0
  read -r pid start <"$f" || return 0
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 0
  now=$(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $20}')
  [ "$now" = "$start" ] && kill -9 "$pid" 2>/dev/null || true
}

# The cgroup tag of node $1's agent: dev-n1, dev-n2, ... (dev-<prefix>n1 with a prefix), so
# the agents of this cluster, of another one and the host's own never share a cgroup.
tag_of() { echo "dev-$PREFIX$1"; }

# The first component of node $1's cgroup names: berth-<its agent.toml's cgroup_tag>, or
# berth for the untagged agents an older cluster.sh configured.
cgroup_prefix_of() {
  local t
  t=$(sed -n 's/^cgroup_tag = "\([a-z0-9-]*\)"$/\1/p' "$BASE/$1/agent.toml" 2>/dev/null | head -n1)
  if [ -n "$t" ]; then echo "berth-$t"; else echo "berth"; fi
}

# Kills what runs in cgroup dirs $@ and removes them, deepest first.
remove_cgroup_dirs() {
  local d
  for d in "$@"; do
    [ -d "$d" ] || continue
    # shellcheck disable=SC2038  # cgroup.procs holds pids only
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}

# Removes the cgroups (payload, monitor and the monitors' shared one, in every hierarchy) of
# node $1's agent: all those with its tag; for an untagged agent of an older cluster.sh only those of its instances
# (names $2...), and none the host's own agent has an instance of that name for.
remove_node_cgroups() {
  local m=$1 p h name
  shift
  p=$(cgroup_prefix_of "$m")
  for h in /sys/fs/cgroup /sys/fs/cgroup/*; do
    if [ "$p" != berth ]; then
      remove_cgroup_dirs "$h/$p".payload.* "$h/$p".monitor.* "$h/$p".monitors
      continue
    fi
    for name in "$@"; do
      [ -e "/var/lib/berth/agent/instances/$name" ] && continue
      remove_cgroup_dirs "$h/berth.payload.$name" "$h/berth.monitor.$name"
    done
  done
}

# Whether $BASE looks like a dev cluster an older cluster.sh made (no marker yet): c1's
# config with the header this script writes.
legacy_base() {
  [ -f "$BASE/c1/berthd.toml" ] && head -n1 "$BASE/c1/berthd.toml" | grep -qx '# c1 of the dev cluster (deploy/cluster.sh)'
}

cmd_down() {
  need_root
  local m pids pid failed=()
  if [ ! -e "$BASE" ]; then
    # Nothing of ours without the base dir, except pid files `down` would have removed.
    if [ -d "$RUN" ] && [ -n "$(ls -A "$RUN" 2>/dev/null)" ]; then
      die "$BASE does not exist but $RUN does: not sure what it belongs to; remove it by hand"
    fi
    say "no dev cluster at $BASE: nothing to do"
    return 0
  fi
  if load_marker; then
    :
  elif legacy_base; then
    say "$BASE has no $(basename "$MARKER") (made by an older cluster.sh): using the environment's settings"
  else
    die "$BASE has no $(basename "$MARKER"): it was not made by \`$0 up\`; refusing to unmount or remove anything under it"
  fi
  # 1. Every process in the members' network namespaces: daemons, instance monitors, lxcfs,
  #    helpers (instances' own processes live in their own namespaces; see 2), and the daemons
  #    of the pid files, also when their namespace is gone.
  for m in "${MEMBERS[@]}"; do
    if pid=$(member_pid "$m"); then kill -9 "$pid" 2>/dev/null || true; fi
    if [ -e "/run/netns/$(ns_of "$m")" ]; then
      for _ in 1 2 3; do
        pids=$(ip netns pids "$(ns_of "$m")" 2>/dev/null || true)
        [ -n "$pids" ] || break
        kill -9 $pids 2>/dev/null || true
        sleep 0.2
      done
    fi
    if pid=$(member_pid "$m"); then
      for _ in $(seq 1 20); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
      [ -d "/proc/$pid" ] && failed+=("$m's daemon (pid $pid) survived SIGKILL")
    fi
    rm -f "$(pidfile "$m")"
  done
  # 2. Instances: their init (pid 1 of their pid namespace takes everything with it), then
  #    their cgroups.
  local inst name
  for inst in "$BASE"/n*/state/instances/*/; do
    [ -d "$inst" ] || continue
    kill_instance_init "$inst/init.pid"
  done
  sleep 0.3
  local node names
  for node in "$BASE"/n*/; do
    [ -f "$node/agent.toml" ] || continue
    names=()
    for inst in "$node"state/instances/*/; do
      [ -d "$inst" ] && names+=("$(basename "$inst")")
    done
    remove_node_cgroups "$(basename "$node")" ${names[@]+"${names[@]}"}
  done
  # The lxcfs cgroup the agents made, when nothing (a host agent's lxcfs) is left in it.
  rmdir /sys/fs/cgroup/*/berth.lxcfs /sys/fs/cgroup/berth.lxcfs 2>/dev/null || true
  # 3. Mounts under the base dir (pools, lxcfs, instance roots), deepest first.
  if [ -d "$BASE" ]; then
    local mounts
    for _ in 1 2 3; do
      mounts=$(awk -v b="$BASE" '$5 == b || index($5, b "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
      [ -n "$mounts" ] || break
      while read -r mp; do
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
      done <<<"$mounts"
    done
    mounts=$(awk -v b="$BASE" '$5 == b || index($5, b "/") == 1 {print $5}' /proc/self/mountinfo)
    [ -z "$mounts" ] || die "cannot unmount: $mounts"
    # 4. Loop devices of the agents' pools.
    local img dev
    for img in "$BASE"/n*/disk.img; do
      [ -f "$img" ] || continue
      for dev in $(losetup -j "$img" -O NAME -n 2>/dev/null); do
        losetup -d "$dev" || failed+=("cannot detach $dev (the pool of $(basename "$(dirname "$img")"))")
      done
    done
  fi
  # 5. Network: namespaces (their veths and nft tables go with them), bridge, host NAT.
  for m in "${MEMBERS[@]}"; do
    ip link del "$(veth_of "$m")" 2>/dev/null || true
    [ -e "/run/netns/$(ns_of "$m")" ] && ip netns del "$(ns_of "$m")" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  nft delete table ip "$NFT_TABLE" 2>/dev/null || true
  if [ -f "$RUN/ip_forward.orig" ]; then
    sysctl -qw "net.ipv4.ip_forward=$(cat "$RUN/ip_forward.orig")" || true
  fi
  # 6. Files.
  [ -d "$BASE" ] && rm -rf --one-file-system "$BASE"
  rm -rf "$RUN"
  if [ ${#failed[@]} -gt 0 ]; then
    printf 'cluster.sh: down left something behind:\n' >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
  fi
  say "the dev cluster is down"
}

usage() {
  sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

main() {
  # Every command uses the settings of the marker when there is one (`up` writes it).
  if [ -f "$MARKER" ]; then
    load_marker || die "cannot read $MARKER"
  fi
  case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) BIN=$(find_bin); print_env ;;
    kill|start|cut|heal)
      [ $# -eq 2 ] || usage
      "cmd_$1" "$2" ;;
    exec)
      [ $# -ge 3 ] || usage
      shift; cmd_exec "$@" ;;
    *) usage ;;
  esac
}

# Sourced (by a test harness), it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
