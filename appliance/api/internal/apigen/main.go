// Command apigen writes the gRPC registration and clients of package api
// (the *_gen.go files) from its service interfaces; package gen says how.
// go generate runs it in appliance/api.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/sigil-appliance/sigil/appliance/api/internal/apigen/gen"
)

func main() {
	dir := flag.String("dir", ".", "directory of the package whose service interfaces are read")
	out := flag.String("out", "", "directory the generated files go to (default: -dir)")
	flag.Parse()
	if *out == "" {
		*out = *dir
	}
	if err := gen.Write(*dir, *out); err != nil {
		fmt.Fprintln(os.Stderr, "apigen:", err)
		os.Exit(1)
	}
}
