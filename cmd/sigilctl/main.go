// Command sigilctl administers a Sigil appliance; see appliance/ctl.
package main

import (
	"fmt"
	"os"

	"github.com/sigil-appliance/sigil/appliance/ctl"
)

func main() {
	if err := ctl.NewCommand(os.Stdout).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "sigilctl:", err)
		os.Exit(1)
	}
}
