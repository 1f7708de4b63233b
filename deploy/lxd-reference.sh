#!/usr/bin/env bash
# LXD as the reference Berth's benchmarks compare with: Debian's `lxd` package (5.0.x) with a
# btrfs pool on a loop file and its own bridge, set up the same way on any Debian 12 machine.
#
#   deploy/lxd-reference.sh [up]   install what is missing, start lxcfs and lxd, initialise LXD
#                                  (storage pool "default": btrfs on a loop file; bridge lxdbr0)
#   deploy/lxd-reference.sh down   stop LXD (its instances stop with it) and lxcfs (unless a
#                                  Berth agent runs: it uses that lxcfs too), and remove
#                                  its bridge and nft table from the host (LXD makes them again)
#   deploy/lxd-reference.sh status say what runs
#
# Where PID 1 is systemd the package's units start the daemons; elsewhere (containers, CI
# sandboxes) this script starts them by hand the way the units would: `lxcfs /var/lib/lxcfs`,
# then `lxd --group lxd`, logging to /var/log/lxd-reference/. Safe to run again.
#
# Environment: LXD_POOL_SIZE (default 20GiB), LXD_BRIDGE_NET (default 10.213.0.1/22: room for
# the 1000-instance density run; DHCP hands out the whole range).
set -euo pipefail

POOL_SIZE=${LXD_POOL_SIZE:-20GiB}
BRIDGE_NET=${LXD_BRIDGE_NET:-10.213.0.1/22}
LOGS=/var/log/lxd-reference
LXCFS_DIR=/var/lib/lxcfs

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'lxd-reference: %s\n' "$*" >&2; exit 1; }
have_systemd() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }
lxd_up() { lxc query /1.0 >/dev/null 2>&1; }
lxcfs_up() { grep -q " $LXCFS_DIR fuse.lxcfs " /proc/mounts; }
# The lxcfs serving $LXCFS_DIR (not one a Berth agent runs on its own directory).
lxcfs_pid() { pgrep -f "^lxcfs $LXCFS_DIR\$"; }

down() {
  if have_systemd; then
    # lxcfs.service stays: it is the host's, and Berth's agents use it too.
    systemctl stop lxd.service lxd.socket 2>/dev/null || true
    return
  fi
  if pgrep -x lxd >/dev/null; then
    say "stopping lxd (its instances stop with it)"
    # `lxd shutdown` stops every instance cleanly (up to its timeout), then the daemon.
    timeout 300 lxd shutdown --timeout 240 || pkill -x lxd || true
    for _ in $(seq 1 100); do pgrep -x lxd >/dev/null || break; sleep 0.1; done
    pkill -9 -x lxd 2>/dev/null || true
  fi
  pkill -f 'dnsmasq.*lxdbr0' 2>/dev/null || true
  # What LXD leaves on the host when it stops; it makes both again when it starts.
  ip link del lxdbr0 2>/dev/null || true
  nft delete table inet lxd 2>/dev/null || true
  if lxcfs_pid >/dev/null; then
    if pgrep -x berth-agent >/dev/null; then
      # Berth's agents use the lxcfs on $LXCFS_DIR when there is one: their instances' /proc
      # views would go with it.
      say "leaving lxcfs on $LXCFS_DIR running: berth-agent uses it too"
    else
      say "stopping lxcfs"
      pkill -f "^lxcfs $LXCFS_DIR\$" || true
      for _ in $(seq 1 50); do lxcfs_up || break; sleep 0.1; done
      lxcfs_up && { fusermount -u "$LXCFS_DIR" 2>/dev/null || umount -l "$LXCFS_DIR" || true; }
    fi
  fi
  return 0
}

