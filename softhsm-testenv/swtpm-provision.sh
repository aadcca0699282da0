#!/usr/bin/env bash
# swtpm-provision.sh DIR
#
# Manufactures a software TPM 2.0 in DIR: a fresh state (new seeds, so a new
# EK), an RSA-2048 EK and an ECC P-384 EK, each with an EK certificate signed
# by a local "manufacturer" CA that lives only in DIR/localca. Nothing touches
# the system-wide swtpm-localca state in /var/lib.
#
# Prints KEY=VALUE lines for the caller:
#   STATE_DIR      swtpm state directory
#   EK_CA_ROOT     the local CA's root certificate (plays the TPM vendor root)
#   EK_CA_ISSUER   the intermediate that signed the EK certificates
set -euo pipefail
umask 077

dir=${1:?usage: swtpm-provision.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
ca="$dir/localca"
state="$dir/state"
mkdir -p "$ca" "$state"

cat >"$ca/swtpm-localca.conf" <<CONF
statedir = $ca
signingkey = $ca/signkey.pem
issuercert = $ca/issuercert.pem
certserial = $ca/certserial
CONF
cat >"$ca/swtpm-localca.options" <<CONF
--platform-manufacturer Sigil-Test
--platform-version 2.1
--platform-model swtpm
CONF
cat >"$dir/swtpm_setup.conf" <<CONF
create_certs_tool = /usr/bin/swtpm_localca
create_certs_tool_config = $ca/swtpm-localca.conf
create_certs_tool_options = $ca/swtpm-localca.options
active_pcr_banks = sha256
CONF

# swtpm_setup chatters on stdout; keep it for debugging, print only our keys.
if ! swtpm_setup --tpm2 --tpmstate "$state" --config "$dir/swtpm_setup.conf" \
	--createek --create-ek-cert --create-platform-cert --ecc \
	--lock-nvram --overwrite --display >"$dir/swtpm_setup.log" 2>&1; then
	echo "swtpm-provision: swtpm_setup failed, see $dir/swtpm_setup.log" >&2
	tail -n 20 "$dir/swtpm_setup.log" >&2
	exit 1
fi
for f in "$ca/swtpm-localca-rootca-cert.pem" "$ca/issuercert.pem"; do
	[ -s "$f" ] || { echo "swtpm-provision: $f was not created" >&2; exit 1; }
done
echo "STATE_DIR=$state"
echo "EK_CA_ROOT=$ca/swtpm-localca-rootca-cert.pem"
echo "EK_CA_ISSUER=$ca/issuercert.pem"
