//go:build pprof

package main

import (
	"net/http"
	_ "net/http/pprof" // the profiles are what this build is for
	"os"
	"runtime"
)

// A sigild built with -tags pprof (load tests only; `make build` and the
// packages never set the tag) serves Go's runtime profiles on
// SIGIL_PPROF_ADDR, a loopback address: BenchmarkFleet with
// SIGIL_FLEET_PPROF set reads each node's heap profile from it.
func init() {
	// Every 4 KiB allocated is sampled, not every 512 KiB: a connected
	// agent costs tens of KiB, below the default's resolution.
	runtime.MemProfileRate = 4096
	if addr := os.Getenv("SIGIL_PPROF_ADDR"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }() // a profile that cannot be served shows as the fetch's error
	}
}
