package ceremony

import (
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// FuzzParse: ceremony scripts are validated before any HSM opens; any
// bytes give a config and a validation verdict, or an error, never a
// panic.
func FuzzParse(f *testing.F) {
	paths, _ := filepath.Glob("../../packaging/ceremony/*.yaml")
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("kind: root\n---\nkind: crl\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, k := range Kinds {
			if c, err := Parse(b, k); err == nil {
				// Refusing is fine; the test is that nothing panics.
				if p, err := c.Validate(time.Now()); err == nil {
					_ = p.Describe(io.Discard, time.Now())
				}
			}
		}
	})
}
