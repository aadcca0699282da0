# Sigil build, test and benchmark entry points. `make test` is what CI runs.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
# The Debian packages the tests drive for real (HSM, TPM, their CLIs).
DEB_PACKAGES := softhsm2 swtpm swtpm-tools tpm2-tools opensc openssl systemd curl util-linux iproute2 nginx
# Packages whose behaviour is tested against hardware stand-ins share those
# stand-ins' CPU: keep package parallelism modest on small machines.
TEST_FLAGS ?= -count=1 -p 2 -timeout 20m
BENCHTIME ?= 2s
BENCH_FLAGS ?= -run '^$$' -bench . -benchtime $(BENCHTIME)

.PHONY: all build test bench lint deps clean demo demo-stop package faults fleet
FUZZTIME ?= 20s
# Every parser of outside input, as package:FuzzTarget.
FUZZ_TARGETS := \
	./appliance/node:FuzzCheckCSR ./appliance/node:FuzzParseConfig \
	./appliance/tpmverify:FuzzCheckAK ./appliance/tpmverify:FuzzVerifyEK ./appliance/tpmverify:FuzzVerifyCertify ./appliance/tpmverify:FuzzVerifyQuote \
	./appliance/state:FuzzReadArchive ./appliance/state:FuzzApply \
	./appliance/state:FuzzForeignBundle \
	./appliance/ceremony:FuzzParse ./appliance/pinshare:FuzzCombine \
	./agent:FuzzParseConfig ./agent/workload:FuzzValidateJWTSVID ./agent/workload:FuzzFetchJWTSVID \
	./internal/pemfile:FuzzDecode ./internal/strictyaml:FuzzParseDuration \
	./appliance/jobrule:FuzzVerifyPayload ./appliance/jobrule:FuzzVerifyToken
VERSION ?= 0.8.0
# Build and lint tools are pinned once each, by `tool` lines in modules of
# their own under tools/, so their dependencies never move the product's
# (nor one tool's the other's): tools/go.mod holds staticcheck and errcheck,
# tools/nfpm/go.mod holds nfpm (v2.45.0: later releases need modules the
# proxy does not serve; packaging/nfpm/deb_test.go runs it the same way).
TOOL ?= $(GO) tool -modfile=tools/go.mod
NFPM ?= $(GO) tool -modfile=tools/nfpm/go.mod nfpm
# Test-helper packages: only they may import testing outside _test.go files,
# and only _test.go files (or another helper) may import them.
TEST_HELPERS := \
	github.com/sigil-appliance/sigil/softhsm-testenv \
	github.com/sigil-appliance/sigil/appliance/clustertest \
	github.com/sigil-appliance/sigil/appliance/fleettest \
	github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest
# What staticcheck and errcheck examine; the faults tag adds the fault suite.
LINT_PKGS ?= ./...
LINT_TAGS := faults

all: build

build:
	@mkdir -p bin
	@if $(GO) list ./cmd/... >/dev/null 2>&1; then $(GO) build -trimpath -o bin/ ./cmd/...; else echo "no commands yet under cmd/"; fi

# Idempotent: installs only what is missing (needs root when it installs).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "make deps: missing$$missing; run as root or apt-get install them" >&2; exit 1; fi; \
		echo "make deps: installing$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: deps
	$(GO) test $(TEST_FLAGS) ./...

bench: deps
	@$(GO) test $(BENCH_FLAGS) ./... | tee bench.out | awk ' \
		/^Benchmark/ { m=""; ratio=""; \
			for (i = 3; i < NF; i += 2) { u=$$(i+1); if (u == "ns/op") continue; \
				if (u ~ /^x-/) ratio=ratio $$i " " u " "; else m=m $$i " " u "  " } \
			rows[++n]=sprintf("%-42s %-40s %s", $$1, m, ratio) } \
		/^(FAIL|panic)/ { failed=1 } \
		END { printf "\n%-42s %-40s %s\n", "benchmark", "measured", "ratio to the raw limit (same run)"; for (i = 1; i <= n; i++) print rows[i]; \
			printf "\nhow each is measured:\n"; while ((getline l < "bench-how.tsv") > 0) { split(l, f, "\t"); printf "  %-42s %s\n", f[1], f[2] }; \
			exit failed }'

