#!/usr/bin/env bash
# softhsm-token.sh DIR LABEL
#
# Creates (once) a private SoftHSM2 configuration in DIR (DIR/softhsm2.conf,
# tokens in DIR/tokens) and initializes a new token LABEL in it. Fresh random
# SO and user PINs are written to DIR/LABEL.so-pin and DIR/LABEL.pin (0600);
# they reach pkcs11-tool through the environment, never the command line.
# Prints SOFTHSM2_CONF=, MODULE=, TOKEN=, PIN_FILE=, SO_PIN_FILE= lines.
set -euo pipefail
umask 077
dir=${1:?usage: softhsm-token.sh DIR LABEL}
label=${2:?usage: softhsm-token.sh DIR LABEL}
case "$label" in *[!A-Za-z0-9._-]*|"") echo "softhsm-token: label must be [A-Za-z0-9._-]+" >&2; exit 2;; esac
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)

module=${SIGIL_PKCS11_MODULE:-}
if [ -z "$module" ]; then
	for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so; do
		[ -e "$m" ] && { module=$m; break; }
	done
fi
[ -n "$module" ] || { echo "softhsm-token: libsofthsm2.so not found (apt-get install softhsm2)" >&2; exit 1; }

conf="$dir/softhsm2.conf"
if [ ! -f "$conf" ]; then
	cat >"$conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
fi
export SOFTHSM2_CONF="$conf"

if pkcs11-tool --module "$module" -L 2>/dev/null | grep -q "token label *: $label\$"; then
	echo "softhsm-token: token $label already exists in $dir" >&2
	exit 1
fi
# SoftHSM always offers exactly one uninitialized slot; find its ID.
slot=$(pkcs11-tool --module "$module" -L | awk '
	/^Slot [0-9]+ \(0x[0-9a-f]+\)/ { id = $3; gsub(/[():]/, "", id) }
	/token state: *uninitialized/ { print id; exit }')
[ -n "$slot" ] || { echo "softhsm-token: no free slot" >&2; exit 1; }

rand_pin() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
so_pin=$(rand_pin)
pin=$(rand_pin)
printf '%s' "$so_pin" >"$dir/$label.so-pin"
printf '%s' "$pin" >"$dir/$label.pin"

SOPIN="$so_pin" pkcs11-tool --module "$module" --slot "$slot" --init-token --label "$label" --so-pin env:SOPIN >/dev/null
SOPIN="$so_pin" PIN="$pin" pkcs11-tool --module "$module" --token-label "$label" --init-pin --so-pin env:SOPIN --pin env:PIN >/dev/null

echo "SOFTHSM2_CONF=$conf"
echo "MODULE=$module"
echo "TOKEN=$label"
echo "PIN_FILE=$dir/$label.pin"
echo "SO_PIN_FILE=$dir/$label.so-pin"
