#!/usr/bin/env bash
# Berth quickstart: a working single-node cluster on this host, in one command.
#
#   deploy/quickstart.sh        build, install and start berthd + berth-agent, bootstrap the
#                               cluster, configure the CLI, build the busybox image, launch demo1
#   deploy/quickstart.sh down   stop the daemons (instances keep their state and come back
#                               with the next quickstart)
#
# Safe to run again: it finds the running cluster and only does what is missing.
# Needs: root, Debian 12 or Ubuntu 22.04+, a Rust toolchain (cargo).
set -euo pipefail

PREFIX=${PREFIX:-/usr/local/bin}
STATE=/var/lib/berth
LOGS=/var/log/berth
RUN=/run/berth
ETC=/etc/berth
CLUSTER_DIR=$STATE/controller
API=https://127.0.0.1:8443
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

have_systemd() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }

daemon_pid() { # name -> pid if that daemon runs (not merely some process with a reused pid)
  local f=$RUN/$1.pid pid exe
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}  # the binary was replaced since
  [ "${exe##*/}" = "$1" ] && echo "$pid"
}

stop_daemons() {
  if have_systemd && systemctl list-unit-files berthd.service >/dev/null 2>&1; then
    systemctl stop berth-agent berthd 2>/dev/null || true
    return
  fi
  for d in berth-agent berthd; do
    if pid=$(daemon_pid $d); then
      say "stopping $d (pid $pid)"
      kill "$pid"
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN/$d.pid"
  done
}

case "${1:-up}" in
  down) [ "$(id -u)" = 0 ] || die "run me as root"; stop_daemons; say "stopped; instances keep their state"; exit 0 ;;
  up) ;;
  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || die "run me as root (Berth manages namespaces, cgroups, btrfs and bridges)"

# 1. Host packages: what Berth runs on, what building it needs (a C compiler and linker), and
#    what the test command (`make test`) uses.
PKGS="btrfs-progs busybox-static debootstrap debian-archive-keyring lxcfs nftables iproute2 util-linux tar xz-utils ca-certificates
      gcc libc6-dev make curl iputils-ping procps"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  # shellcheck disable=SC2086
  apt-get -o DPkg::Lock::Timeout=600 install -y -q $missing
fi

# 2. Build.
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
RUSTUP_HINT="install one with rustup (see https://rustup.rs: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh), then run me again"
command -v cargo >/dev/null 2>&1 || die "no Rust toolchain found: $RUSTUP_HINT"
minor=$(cargo --version | sed -n 's/^cargo 1\.\([0-9]*\).*/\1/p')
[ "${minor:-0}" -ge 89 ] || die "Berth needs Rust 1.89 or newer, this is $(cargo --version): $RUSTUP_HINT"
say "building release binaries (the first build takes several minutes)"
(cd "$REPO" && cargo build --release --workspace --bins)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}/release

changed=0
for b in berthd berth-agent berth; do
  if ! cmp -s "$TARGET/$b" "$PREFIX/$b"; then
    install -m 0755 "$TARGET/$b" "$PREFIX/$b.new" && mv -f "$PREFIX/$b.new" "$PREFIX/$b"
    changed=1
  fi
done

# Where a daemon's log is: the journal under systemd, else a file in $LOGS.
log_of() {
  if have_systemd; then echo "journalctl -u $1"; else echo "$LOGS/$1.log"; fi
}

# 3. Start the daemons (restart them when the binaries changed; instances keep running).
mkdir -p "$STATE" "$LOGS" "$RUN" "$ETC"   # $ETC: berthd.toml / agent.toml, read when present
chmod 0711 "$STATE"   # instances (unprivileged) must traverse it to reach their root filesystem
if have_systemd; then
  install -m 0644 "$REPO/deploy/systemd/berthd.service" /etc/systemd/system/berthd.service
  install -m 0644 "$REPO/deploy/systemd/berth-agent.service" /etc/systemd/system/berth-agent.service
  systemctl daemon-reload
  systemctl enable berthd
  if [ "$changed" = 1 ]; then systemctl restart berthd; else systemctl start berthd; fi
else
  if pid=$(daemon_pid berthd) && [ "$changed" = 1 ]; then stop_daemons; fi
  if ! daemon_pid berthd >/dev/null; then
    say "starting berthd (log: $LOGS/berthd.log)"
    setsid "$PREFIX/berthd" >>"$LOGS/berthd.log" 2>&1 < /dev/null &
    echo $! > "$RUN/berthd.pid"
  fi
fi

say "waiting for the API"
for _ in $(seq 1 300); do
  [ -s "$CLUSTER_DIR/cluster.crt" ] && [ -s "$CLUSTER_DIR/admin.key" ] && \
    (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null && break
  sleep 0.1
done
[ -s "$CLUSTER_DIR/admin.key" ] || die "berthd did not come up; see $(log_of berthd)"

JOIN=()
[ -f "$STATE/agent/tls/agent.crt" ] || JOIN=(--join-token-file "$CLUSTER_DIR/join-token")
if have_systemd; then
  if [ ${#JOIN[@]} -gt 0 ]; then "$PREFIX/berth-agent" join --join-token-file "$CLUSTER_DIR/join-token"; fi
  systemctl enable berth-agent
  if [ "$changed" = 1 ]; then systemctl restart berth-agent; else systemctl start berth-agent; fi
else
  if ! daemon_pid berth-agent >/dev/null; then
    say "starting berth-agent (log: $LOGS/berth-agent.log)"
    setsid "$PREFIX/berth-agent" "${JOIN[@]}" >>"$LOGS/berth-agent.log" 2>&1 < /dev/null &
    echo $! > "$RUN/berth-agent.pid"
  fi
fi

# 4. The CLI's default remote.
CONF=${BERTH_CONF:-$HOME/.config/berth}
mkdir -p "$CONF" && chmod 0700 "$CONF"
install -m 0600 "$CLUSTER_DIR/admin.key" "$CONF/local.key"
install -m 0644 "$CLUSTER_DIR/cluster.crt" "$CONF/local-ca.pem"
if ! "$PREFIX/berth" remote list 2>/dev/null | grep -q '\blocal\b'; then
  "$PREFIX/berth" remote add local "$API" --key-file "$CONF/local.key" --ca-file "$CONF/local-ca.pem"
fi
"$PREFIX/berth" remote switch local >/dev/null

say "waiting for the node to join"
joined=0
for _ in $(seq 1 300); do
  if "$PREFIX/berth" cluster list -f csv 2>/dev/null | grep -q "^node,[^,]*,ONLINE"; then joined=1; break; fi
  sleep 0.2
done
[ "$joined" = 1 ] || die "the node did not join within a minute; see $(log_of berth-agent)"

# 5. An image and an instance.
if ! "$PREFIX/berth" image info busybox >/dev/null 2>&1; then
  say "building the busybox image"
  "$PREFIX/berth" image build busybox
fi
if ! "$PREFIX/berth" info demo1 >/dev/null 2>&1; then
  say "launching demo1"
  "$PREFIX/berth" launch busybox demo1
elif ! "$PREFIX/berth" info demo1 | grep -q 'Status: *Running'; then
  "$PREFIX/berth" start demo1
fi

say "berth exec demo1 -- uname -a"
"$PREFIX/berth" exec demo1 -- uname -a
cat <<MSG

Berth is running. Try:
  berth list
  berth exec demo1 -- sh
  berth image build debian/12 && berth launch debian/12 d1
Logs: $(log_of berthd), $(log_of berth-agent)
State: $STATE   Stop: $0 down
MSG
