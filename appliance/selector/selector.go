// Package selector owns the rules for the workload selectors a
// registration entry may hold: the types and value forms sigil-agent
// produces when it identifies a caller (agent/callerid), and the
// combinations one caller can show at once. A selector outside these
// rules is not wrong in any dangerous way, it is useless: no workload can
// ever show it, so an entry holding it would never be served. The
// appliance refuses such entries so that the mistake is caught when it is
// typed rather than when a workload gets no identity.
//
// The agent's own test checks that every selector it produces passes
// Check, so the two sides cannot drift apart silently.
package selector

import (
	"fmt"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Kind is one selector kind: a type and the first part of the value
// ("unix" and "uid" for unix:uid:1000).
type Kind struct {
	Type, Name string
	// Single kinds have one value per caller (a process has one uid):
	// two different values on one entry can never both match.
	Single bool
	// Form describes a valid value, for messages.
	Form  string
	check func(v string) error
}

// Prefix is "type:name:" as written before the value.
func (k Kind) Prefix() string { return k.Type + ":" + k.Name + ":" }

// Kinds are the selectors sigil-agent produces, in the order operators
// read them in help. The state machine applies these rules to commands of
// version 4 when the log replays: a change that flips a verdict needs a
// new command version (appliance/state TestSelectorRulesPinned).
var Kinds = []Kind{
	{"unix", "uid", true, "a decimal user id, e.g. unix:uid:1000", checkID},
	{"unix", "gid", true, "a decimal group id (the primary group), e.g. unix:gid:1000", checkID},
	{"unix", "user", true, "a user name, e.g. unix:user:www-data", checkName},
	{"unix", "group", true, "a group name (the primary group), e.g. unix:group:www-data", checkName},
	{"unix", "supplementary_gid", false, "a decimal supplementary group id, e.g. unix:supplementary_gid:27", checkID},
	{"unix", "supplementary_group", false, "a supplementary group name, e.g. unix:supplementary_group:docker", checkName},
	{"unix", "path", true, "the absolute, clean path of the binary, e.g. unix:path:/usr/bin/web", checkPath},
	{"unix", "sha256", true, "the SHA-256 of the binary, 64 lowercase hex digits", checkHex64},
	{"systemd", "unit", true, "a systemd .service or .scope unit, e.g. systemd:unit:web.service", checkUnit},
	{"container", "id", true, "a container id, 64 lowercase hex digits", checkHex64},
}

// MaxValue bounds a selector's value (after the type).
const MaxValue = 256

// Check checks one selector, given as its type ("unix") and value
// ("uid:1000"), against what the agent produces. The error names the
// selector and says what a valid one looks like.
func Check(typ, value string) error {
	s := typ + ":" + value
	if value == "" || len(value) > MaxValue || strings.ContainsAny(value, "\n\r\x00") {
		return fmt.Errorf("selector %s: value must be 1-%d characters without newlines", quote(s), MaxValue)
	}
	name, v, _ := strings.Cut(value, ":")
	k, ok := find(typ, name)
	if !ok {
		return unknown(typ, name, value)
	}
	if err := k.check(v); err != nil {
		return fmt.Errorf("selector %s: %v; want %s", quote(s), err, k.Form)
	}
	return nil
}

// CheckSet checks each selector and that one caller could show them all
// at once: at most one value of each single kind.
func CheckSet(sel [][2]string) error {
	first := map[string]string{}
	for _, s := range sel {
		if err := Check(s[0], s[1]); err != nil {
			return err
		}
		name, v, _ := strings.Cut(s[1], ":")
		k, _ := find(s[0], name)
		if !k.Single {
			continue
		}
		if prev, ok := first[k.Prefix()]; ok && prev != v {
			return fmt.Errorf("selectors %s%s and %s%s can never both match: a workload has one %s:%s",
				k.Prefix(), prev, k.Prefix(), v, k.Type, k.Name)
		}
		first[k.Prefix()] = v
	}
	return nil
}

func find(typ, name string) (Kind, bool) {
	i := slices.IndexFunc(Kinds, func(k Kind) bool { return k.Type == typ && k.Name == name })
	if i < 0 {
		return Kind{}, false
	}
	return Kinds[i], true
}

// unknown explains a selector of no known kind, guessing the likely
// intent: a missing type (uid:1000), a known type with an unknown name.
func unknown(typ, name, value string) error {
	s := quote(typ + ":" + value)
	var types, names []string
	for _, k := range Kinds {
		if !slices.Contains(types, k.Type) {
			types = append(types, k.Type)
		}
		if k.Type == typ {
			names = append(names, k.Prefix()+"...")
		}
		if k.Name == typ {
			return fmt.Errorf("selector %s has no type: did you mean %s%s?", s, k.Prefix(), value)
		}
	}
	if len(names) > 0 {
		return fmt.Errorf("selector %s: sigil-agent produces no %s:%s selector; %s selectors are %s", s, typ, name, typ, strings.Join(names, ", "))
	}
	return fmt.Errorf("selector %s: unknown type %q; sigil-agent produces selectors of type %s (see sigilctl entry create --help)", s, typ, strings.Join(types, ", "))
}

func quote(s string) string {
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return strconv.Quote(s)
}

// checkID: the agent writes ids with strconv.FormatUint of a uint32.
func checkID(v string) error {
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil || strconv.FormatUint(n, 10) != v {
		return fmt.Errorf("%q is not a decimal id (0 to 4294967295, no sign or leading zeros)", v)
	}
	return nil
}

// checkName: names come from the system's user and group databases, which
// allow more than useradd does (directory services give names with spaces
// or @), so only what no database gives is refused: an empty name, a
// control character, or a name of digits only, which is an id written as
// a name.
func checkName(v string) error {
	if v == "" {
		return fmt.Errorf("empty name")
	}
	if strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("%q holds a control character", v)
	}
	if strings.Trim(v, "0123456789") == "" {
		return fmt.Errorf("%q is a number, not a name (ids are unix:uid, unix:gid, unix:supplementary_gid)", v)
	}
	return nil
}

// checkPath: the kernel gives a binary's path absolute and clean.
func checkPath(v string) error {
	if !strings.HasPrefix(v, "/") {
		return fmt.Errorf("%q is not absolute", v)
	}
	if path.Clean(v) != v {
		return fmt.Errorf("%q is not clean (the agent sees %q)", v, path.Clean(v))
	}
	return nil
}

var hex64 = regexp.MustCompile(`^[0-9a-f]{64}$`)

func checkHex64(v string) error {
	if !hex64.MatchString(v) {
		return fmt.Errorf("%q is not 64 lowercase hex digits", v)
	}
	return nil
}

// unitName is a systemd unit name as a cgroup directory holds it.
var unitName = regexp.MustCompile(`^[A-Za-z0-9:_.\\@-]+\.(service|scope)$`)

// userManager units (user@UID.service) are never reported: the user
// names what runs under them.
var userManager = regexp.MustCompile(`^user@[0-9]+\.service$`)

func checkUnit(v string) error {
	switch {
	case userManager.MatchString(v):
		return fmt.Errorf("%s is a user's service manager, whose processes the agent does not attribute to a unit", v)
	case !unitName.MatchString(v):
		if i := strings.LastIndexByte(v, '.'); i >= 0 && !strings.Contains(v[i:], "/") {
			return fmt.Errorf("%q: processes run in .service and .scope units, not %s units", v, v[i+1:])
		}
		return fmt.Errorf("%q is not a .service or .scope unit name", v)
	}
	return nil
}