status() {
  if lxcfs_pid >/dev/null && lxcfs_up; then echo "lxcfs: running"; else echo "lxcfs: stopped"; fi
  if lxd_up; then
    echo "lxd: running, $(lxc query /1.0 | sed -n 's/.*"server_version": *"\([^"]*\)".*/\1/p' | head -1)"
    lxc storage list --format csv 2>/dev/null | sed 's/^/pool: /'
    echo "instances: $(lxc list --format csv -c n | wc -l)"
  else
    echo "lxd: stopped"
  fi
}

case "${1:-up}" in
  up) ;;
  down) [ "$(id -u)" = 0 ] || die "run me as root"; down; exit 0 ;;
  status) status; exit 0 ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || die "run me as root (LXD needs it to manage containers, btrfs and bridges)"

# 1. Packages: LXD, lxcfs (its /proc views), nftables (LXD's firewall driver), btrfs-progs,
#    and sysbench (the CPU scenario runs it on the host and inside).
PKGS="lxd lxd-client lxcfs nftables btrfs-progs sysbench dnsmasq-base"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  # shellcheck disable=SC2086
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends $missing
fi

# 2. Daemons.
if have_systemd; then
  systemctl start lxcfs.service lxd.socket lxd.service
else
  mkdir -p "$LOGS" "$LXCFS_DIR"
  if ! lxcfs_up; then
    pkill -f "^lxcfs $LXCFS_DIR\$" 2>/dev/null || true
    say "starting lxcfs on $LXCFS_DIR (log: $LOGS/lxcfs.log)"
    setsid lxcfs "$LXCFS_DIR" >>"$LOGS/lxcfs.log" 2>&1 </dev/null &
    for _ in $(seq 1 50); do lxcfs_up && break; sleep 0.1; done
    lxcfs_up || die "lxcfs did not mount $LXCFS_DIR; see $LOGS/lxcfs.log"
  fi
  if ! lxd_up && ! pgrep -x lxd >/dev/null; then
    getent group lxd >/dev/null || groupadd --system lxd
    say "starting lxd (log: $LOGS/lxd.log)"
    # The package's unit runs exactly this; LXD finds lxcfs by its mount.
    setsid lxd --group lxd --logfile "$LOGS/lxd.log" >>"$LOGS/lxd.out" 2>&1 </dev/null &
  fi
fi
timeout 120 lxd waitready || die "lxd did not become ready in 120 s; see $LOGS/lxd.log"

# 3. Initialise once: a btrfs pool on a loop file, a NAT bridge, and the default profile using
#    both (what `lxd init --auto --storage-backend btrfs` gives, with the sizes set here).
if ! lxc storage show default >/dev/null 2>&1; then
  say "initialising LXD: btrfs pool 'default' ($POOL_SIZE loop file), bridge lxdbr0 ($BRIDGE_NET)"
  lxd init --preseed <<EOF
config: {}
networks:
- name: lxdbr0
  type: bridge
  config:
    ipv4.address: $BRIDGE_NET
    ipv4.nat: "true"
    ipv6.address: none
storage_pools:
- name: default
  driver: btrfs
  config:
    size: $POOL_SIZE
profiles:
- name: default
  devices:
    root:
      path: /
      pool: default
      type: disk
    eth0:
      name: eth0
      network: lxdbr0
      type: nic
EOF
elif ! lxc storage show default | grep -qx 'driver: btrfs'; then
  die "LXD's storage pool 'default' is not btrfs: the comparison needs btrfs on both sides (delete the pool, or use a fresh LXD)"
elif ! lxc network show lxdbr0 >/dev/null 2>&1; then
  say "creating bridge lxdbr0 ($BRIDGE_NET)"
  lxc network create lxdbr0 ipv4.address="$BRIDGE_NET" ipv4.nat=true ipv6.address=none
  lxc profile device add default eth0 nic network=lxdbr0 name=eth0 2>/dev/null || true
elif [ "$(lxc network get lxdbr0 ipv4.address)" != "$BRIDGE_NET" ]; then
  say "setting lxdbr0's address to $BRIDGE_NET"
  lxc network set lxdbr0 ipv4.address="$BRIDGE_NET"
fi
status