# Issue #19's load harness at fleet size: FLEET_AGENTS simulated agents
# (default 10,000) in the test's process against three sigild processes,
# one run. FLEET_TTL (seconds, agent SVID life) and FLEET_WINDOW (seconds,
# the steady-state window) default to a compressed day: a 570 s SVID is
# renewed every 4-5 minutes, so the 300 s window sees about one renewal
# per agent. FLEET_KILL is the node killed: leader or follower.
# FLEET_MAX_HANDSHAKES is each node's api.max-handshakes, by default
# README's sizing rule (a quarter of the fleet, at least 256).
FLEET_AGENTS ?= 10000
FLEET_TTL ?= 570
FLEET_WINDOW ?= 300
FLEET_KILL ?= leader
FLEET_MAX_HANDSHAKES ?= $(shell echo $$(( $(FLEET_AGENTS) / 4 > 256 ? $(FLEET_AGENTS) / 4 : 256 )))
fleet: deps
	@set -o pipefail; SIGIL_FLEET_AGENTS=$(FLEET_AGENTS) SIGIL_FLEET_TTL=$(FLEET_TTL) SIGIL_FLEET_WINDOW=$(FLEET_WINDOW) SIGIL_FLEET_KILL=$(FLEET_KILL) SIGIL_FLEET_MAX_HANDSHAKES=$(FLEET_MAX_HANDSHAKES) \
		$(GO) test -v -p 1 -count=1 -run '^$$' -bench '^BenchmarkFleet$$' -benchtime 1x -timeout 90m ./appliance/fleettest/ | tee fleet.out | \
		awk '/^BenchmarkFleet/ && NF > 4 { printf "%s (%s agents)\n", $$1, "$(FLEET_AGENTS)"; for (i = 5; i < NF; i += 2) printf "  %-26s %s\n", $$(i+1), $$i } \
			/fleet:|agents|steady window|open-file|by answer|by error|killed|failover/ { sub(/^ +/, ""); print "  " $$0 } /^(FAIL|panic)/ { failed=1 } END { exit failed }'

