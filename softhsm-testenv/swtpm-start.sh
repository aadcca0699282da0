#!/usr/bin/env bash
# swtpm-start.sh DIR
#
# Starts the software TPM that swtpm-provision.sh manufactured in DIR, as a
# daemon serving TPM commands on DIR/tpm.sock (control channel DIR/tpm.sock.ctrl,
# the name tpm2-tools' swtpm TCTI expects). Waits until the socket answers.
# Prints SOCKET=, CTRL_SOCKET= and PID= lines.
#
# With SWTPM_FOREGROUND=1 it execs swtpm in the foreground instead (no
# daemon, no output): test harnesses use this so that swtpm is their child
# and dies with them.
set -euo pipefail
dir=${1:?usage: swtpm-start.sh DIR}
dir=$(cd "$dir" && pwd)
sock="$dir/tpm.sock"
pidfile="$dir/swtpm.pid"
[ -d "$dir/state" ] || { echo "swtpm-start: $dir/state missing; run swtpm-provision.sh first" >&2; exit 1; }
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
	echo "swtpm-start: already running as pid $(cat "$pidfile")" >&2
	exit 1
fi
rm -f "$sock" "$sock.ctrl" "$pidfile"
args=(socket --tpm2 \
	--server "type=unixio,path=$sock" \
	--ctrl "type=unixio,path=$sock.ctrl" \
	--tpmstate "dir=$dir/state" \
	--flags not-need-init,startup-clear \
	--log "file=$dir/swtpm.log,level=1" \
	--pid "file=$pidfile")
if [ "${SWTPM_FOREGROUND:-}" = 1 ]; then
	exec swtpm "${args[@]}"
fi
swtpm "${args[@]}" --daemon
for _ in $(seq 1 100); do
	[ -S "$sock" ] && [ -s "$pidfile" ] && break
	sleep 0.05
done
[ -S "$sock" ] || { echo "swtpm-start: $sock did not appear, see $dir/swtpm.log" >&2; exit 1; }
echo "SOCKET=$sock"
echo "CTRL_SOCKET=$sock.ctrl"
echo "PID=$(cat "$pidfile")"
