package state

import (
	"fmt"
	"strings"
	"testing"
)

// TestSelectorRulesPinned pins what version 4 commands accept: the state
// machine checks selectors inside Apply, and nodes rebuild their state by
// replaying the log, so a rule that changed under an unchanged command
// version would replay old commands with other verdicts than the replicas
// that applied them live (other entries, another audit chain). A change
// to appliance/selector that flips any verdict here needs a new
// CommandVersion, with these rules kept for version 4. Version 5 changed
// renewals only (RenewGraceVersion), version 6 added job identity
// (JobVersion), version 7 federation (FederationVersion), version 8
// the issuing CA renewal (NodeCAInstallVersion) and version 9 root
// rotation (RootRotationVersion): their selector rules are version 4's.
func TestSelectorRulesPinned(t *testing.T) {
	if CommandVersion != 9 || EntryRulesVersion != 4 {
		t.Fatalf("CommandVersion %d, EntryRulesVersion %d: pin the rules of the new version here and keep version 4's", CommandVersion, EntryRulesVersion)
	}
	hex := func(c string) string { return strings.Repeat(c, 64) }
	for i, tc := range []struct {
		sel    string
		accept bool
	}{
		{"unix:uid:0", true}, {"unix:uid:1000", true}, {"unix:uid:4294967295", true},
		{"unix:uid:4294967296", false}, {"unix:uid:-1", false}, {"unix:uid:01", false}, {"unix:uid:abc", false}, {"unix:uid:+5", false},
		{"unix:gid:27", true}, {"unix:user:www-data", true}, {"unix:user:1000", false}, {"unix:group:docker", true},
		{"unix:supplementary_gid:27", true}, {"unix:supplementary_group:docker", true},
		{"unix:path:/usr/bin/web", true}, {"unix:path:usr/bin/web", false}, {"unix:path:/usr/../bin/web", false}, {"unix:path:/usr/bin/web/", false},
		{"unix:sha256:" + hex("a"), true}, {"unix:sha256:" + hex("A"), false}, {"unix:sha256:xyz", false},
		{"systemd:unit:web.service", true}, {"systemd:unit:web.scope", true}, {"systemd:unit:web.socket", false}, {"systemd:unit:user@1000.service", false},
		{"container:id:" + hex("0"), true}, {"container:id:abc", false},
		{"unix:colour:blue", false}, {"foo:bar", false}, {"uid:1000", false}, {"unix:uid:", false}, {"k8s:ns:default", false},
	} {
		a := newApplier(t)
		id := fmt.Sprintf("e%07d", i)
		_, err := a.apply(CmdEntryCreate, t0, entry(id, "spiffe://example.org/pin", tc.sel))
		if got := err == nil; got != tc.accept {
			t.Errorf("version %d entry with %s: accepted %v, pinned %v (%v): the rules changed under an unchanged command version",
				CommandVersion, tc.sel, got, tc.accept, err)
		}
	}
	// Contradictions: two values of a kind a workload has one of.
	a := newApplier(t)
	if _, err := a.apply(CmdEntryCreate, t0, entry("e1000000", "spiffe://example.org/pin", "unix:uid:1", "unix:uid:2")); err == nil {
		t.Error("two unix:uid values accepted: the rules changed under an unchanged command version")
	}
	if _, err := a.apply(CmdEntryCreate, t0, entry("e1000001", "spiffe://example.org/pin", "unix:supplementary_gid:1", "unix:supplementary_gid:2")); err != nil {
		t.Errorf("two supplementary gids refused (%v): the rules changed under an unchanged command version", err)
	}
}
