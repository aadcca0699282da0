#!/usr/bin/env bash
# Stops what demo.sh started (CI issuer, agent, nodes, swtpm), leaving the directory
# for inspection; the next demo run replaces it.
set -uo pipefail
demo=${SIGIL_DEMO_DIR:-/var/tmp/sigil-demo}
[ -d "$demo" ] || { echo "no demo in $demo"; exit 0; }
for p in ci-issuer agent sigild-3 sigild-2 sigild-1 swtpm; do
	f="$demo/$p.pid"
	[ -s "$f" ] || continue
	pid=$(cat "$f")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid"
		for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
		echo "stopped $p (pid $pid)"
	fi
	rm -f "$f"
done
echo "demo stopped; files remain in $demo"
