// Package packaging_test checks the annotated example configurations
// shipped in packaging/: each parses and validates strictly, and each shows
// every setting of its program's Config (set, or on a commented-out line
// that becomes the setting when uncommented), so a new setting cannot ship
// undocumented.
package packaging_test

import (
	"os"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/appliance/node"
)

func TestSigildExample(t *testing.T) {
	const path = "sigild/sigild.yaml"
	cfg, err := node.DecodeConfigFile(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	// Only the files it names (which exist on a configured node) are
	// missing here.
	for _, p := range cfg.Problems() {
		if !strings.Contains(p, "no such file") {
			t.Errorf("%s: %s", path, p)
		}
	}
	for _, f := range undocumented(t, path, reflect.TypeFor[node.Config]()) {
		t.Errorf("%s does not show the setting %s", path, f)
	}
}

func TestAgentExample(t *testing.T) {
	const path = "agent.yaml"
	cfg, err := agent.LoadConfig(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("%s: %v", path, err)
	}
	for _, f := range undocumented(t, path, reflect.TypeFor[agent.Config]()) {
		t.Errorf("%s does not show the setting %s", path, f)
	}
}

// A commented-out setting: "# key: value", indented as it would be.
var commentedSetting = regexp.MustCompile(`^(\s*)# ?([a-z][a-z0-9-]*:(\s.*)?)$`)

// undocumented lists the yaml fields of typ (dotted paths, [] for a list's
// items) that the example at path neither sets nor shows commented out.
func undocumented(t *testing.T, path string, typ reflect.Type) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	for i, l := range lines {
		lines[i] = commentedSetting.ReplaceAllString(l, "$1$2")
	}
	var doc map[string]any
	if err := yaml.Unmarshal([]byte(strings.Join(lines, "\n")), &doc); err != nil {
		t.Fatalf("%s with its commented-out settings uncommented: %v", path, err)
	}
	var missing []string
	walk(typ, doc, "", &missing)
	sort.Strings(missing)
	if len(missing) == 0 && len(fields(typ)) == 0 {
		t.Fatalf("%v has no yaml fields: the check checks nothing", typ)
	}
	return missing
}

var unmarshaler = reflect.TypeFor[yaml.Unmarshaler]()

// walk records each yaml field of typ missing from m, and goes into
// nested sections and into the first item of lists of sections.
func walk(typ reflect.Type, m map[string]any, prefix string, missing *[]string) {
	for name, ft := range fields(typ) {
		v, ok := m[name]
		if !ok {
			*missing = append(*missing, prefix+name)
			continue
		}
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		switch {
		case section(ft):
			sub, _ := v.(map[string]any)
			walk(ft, sub, prefix+name+".", missing)
		case ft.Kind() == reflect.Slice && section(ft.Elem()):
			items, _ := v.([]any)
			if len(items) == 0 {
				*missing = append(*missing, prefix+name+"[] (no example item)")
				continue
			}
			sub, _ := items[0].(map[string]any)
			walk(ft.Elem(), sub, prefix+name+"[].", missing)
		}
	}
}

// section reports whether a field of type ft is a YAML mapping of its
// own fields (not a value that decodes itself, such as a duration).
func section(ft reflect.Type) bool {
	return ft.Kind() == reflect.Struct && !reflect.PointerTo(ft).Implements(unmarshaler) && ft != reflect.TypeFor[time.Time]()
}

// fields maps the yaml names of typ's fields to their types; inline
// fields contribute their own.
func fields(typ reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := range typ.NumField() {
		f := typ.Field(i)
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if strings.Contains(opts, "inline") {
			for k, v := range fields(f.Type) {
				out[k] = v
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		out[name] = f.Type
	}
	return out
}

// TestSigildUnitWritable: under the packaged unit (ProtectSystem=strict)
// sigild writes only its StateDirectory, RuntimeDirectory and
// ReadWritePaths. The example's data-dir, where an issuing certificate
// installed while the node runs is kept (node.InstalledIssuingDir), must
// be among them; the configured issuing-cert must not be (it is the
// operator's, and the unit is not weakened to let the daemon write /etc).
func TestSigildUnitWritable(t *testing.T) {
	unit, err := os.ReadFile("systemd/sigild.service")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := node.DecodeConfigFile("sigild/sigild.yaml")
	if err != nil {
		t.Fatal(err)
	}
	strict := false
	var writable []string
	for _, l := range strings.Split(string(unit), "\n") {
		k, v, _ := strings.Cut(strings.TrimSpace(l), "=")
		switch k {
		case "ProtectSystem":
			strict = v == "strict"
		case "StateDirectory":
			for _, d := range strings.Fields(v) {
				writable = append(writable, "/var/lib/"+d)
			}
		case "RuntimeDirectory":
			for _, d := range strings.Fields(v) {
				writable = append(writable, "/run/"+d)
			}
		case "ReadWritePaths":
			for _, d := range strings.Fields(v) {
				writable = append(writable, strings.TrimLeft(d, "-+"))
			}
		}
	}
	if !strict {
		t.Fatal("sigild.service: ProtectSystem=strict is gone")
	}
	under := func(p string) bool {
		for _, w := range writable {
			if p == w || strings.HasPrefix(p, strings.TrimSuffix(w, "/")+"/") {
				return true
			}
		}
		return false
	}
	if d := node.InstalledIssuingDir(cfg.DataDir); !under(d) {
		t.Errorf("sigild cannot write %s (installed issuing certificates) under the unit: writable %v", d, writable)
	}
	if under(cfg.IssuingCert) {
		t.Errorf("the unit lets sigild write issuing-cert %s: it is the operator's file", cfg.IssuingCert)
	}
}