# gofmt, vet, staticcheck, errcheck (tests included: an unchecked error in a
# test's setup makes it pass or fail for the wrong reason), and the
# architecture rules that the compiler cannot enforce.
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags faults ./faults/
	@# The API's registration and clients are generated from its interfaces.
	@$(GO) generate ./appliance/api && git diff --exit-code --stat -- appliance/api || { echo "appliance/api: generated files are stale; run go generate ./appliance/api and commit"; exit 1; }
	@$(GO) list $(TEST_HELPERS) >/dev/null || { echo "TEST_HELPERS names a package that does not exist"; exit 1; }
	@set -o pipefail; bad=$$($(GO) list -tags $(LINT_TAGS) -f '{{.ImportPath}}{{range .Imports}} {{.}}{{end}}' ./... | \
		awk -v helpers="$(TEST_HELPERS)" 'BEGIN { n = split(helpers, h, " "); for (i = 1; i <= n; i++) helper[h[i]] = 1 } \
			!($$1 in helper) { for (i = 2; i <= NF; i++) if ($$i == "testing" || $$i ~ /^testing\// || ($$i in helper)) print $$1 " -> " $$i }'); \
	if [ -n "$$bad" ]; then echo "non-test code imports testing or a test helper (helpers are TEST_HELPERS, imported only by _test.go files):"; echo "$$bad"; exit 1; fi
	@bad=$$($(GO) list -f '{{range .Imports}}{{$$.ImportPath}} -> {{.}}{{"\n"}}{{end}}' ./keystore/... | \
		grep -E ' -> [^/]+\.[^/]+/' | grep -vE ' -> (github.com/miekg/pkcs11|github.com/google/go-tpm/|github.com/sigil-appliance/sigil/keystore)' || true); \
	if [ -n "$$bad" ]; then echo "keystore may import only the standard library and HSM/TPM libraries:"; echo "$$bad"; exit 1; fi
	@bad=$$($(GO) list -f '{{range .Imports}}{{$$.ImportPath}} -> {{.}}{{"\n"}}{{end}}' ./appliance/jobrule | \
		grep -E ' -> [^/]+\.[^/]+/' | grep -vE ' -> (github.com/go-jose/go-jose/v4|github.com/spiffe/go-spiffe/v2/spiffeid)$$' || true); \
	if [ -n "$$bad" ]; then echo "appliance/jobrule may import only the standard library, go-jose and spiffeid:"; echo "$$bad"; exit 1; fi
	@bad=$$($(GO) list -f '{{range .Imports}}{{$$.ImportPath}} -> {{.}}{{"\n"}}{{end}}' ./... | \
		grep -E '/(appliance|raft|keystore)(/[^ ]*)? -> github.com/sigil-appliance/sigil/agent' || true); \
	if [ -n "$$bad" ]; then echo "appliance, raft and keystore must not import agent:"; echo "$$bad"; exit 1; fi
	@bad=$$($(GO) list -f '{{range .Imports}}{{$$.ImportPath}} -> {{.}}{{"\n"}}{{end}}' ./agent/... | \
		grep -E ' -> github.com/sigil-appliance/sigil/(appliance/|raft)' | grep -vE ' -> github.com/sigil-appliance/sigil/appliance/api$$' || true); \
	if [ -n "$$bad" ]; then echo "agent reaches the appliance only through appliance/api:"; echo "$$bad"; exit 1; fi
	@bad=$$($(GO) list -f '{{range .Imports}}{{$$.ImportPath}} -> {{.}}{{"\n"}}{{end}}' ./internal/... | \
		grep -E ' -> github.com/sigil-appliance/sigil/' | grep -vE ' -> github.com/sigil-appliance/sigil/internal/' || true); \
	if [ -n "$$bad" ]; then echo "internal/ is shared by appliance and agent: it imports neither (nor raft, keystore):"; echo "$$bad"; exit 1; fi
	@# Both run, so one pass shows every finding.
	@rc=0; \
	echo "staticcheck $(LINT_PKGS)"; $(TOOL) staticcheck -tags $(LINT_TAGS) $(LINT_PKGS) || rc=1; \
	echo "errcheck $(LINT_PKGS)"; $(TOOL) errcheck -tags $(LINT_TAGS) -exclude tools/errcheck-excludes.txt $(LINT_PKGS) || rc=1; \
	exit $$rc
	@echo "lint ok"

# The README's first command: a three-node appliance on SoftHSM, a
# TPM-joined agent on swtpm, a workload fetching its SVIDs.
demo: deps
	packaging/demo/demo.sh

demo-stop:
	packaging/demo/demo-stop.sh

# The fault suite (root: network namespaces, tmpfs): three sigild processes
# in their own namespaces and an agent, through a full disk, a partition,
# 20 kill -9 of the leader under load and a whole-appliance stop; then each
# fuzz target for $(FUZZTIME). Prints a table of the figures.
faults: deps
	@$(GO) test -tags faults -count=1 -v -timeout 30m -run TestFaults ./faults/ > faults.out 2>&1; rc=$$?; \
		grep -E '^(FAULTS|--- |    --- )' faults.out; [ $$rc = 0 ] || { tail -50 faults.out; exit $$rc; }
	@for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; fn=$${t##*:}; \
		printf 'FUZZ   | %-24s %-22s ' $$pkg $$fn; \
		out=$$($(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) $$pkg 2>&1) || { echo FAILED; echo "$$out" | tail -30; exit 1; }; \
		echo "$$out" | grep -oE 'execs: [0-9]+' | tail -1; \
	done

# .deb packages into dist/: sigild (+sigilctl), sigil-agent, sigil-ceremony.
package: build
	@mkdir -p dist
	@for p in sigild sigil-agent sigil-ceremony; do \
		SIGIL_BIN=$(CURDIR)/bin VERSION=$(VERSION) ARCH=$$($(GO) env GOARCH) \
			$(NFPM) package --config packaging/nfpm/$$p.yaml --packager deb --target dist/ || exit 1; \
	done
	@ls -l dist/*.deb

clean:
	rm -rf bin bench.out dist faults.out fleet.out
