package output

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestValidate(t *testing.T) {
	good := Config{Dir: "/run/sigil/out/a", Selectors: []string{"unix:uid:1000"}, UID: 1000, GID: 1000}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]Config{
		"relative dir":   {Dir: "out", Selectors: good.Selectors},
		"no selectors":   {Dir: good.Dir},
		"short selector": {Dir: good.Dir, Selectors: []string{"uid:1000"}},
		"negative uid":   {Dir: good.Dir, Selectors: good.Selectors, UID: -1},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A secret file gets its owner and mode before its content, replaces the
// old file in one rename, and leaves no temporary file behind.
func TestWriteFileAtomicAndOwned(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("needs root to give files away (CI runs as root)")
	}
	dir := t.TempDir()
	c := Config{Dir: filepath.Join(dir, "out"), UID: 1234, GID: 2345}
	for _, content := range []string{"first", "second"} {
		if err := writeFile(c, "svid_key.pem", []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(filepath.Join(c.Dir, "svid_key.pem"))
		st, _ := os.Stat(filepath.Join(c.Dir, "svid_key.pem"))
		sys := st.Sys().(*syscall.Stat_t)
		if string(b) != content || st.Mode().Perm() != 0o600 || sys.Uid != 1234 || sys.Gid != 2345 {
			t.Fatalf("%q mode %v owner %d:%d", b, st.Mode().Perm(), sys.Uid, sys.Gid)
		}
	}
	ents, _ := os.ReadDir(c.Dir)
	if len(ents) != 1 {
		t.Fatalf("left behind: %v", ents)
	}
}
