package strictyaml

import (
	"strings"
	"testing"
	"time"
)

type sample struct {
	Name  string   `yaml:"name"`
	Every Duration `yaml:"every"`
}

func TestDecode(t *testing.T) {
	var s sample
	if err := Decode([]byte("name: a\nevery: 90d\n"), &s); err != nil || s.Name != "a" || s.Every.Duration != 90*24*time.Hour {
		t.Fatalf("good config: %+v %v", s, err)
	}
	for in, want := range map[string]string{
		"":                          "config is empty",
		"name: a\ncolour: blue\n":   "field colour not found",
		"name: a\n---\nname: b\n":   "more than one YAML document",
		"name: a\nevery: 1.5y\n":    `line 2: duration "1.5y": want a positive whole number before "y"`,
		"name: a\nevery: forever\n": `line 2: duration "forever"`,
	} {
		var s sample
		if err := Decode([]byte(in), &s); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", in, err, want)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"90d": 90 * 24 * time.Hour, "1y": 365 * 24 * time.Hour, "36h": 36 * time.Hour, "1h30m": 90 * time.Minute,
		"500ms": 500 * time.Millisecond, "0s": 0, "292y": 292 * 365 * 24 * time.Hour,
	} {
		if got, err := ParseDuration(in); err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v", in, got, err)
		}
	}
	// Fractions of the long units are refused rather than rounded, and
	// counts past what a time.Duration holds rather than wrapped.
	for _, in := range []string{"", "-1d", "0y", "1.5y", "0.5d", "forever", "d", "293y", "106752d", "9223372036854775807y", "3000000h"} {
		if d, err := ParseDuration(in); err == nil {
			t.Errorf("ParseDuration(%q) accepted as %v", in, d)
		}
	}
}

func TestProblems(t *testing.T) {
	var p Problems
	if p.Err("thing") != nil || p.Len() != 0 {
		t.Fatal("no problems, yet an error")
	}
	p.Add("a", "must be %d (got %d)", 1, 2)
	p.AddErr(nil)
	p.AddErr(errString("b.c is wrong"))
	err := p.Err("thing config")
	if want := "invalid thing config:\n  - a must be 1 (got 2)\n  - b.c is wrong"; err == nil || err.Error() != want || p.Len() != 2 {
		t.Fatalf("got %v, want %q", err, want)
	}
}

type errString string

func (e errString) Error() string { return string(e) }
