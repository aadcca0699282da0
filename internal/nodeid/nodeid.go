// Package nodeid owns the form of a sigild node ID: the name a node has
// in its certificates (spiffe://<td>/sigil/node/<id>), in raft and in
// every config and ceremony script that names it. Everything that takes a
// node ID from outside checks it here, so every place agrees.
package nodeid

import (
	"fmt"
	"regexp"
)

// Pattern is the form of a node ID, as errors show it: a lowercase
// letter or digit, then up to 62 lowercase letters, digits or dashes (one
// SPIFFE ID path segment, one DNS label).
const Pattern = `[a-z0-9][a-z0-9-]{0,62}`

var re = regexp.MustCompile(`^` + Pattern + `$`)

// Valid reports whether id is a node ID.
func Valid(id string) bool { return re.MatchString(id) }

// Check returns an error naming id when it is not a node ID.
func Check(id string) error {
	if !Valid(id) {
		return fmt.Errorf("node id %q: want %s", id, Pattern)
	}
	return nil
}
