#!/usr/bin/env bash
# swtpm-stop.sh DIR: stops the swtpm that swtpm-start.sh started in DIR.
set -euo pipefail
dir=${1:?usage: swtpm-stop.sh DIR}
pidfile="$dir/swtpm.pid"
[ -s "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
if kill "$pid" 2>/dev/null; then
	for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
	kill -9 "$pid" 2>/dev/null || true
fi
rm -f "$pidfile"
