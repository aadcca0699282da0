#!/usr/bin/env bash
# packaging/demo/demo.sh: the whole of Sigil on one machine, in one
# directory ($SIGIL_DEMO_DIR, default /var/tmp/sigil-demo):
#   SoftHSM tokens -> key ceremony (root + three node issuing CAs)
#   -> three sigild nodes on loopback -> an entry -> an swtpm
#   -> sigil-agent joined by TPM attestation -> a workload (uid 65534)
#   fetching its X.509-SVID and a JWT-SVID over the Workload API
#   -> node-3 killed and restarted with the command printed at the end.
# Run as root on Debian: `make demo` (installs the packages it needs first).
# Stop with `make demo-stop`; running it again starts from scratch.
#
# Nothing a node needs comes from this script's environment: each node's
# sigild.yaml and its environment file (node-N.env: SOFTHSM2_CONF, in the
# KEY=value form of systemd's EnvironmentFile=) hold all of it, so the
# printed start commands work from any shell.
set -euo pipefail
umask 022
# The HSM's location reaches each program explicitly, never by inheritance.
unset SOFTHSM2_CONF
repo=$(cd "$(dirname "$0")/../.." && pwd)
demo=${SIGIL_DEMO_DIR:-/var/tmp/sigil-demo}
td=example.org
bin="$demo/bin"
n=0
step() { n=$((n + 1)); printf '\n\033[1m[%d] %s\033[0m\n' "$n" "$*"; }
die() { echo "demo: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it starts an swtpm, sigild nodes and an agent serving other uids)"

"$repo/packaging/demo/demo-stop.sh" >/dev/null 2>&1 || true
rm -rf "$demo"
mkdir -p "$demo" "$bin"
chmod 0755 "$demo"

step "Build sigild, sigilctl, sigil-agent and sigil-ceremony into $bin"
(cd "$repo" && go build -trimpath -o "$bin/" ./cmd/...)
ls "$bin"

step "Create SoftHSM tokens: sigil-root (the offline ceremony HSM) and one per node"
hsm="$demo/hsm"
for t in sigil-root sigil-node-1 sigil-node-2 sigil-node-3; do
	eval "$("$repo/softhsm-testenv/softhsm-token.sh" "$hsm" "$t" | grep -E '^(SOFTHSM2_CONF|MODULE)=' | sed 's/^SOFTHSM2_CONF=/hsmconf=/')"
	echo "token $t, PIN in $hsm/$t.pin (0600)"
done
echo "SoftHSM configuration (token directory): $hsmconf"

mkdir -p "$demo/ceremony"
cer="$demo/ceremony"
ceremony() { # kind file
	SOFTHSM2_CONF=$hsmconf "$bin/sigil-ceremony" "$1" --config "$2" | sed 's/^/    /'
}
step "Key ceremony: the root key (P-384) is made inside the root token and never leaves it"
cat >"$cer/root.yaml" <<Y
kind: root
trust-domain: $td
transcript: $cer/transcript.jsonl
hsm: {module: $MODULE, token: sigil-root, pin-file: $hsm/sigil-root.pin}
key: {label: sigil-root, curve: P-384}
root:
  subject: {common-name: Sigil Demo Root CA, organization: Sigil Demo, country: US}
  validity: 1y
  name-constraint: true
  output: $cer/root.pem
Y
ceremony root "$cer/root.yaml"

for i in 1 2 3; do
	step "Key ceremony: node-$i's issuing key is made in its own token; the root signs its CA certificate"
	cat >"$cer/csr-$i.yaml" <<Y
kind: issuing-csr
trust-domain: $td
transcript: $cer/transcript.jsonl
hsm: {module: $MODULE, token: sigil-node-$i, pin-file: $hsm/sigil-node-$i.pin}
key: {label: sigil-issuing, curve: P-256}
issuing-csr: {node-id: node-$i, output: $cer/node-$i.csr}
Y
	ceremony issuing-csr "$cer/csr-$i.yaml"
	cat >"$cer/sign-$i.yaml" <<Y
kind: sign-issuing
trust-domain: $td
transcript: $cer/transcript.jsonl
hsm: {module: $MODULE, token: sigil-root, pin-file: $hsm/sigil-root.pin}
key: {label: sigil-root}
sign-issuing: {root-certificate: $cer/root.pem, csr: $cer/node-$i.csr, node-id: node-$i, validity: 90d, output: $cer/node-$i-issuing.pem}
Y
	ceremony sign-issuing "$cer/sign-$i.yaml"
done
SOFTHSM2_CONF=$hsmconf "$bin/sigil-ceremony" verify-transcript "$cer/transcript.jsonl"

# The exact commands that check and start node N, printed at the end: the
# environment file gives sigild SOFTHSM2_CONF; the log is appended to; the
# pid file gets sigild's pid whether or not setsid forks (it does when run
# from an interactive shell).
check_cmd() { echo "(set -a; . $demo/node-$1.env; $bin/sigild --check-config --config $demo/node-$1/sigild.yaml)"; }
start_cmd() {
	echo "setsid sh -c 'echo \$\$ >$demo/sigild-$1.pid; set -a; . $demo/node-$1.env; exec $bin/sigild --config $demo/node-$1/sigild.yaml' >>$demo/node-$1/sigild.log 2>&1 </dev/null &"
}

step "Start three sigild nodes on loopback (raft over mutual TLS, HSM-held CAs), each checked first"
# OIDC discovery for cloud APIs: JWT-SVIDs carry iss, and every node serves
# the discovery document and the JWKS of all nodes' keys over TLS. A cloud
# would need a certificate from a CA it trusts and one name in front of the
# nodes; the demo's issuer is node-1's listener, with a self-signed
# certificate.
oidc_issuer=https://127.0.0.1:17801
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=127.0.0.1 \
	-addext subjectAltName=IP:127.0.0.1 -keyout "$demo/oidc-key.pem" -out "$demo/oidc.pem" 2>/dev/null
chmod 0600 "$demo/oidc-key.pem"
for i in 1 2 3; do
	d="$demo/node-$i"
	mkdir -p "$d"
	if [ "$i" = 1 ]; then boot="bootstrap: true"; else boot="join: [127.0.0.1:17301]"; fi
	cat >"$d/sigild.yaml" <<Y
node-id: node-$i
trust-domain: $td
data-dir: $d/data
issuing-key: "pkcs11:token=sigil-node-$i;object=sigil-issuing?module-path=$MODULE&pin-source=file:$hsm/sigil-node-$i.pin"
issuing-cert: $cer/node-$i-issuing.pem
root-certs: [$cer/root.pem]
cluster:
  bind: 127.0.0.1:1730$i
  advertise: 127.0.0.1:1730$i
  $boot
  heartbeat-timeout: 500ms
  election-timeout: 500ms
api: {listen: 127.0.0.1:1740$i, local-socket: $d/admin.sock, admin-cert-max-ttl: 24h}
http: {listen: 127.0.0.1:1760$i, oidc-listen: 127.0.0.1:1780$i, oidc-cert: $demo/oidc.pem, oidc-key: $demo/oidc-key.pem}
bundle: {listen: 127.0.0.1:1750$i}
jwt: {issuer: $oidc_issuer}
log: {level: info, format: json}
Y
	cat >"$demo/node-$i.env" <<E
# Environment of sigild node-$i (systemd: EnvironmentFile=$demo/node-$i.env).
# SoftHSM finds its token directory through this file.
SOFTHSM2_CONF=$hsmconf
E
	eval "$(check_cmd "$i")" | sed 's/^/    /'
	eval "$(start_cmd "$i")"
	disown # the node outlives this script; its end is not this script's news
	echo "node-$i: API 127.0.0.1:1740$i, log $d/sigild.log, environment $demo/node-$i.env"
done
wait_for() { # what, command...
	local what=$1; shift
	for _ in $(seq 1 120); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
	die "timed out waiting for $what"
}
for i in 1 2 3; do wait_for "node-$i ready" curl -fsS "http://127.0.0.1:1760$i/readyz"; done

step "Issue an admin credential through node-1's root-only local socket"
mkdir -p "$demo/admin"
"$bin/sigilctl" --socket "$demo/node-1/admin.sock" admin issue --name demo \
	--key-out "$demo/admin/key.pem" --cert-out "$demo/admin/cert.pem"
export SIGIL_SERVER=127.0.0.1:17402 SIGIL_CERT="$demo/admin/cert.pem" SIGIL_KEY="$demo/admin/key.pem" SIGIL_ROOT="$cer/root.pem"
three_voters() { "$bin/sigilctl" -o json cluster status | grep -c '"id"' | grep -qx 3; }
wait_for "three voters" three_voters
"$bin/sigilctl" cluster status

step "Manufacture a software TPM (swtpm) with an EK certificate from a local vendor CA"
eval "$("$repo/softhsm-testenv/swtpm-provision.sh" "$demo/tpm" | grep -E '^EK_CA_(ROOT|ISSUER)=')"
"$repo/softhsm-testenv/swtpm-start.sh" "$demo/tpm" >/dev/null
cp "$demo/tpm/swtpm.pid" "$demo/swtpm.pid"
echo "swtpm on $demo/tpm/tpm.sock"
"$bin/sigilctl" tpm ek-ca add "$EK_CA_ROOT"
"$bin/sigilctl" tpm ek-ca add "$EK_CA_ISSUER"

step "Start sigil-agent: it joins by TPM attestation and serves the Workload API"
ad="$demo/agent"
mkdir -p "$ad/run"
chmod 0755 "$ad" "$ad/run"
cat >"$ad/agent.yaml" <<Y
servers: [127.0.0.1:17401, 127.0.0.1:17402, 127.0.0.1:17403]
root-cert: $cer/root.pem
data-dir: $ad/data
tpm: $demo/tpm/tpm.sock
workload-api: {socket: $ad/run/agent.sock}
health-listen: 127.0.0.1:17701
Y
setsid "$bin/sigil-agent" --config "$ad/agent.yaml" >"$ad/agent.log" 2>&1 </dev/null &
echo $! >"$demo/agent.pid"
wait_for "the agent's Workload API" curl -fsS http://127.0.0.1:17701/readyz
agent_id=$(grep -o '"agent":"spiffe://[^"]*' "$ad/agent.log" | head -1 | cut -d'"' -f4)
[ -n "$agent_id" ] || die "agent ID not found in $ad/agent.log"
echo "agent joined as $agent_id (key sealed in the TPM: $ad/data/agent.key)"
"$bin/sigilctl" agent list

step "Register the workload: uid 65534 running $bin/sigil-agent (by path and SHA-256)"
sum=$(sha256sum "$bin/sigil-agent" | cut -d' ' -f1)
"$bin/sigilctl" entry create --spiffe-id "spiffe://$td/demo/workload" --parent-id "$agent_id" \
	--selector unix:uid:65534 --selector "unix:path:$bin/sigil-agent" --selector "unix:sha256:$sum" --hint demo

step "The workload fetches its X.509-SVID and a JWT-SVID over the Workload API (as uid 65534)"
fetch() {
	setpriv --reuid=65534 --regid=65534 --clear-groups \
		env SPIFFE_ENDPOINT_SOCKET="unix://$ad/run/agent.sock" "$bin/sigil-agent" inspect --audience demo-api
}
for _ in $(seq 1 40); do out=$(fetch 2>&1) && break; sleep 0.5; done
echo "$out" | sed -E 's/^(  )(ey[A-Za-z0-9_-]{20})[A-Za-z0-9_.-]*/\1\2.../'
echo "$out" | grep -q "spiffe://$td/demo/workload (default)" || die "the workload did not get its SVID"

step "Audit: every issuance above is in the hash-chained log"
"$bin/sigilctl" audit verify

step "A pipeline run gets its own identity with sigil-agent exec (a local OIDC issuer stands in for the CI platform)"
# demo-ci-issuer is not part of Sigil: it plays GitHub Actions' token
# service, publishing discovery and a JWKS over TLS on loopback and
# signing a token shaped like a GitHub Actions run's.
ci="$demo/ci"
mkdir -p "$ci"
(cd "$repo" && go build -trimpath -o "$bin/demo-ci-issuer" ./packaging/demo/ciissuer)
setsid "$bin/demo-ci-issuer" serve --dir "$ci" --addr 127.0.0.1:17480 >"$ci/issuer.log" 2>&1 </dev/null &
echo $! >"$demo/ci-issuer.pid"
wait_for "the demo CI issuer" curl -fsS --cacert "$ci/tls-ca.pem" https://127.0.0.1:17480/.well-known/openid-configuration
echo "issuer $(cat "$ci/issuer") (stand-in for https://token.actions.githubusercontent.com)"
"$bin/sigilctl" join-rule create demo-ci --preset github-actions --issuer "$(cat "$ci/issuer")" --issuer-ca "$ci/tls-ca.pem" \
	--claim 'repository=demo-org/*' --claim ref=refs/heads/main --ttl 15m --max-token-age 5m
(umask 077 && "$bin/demo-ci-issuer" token --dir "$ci" --aud "spiffe://$td" --run 4242 >"$ci/run-4242.token")
echo "+ sigil-agent exec --rule demo-ci --token-file $ci/run-4242.token -- sigil-agent inspect"
out=$("$bin/sigil-agent" exec --server 127.0.0.1:17401 --server 127.0.0.1:17402 --server 127.0.0.1:17403 \
	--root-cert "$SIGIL_ROOT" --rule demo-ci --token-file "$ci/run-4242.token" --log-level warn -- "$bin/sigil-agent" inspect)
echo "$out"
echo "$out" | grep -q "spiffe://$td/ci/github/demo-org/deploy-infra" || die "the run did not get its identity"
echo "The audit log has who and what ran, and that the run ended:"
"$bin/sigilctl" audit list --action 'job.*' --newest-first --limit 2 2>/dev/null
echo "The run's join record: who and what ran (from the platform's signed token)"
"$bin/sigilctl" -o json audit list --action job.join --newest-first --limit 1 2>/dev/null | grep -E '"(fact\.[a-z_]+|rule|run|spiffe_id)":'
"$bin/sigilctl" agent list | grep -c /sigil/agent/job/ >/dev/null && die "the run's job agent outlived the run"
echo "(the run's job agent is gone: nothing outlives the run)"

step "OIDC discovery for cloud APIs: JWT-SVIDs carry iss $oidc_issuer"
echo "issuer: $oidc_issuer (register it with AWS IAM, GCP workload identity federation or Azure: README)"
curl -fsS --cacert "$demo/oidc.pem" "$oidc_issuer/.well-known/openid-configuration"
echo
echo "JWKS (the JWT keys the nodes have published; a node publishes its first when it first signs):"
curl -fsS --cacert "$demo/oidc.pem" "$oidc_issuer/keys" | grep -o '"kid":"[^"]*"' || die "no JWKS at $oidc_issuer/keys"

step "Kill node-3 (SIGKILL), write while it is down, restart it with the printed command; it rejoins as a voter and catches up"
pid3=$(cat "$demo/sigild-3.pid")
kill -KILL "$pid3"
while kill -0 "$pid3" 2>/dev/null; do sleep 0.1; done
echo "killed node-3 (pid $pid3)"
leader_not_3() { "$bin/sigilctl" -o json cluster status | tr -d ' \n' | grep -qE '"leader_id":"node-[12]"'; }
wait_for "a leader among node-1 and node-2" leader_not_3
"$bin/sigilctl" entry create --spiffe-id "spiffe://$td/demo/while-node-3-down" --parent-id "$agent_id" \
	--selector unix:uid:65535 --hint "written while node-3 was down" >/dev/null
commit=$("$bin/sigilctl" -o json cluster status | tr -d ' \n' | grep -o '"commit_index":[0-9]*' | cut -d: -f2)
echo "$(check_cmd 3)"
eval "$(check_cmd 3)" | sed 's/^/    /'
echo "$(start_cmd 3)"
eval "$(start_cmd 3)"
disown
wait_for "node-3 ready after restart" curl -fsS http://127.0.0.1:17603/readyz
# node-3's own view: a follower (or leader) that has applied at least the
# commit index the cluster had reached while it was down.
caught_up() {
	local s; s=$(SIGIL_SERVER=127.0.0.1:17403 "$bin/sigilctl" -o json cluster status | tr -d ' \n')
	echo "$s" | grep -qE '"state":"(follower|Follower|leader|Leader)"' || return 1
	[ "$(echo "$s" | grep -o '"applied_index":[0-9]*' | cut -d: -f2)" -ge "$commit" ]
}
wait_for "node-3 to apply index $commit" caught_up
voter() { "$bin/sigilctl" -o json cluster status | tr -d ' \n' | grep -qE '"id":"node-3","addr":"[^"]*","suffrage":"[Vv]oter"'; }
wait_for "node-3 listed as a voter" voter
echo "node-3 is back (pid $(cat "$demo/sigild-3.pid")), applied index >= $commit:"
SIGIL_SERVER=127.0.0.1:17403 "$bin/sigilctl" cluster status
runs=$(grep -c '"issuing CA opened"' "$demo/node-3/sigild.log")
[ "$runs" -ge 2 ] || die "node-3's log holds $runs start(s): the restart did not append to it"
echo "node-3's log $demo/node-3/sigild.log holds both runs (appended)"

cat <<T

Sigil demo running. Everything is in $demo:
  node-N/sigild.log, agent/agent.log   logs
  ceremony/                            root.pem, issuing certificates, transcript
  agent/run/agent.sock                 the Workload API (SPIFFE_ENDPOINT_SOCKET=unix://$ad/run/agent.sock)
Admin CLI:  SIGIL_SERVER=$SIGIL_SERVER SIGIL_CERT=$SIGIL_CERT SIGIL_KEY=$SIGIL_KEY SIGIL_ROOT=$SIGIL_ROOT $bin/sigilctl entry list
Stop:       make demo-stop

Check and (re)start a node, from any shell (as root); node-N.env carries
what sigild needs from the environment (SOFTHSM2_CONF), and the log is
appended to:
T
for i in 1 2 3; do
	echo "  node-$i check:  $(check_cmd "$i")"
	echo "  node-$i start:  $(start_cmd "$i")"
done
