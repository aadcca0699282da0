// Package systemd_test checks the shipped systemd units with systemd's own
// analyzer: each must score 2.0 or better ("exposure level").
package systemd_test

import (
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
)

func TestUnitsExposure(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatal("systemd-analyze not found (Debian: systemd)")
	}
	units, _ := filepath.Glob("*.service")
	if len(units) == 0 {
		t.Fatal("no units")
	}
	score := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`)
	for _, u := range units {
		out, err := exec.Command("systemd-analyze", "security", "--offline=true", "./"+u).CombinedOutput()
		m := score.FindSubmatch(out)
		if m == nil {
			t.Fatalf("%s: no score (%v):\n%s", u, err, out)
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		t.Logf("%s: exposure %.1f", u, v)
		if v > 2.0 {
			t.Errorf("%s: exposure %.1f, want 2.0 or lower:\n%s", u, v, out)
		}
		if out, err := exec.Command("systemd-analyze", "verify", "--man=no", "./"+u).CombinedOutput(); err != nil && len(out) > 0 {
			t.Logf("%s: systemd-analyze verify: %s", u, out)
		}
	}
}
