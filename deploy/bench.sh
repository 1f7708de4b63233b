#!/usr/bin/env bash
# Basic lifecycle figures for a running Berth (and, with --lxd, the same on LXD if installed).
# Prints medians of N runs (default 5) in milliseconds. Needs a working `berth` remote with the
# busybox image (and debian/12 for the debian figures: built if missing).
#
#   deploy/bench.sh [-n RUNS] [--lxd]
set -euo pipefail
RUNS=5
LXD=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) RUNS=$2; shift 2 ;;
    --lxd) LXD=1; shift ;;
    *) echo "usage: $0 [-n RUNS] [--lxd]" >&2; exit 2 ;;
  esac
done

ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }

# $1 = tool (berth|lxc), $2 = image, $3 = name prefix, $4 = "ready" check command
bench_tool() {
  local tool=$1 image=$2 prefix=$3 kind=$4
  local launch=() exec=() stop=() del=()
  for i in $(seq 1 "$RUNS"); do
    local n="$prefix$i" t0 t1
    t0=$(ms)
    $tool launch "$image" "$n" >/dev/null
    if [ "$kind" = systemd ]; then
      until [ "$($tool exec "$n" -- systemctl is-system-running 2>/dev/null)" = running ]; do sleep 0.05; done
    else
      until $tool exec "$n" -- true >/dev/null 2>&1; do sleep 0.02; done
    fi
    t1=$(ms); launch+=($((t1 - t0)))
    t0=$(ms); $tool exec "$n" -- true; t1=$(ms); exec+=($((t1 - t0)))
    t0=$(ms); $tool stop "$n" >/dev/null; t1=$(ms); stop+=($((t1 - t0)))
    t0=$(ms); $tool delete "$n" >/dev/null; t1=$(ms); del+=($((t1 - t0)))
  done
  printf '%-6s %-10s launch→ready %6s ms   exec true %5s ms   stop %6s ms   delete %5s ms\n' \
    "$tool" "$image" \
    "$(printf '%s\n' "${launch[@]}" | median)" "$(printf '%s\n' "${exec[@]}" | median)" \
    "$(printf '%s\n' "${stop[@]}" | median)" "$(printf '%s\n' "${del[@]}" | median)"
}

berth image info busybox >/dev/null 2>&1 || berth image build busybox >/dev/null
berth image info debian/12 >/dev/null 2>&1 || berth image build debian/12 >/dev/null
echo "medians of $RUNS runs; ready = first successful exec (busybox) or systemd 'running' (debian)"
bench_tool berth busybox bbench- busybox
bench_tool berth debian/12 dbench- systemd
if [ "$LXD" = 1 ]; then
  command -v lxc >/dev/null || { echo "lxc is not installed" >&2; exit 1; }
  bench_tool lxc debian12 ldbench- systemd
fi
