package selector

import (
	"strings"
	"testing"
)

func split(s string) (string, string) {
	t, v, _ := strings.Cut(s, ":")
	return t, v
}

func TestCheck(t *testing.T) {
	hex := strings.Repeat("ab", 32)
	for _, s := range []string{
		"unix:uid:0", "unix:uid:1000", "unix:uid:4294967295", "unix:gid:1000",
		"unix:user:www-data", "unix:user:DOMAIN users@ad.example", "unix:group:docker",
		"unix:supplementary_gid:27", "unix:supplementary_group:sudo",
		"unix:path:/usr/bin/web", "unix:path:/opt/app/bin/web (deleted)",
		"unix:sha256:" + hex, "container:id:" + hex,
		"systemd:unit:web.service", "systemd:unit:getty@tty1.service", "systemd:unit:session-3.scope",
		"systemd:unit:docker-" + hex + ".scope",
	} {
		if err := Check(split(s)); err != nil {
			t.Errorf("%s refused: %v", s, err)
		}
	}
	for s, want := range map[string]string{
		"unix:uid:abc":                        "not a decimal id",
		"unix:uid:-1":                         "not a decimal id",
		"unix:uid:01000":                      "leading zeros",
		"unix:uid:4294967296":                 "not a decimal id",
		"unix:uid:":                           "not a decimal id",
		"foo:bar":                             `unknown type "foo"`,
		"uid:1000":                            "did you mean unix:uid:1000?",
		"sha256:" + hex:                       "did you mean unix:sha256:",
		"unix:colour:blue":                    "produces no unix:colour selector; unix selectors are unix:uid:...",
		"unix:sha256:xyz":                     "not 64 lowercase hex digits",
		"unix:sha256:" + strings.ToUpper(hex): "not 64 lowercase hex digits",
		"container:id:abc":                    "not 64 lowercase hex digits",
		"unix:path:usr/bin/web":               "not absolute",
		"unix:path:/usr//bin/web":             `not clean (the agent sees "/usr/bin/web")`,
		"unix:path:/usr/bin/../bin/web":       "not clean",
		"unix:user:1000":                      "is a number, not a name",
		"unix:group:a\tb":                     "control character",
		"systemd:unit:web":                    "not a .service or .scope unit name",
		"systemd:unit:web.socket":             "not socket units",
		"systemd:unit:system.slice":           "not slice units",
		"systemd:unit:user@1000.service":      "user's service manager",
		"unix:uid:1\n":                        "without newlines",
		"tpm:ek-hash:ab":                      `unknown type "tpm"`,
	} {
		err := Check(split(s))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want an error containing %q", s, err, want)
		}
	}
}

func TestCheckSet(t *testing.T) {
	pair := func(ss ...string) [][2]string {
		var out [][2]string
		for _, s := range ss {
			t, v := split(s)
			out = append(out, [2]string{t, v})
		}
		return out
	}
	if err := CheckSet(pair("unix:uid:1000", "unix:gid:1000", "unix:supplementary_gid:27", "unix:supplementary_gid:44", "systemd:unit:web.service")); err != nil {
		t.Fatal(err)
	}
	for _, c := range [][]string{
		{"unix:uid:1000", "unix:uid:1001"},
		{"unix:sha256:" + strings.Repeat("a", 64), "unix:sha256:" + strings.Repeat("b", 64)},
		{"systemd:unit:a.service", "systemd:unit:b.service"},
		{"unix:path:/a", "unix:path:/b"},
	} {
		err := CheckSet(pair(c...))
		if err == nil || !strings.Contains(err.Error(), "can never both match") {
			t.Errorf("%v: %v, want a contradiction", c, err)
		}
	}
	if err := CheckSet(pair("unix:uid:1", "unix:uid:x")); err == nil || !strings.Contains(err.Error(), "not a decimal id") {
		t.Errorf("an invalid selector in a set: %v", err)
	}
}
