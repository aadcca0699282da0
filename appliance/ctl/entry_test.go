package ctl_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"regexp"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/ctl"
)

// joinAgent joins an agent by token, as sigil-agent does, and returns its
// SPIFFE ID.
func joinAgent(t *testing.T, c *clustertest.Cluster, tr *clustertest.Trust) string {
	t.Helper()
	ctx := context.Background()
	tok, err := c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf("node-1").API.Listen, RootFile: tr.RootPath, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	svid, err := api.NewJoinClient(conn).Token(ctx, &api.JoinTokenRequest{Token: tok.Token, CSR: csr})
	if err != nil {
		t.Fatalf("token join: %v", err)
	}
	return svid.AgentID
}

// The mistakes an operator can make with entries, through sigilctl as
// typed: each is refused with its reason and the exit code, and changes
// nothing; updates change only what is given and say what changed.
func TestSigilctlEntryMistakes(t *testing.T) {
	tr := clustertest.NewTrust(t, "em", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	agent := joinAgent(t, c, tr)
	sock := c.ConfigOf("node-1").API.LocalSocket
	sigilctl := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := ctl.Run(context.Background(), append([]string{"--socket", sock}, args...), &out, &errOut)
		return code, out.String(), errOut.String()
	}
	expect := func(wantCode int, want []string, args ...string) (string, string) {
		t.Helper()
		code, out, errOut := sigilctl(args...)
		if code != wantCode {
			t.Errorf("sigilctl %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, wantCode, out, errOut)
		}
		for _, w := range want {
			if !strings.Contains(out+errOut, w) {
				t.Errorf("sigilctl %s: output lacks %q\nstdout: %s\nstderr: %s", strings.Join(args, " "), w, out, errOut)
			}
		}
		return out, errOut
	}
	create := func(extra ...string) []string {
		return append([]string{"entry", "create", "--spiffe-id", "spiffe://example.org/web", "--parent-id", agent}, extra...)
	}
	entries := func() []api.Entry {
		t.Helper()
		out, _ := expect(0, nil, "-o", "json", "entry", "list")
		var l []api.Entry
		if err := json.Unmarshal([]byte(out), &l); err != nil {
			t.Fatalf("entry list json: %v\n%s", err, out)
		}
		return l
	}

	// Selectors no agent produces, and sets no workload can show.
	for sel, want := range map[string]string{
		"unix:uid:abc":     `selector "unix:uid:abc": "abc" is not a decimal id`,
		"foo:bar":          `unknown type "foo"`,
		"uid:1000":         "has no type: did you mean unix:uid:1000?",
		"unix:colour:blue": "sigil-agent produces no unix:colour selector",
		"unix:sha256:xyz":  `"xyz" is not 64 lowercase hex digits`,
		"unix:path:bin/x":  "is not absolute",
	} {
		expect(1, []string{want}, create("--selector", sel)...)
	}
	expect(1, []string{"selectors unix:uid:1 and unix:uid:2 can never both match"}, create("--selector", "unix:uid:1", "--selector", "unix:uid:2")...)
	expect(1, []string{"can never both match: a workload has one unix:sha256"},
		create("--selector", "unix:sha256:"+strings.Repeat("a", 64), "--selector", "unix:sha256:"+strings.Repeat("b", 64))...)
	expect(1, []string{"can never both match: a workload has one systemd:unit"},
		create("--selector", "systemd:unit:a.service", "--selector", "systemd:unit:b.service")...)
	expect(2, []string{`--selector "uid": want type:value`}, create("--selector", "uid")...)
	if l := entries(); len(l) != 0 {
		t.Fatalf("refused entries were stored: %+v", l)
	}

	// Parents no agent serves: refused, or registered with --force, which
	// says what it overrode.
	unjoined := "spiffe://example.org/sigil/agent/tpm/" + strings.Repeat("c", 64)
	expect(1, []string{"parent_id " + unjoined + " is not an agent that has joined this appliance", "(--force registers it anyway)"},
		"entry", "create", "--spiffe-id", "spiffe://example.org/early", "--parent-id", unjoined, "--selector", "unix:uid:1")
	expect(1, []string{"parent_id spiffe://example.org/sigil/node/node-1 is a node: only agents fetch workload entries"},
		"entry", "create", "--spiffe-id", "spiffe://example.org/n", "--parent-id", "spiffe://example.org/sigil/node/node-1", "--selector", "unix:uid:1")
	if l := entries(); len(l) != 0 {
		t.Fatalf("refused entries were stored: %+v", l)
	}
	_, errOut := expect(0, []string{"spiffe://example.org/early"},
		"entry", "create", "--spiffe-id", "spiffe://example.org/early", "--parent-id", unjoined, "--selector", "unix:uid:1", "--force")
	if !strings.Contains(errOut, "forced: parent_id "+unjoined+" is not an agent that has joined") {
		t.Errorf("--force did not say what it overrode: %q", errOut)
	}
	// --force on an entry that needs no override says nothing of it.
	out, errOut := expect(0, nil, create("--selector", "unix:uid:1000", "--x509-ttl", "10m", "--force")...)
	if strings.Contains(errOut, "forced") {
		t.Errorf("--force on a joined agent's entry: %q", errOut)
	}
	id := regexp.MustCompile(`(?m)^id\s+(\S+)`).FindStringSubmatch(out)
	if id == nil {
		t.Fatalf("entry create printed no id:\n%s", out)
	}
	web := id[1]
	expect(0, []string{"banned " + agent}, "agent", "ban", agent)
	expect(1, []string{"is a banned agent: it gets no SVIDs until it is unbanned", "--force"},
		"entry", "create", "--spiffe-id", "spiffe://example.org/b", "--parent-id", agent, "--selector", "unix:uid:5")
	expect(0, nil, "agent", "unban", agent)

	// Defaults are shown as what they are.
	out, _ = expect(0, []string{"x509_ttl", "10m", "jwt_ttl", "5m (default)"}, "entry", "show", web)
	if strings.Contains(out, "0s") {
		t.Errorf("entry show prints a stored 0:\n%s", out)
	}
	out, _ = expect(0, nil, "-o", "json", "entry", "show", web)
	var shown map[string]any
	if err := json.Unmarshal([]byte(out), &shown); err != nil {
		t.Fatal(err)
	}
	if shown["x509_ttl"] != 600.0 || shown["effective_x509_ttl"] != 600.0 || shown["jwt_ttl"] != nil || shown["effective_jwt_ttl"] != 300.0 {
		t.Errorf("entry show json: stored and effective TTLs: %s", out)
	}
	expect(0, []string{"1h (default)", "5m (default)"}, "entry", "list", "--spiffe-id", "spiffe://example.org/early")

	// Updates change the fields given, and say old -> new.
	out, _ = expect(0, []string{"updated entry " + web}, "entry", "update", web, "--hint", "x")
	if !regexp.MustCompile(`hint\s+\(empty\) -> x`).MatchString(out) || strings.Contains(out, "ttl") || strings.Contains(out, "selectors") {
		t.Errorf("update --hint printed:\n%s", out)
	}
	out, _ = expect(0, nil, "entry", "show", web)
	for _, want := range []string{`x509_ttl\s+10m\n`, `hint\s+x\n`, `selectors\s+unix:uid:1000\n`, `spiffe_id\s+spiffe://example.org/web\n`} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("after update --hint, entry show lacks %s:\n%s", want, out)
		}
	}
	expect(0, []string{"x509_ttl", "10m -> 1h (default)"}, "entry", "update", web, "--x509-ttl", "0")
	expect(0, []string{"selectors", "unix:uid:1000 -> unix:gid:1000,unix:uid:1000"}, "entry", "update", web, "--add-selector", "unix:gid:1000")
	expect(0, []string{"unix:gid:1000,unix:uid:1000 -> unix:uid:1000"}, "entry", "update", web, "--remove-selector", "unix:gid:1000")
	expect(1, []string{"--remove-selector unix:gid:5: entry " + web + " has no such selector"}, "entry", "update", web, "--remove-selector", "unix:gid:5")
	expect(1, []string{"can never both match"}, "entry", "update", web, "--add-selector", "unix:uid:2")
	expect(1, []string{"not a decimal id"}, "entry", "update", web, "--selector", "unix:uid:me")
	expect(0, []string{"unix:uid:1000 -> unix:uid:1001"}, "entry", "update", web, "--selector", "unix:uid:1001")
	expect(0, []string{"entry " + web + " unchanged"}, "entry", "update", web, "--hint", "x")
	expect(2, []string{"nothing to change"}, "entry", "update", web)
	expect(2, []string{"--selector replaces all the selectors"}, "entry", "update", web, "--selector", "unix:uid:1", "--add-selector", "unix:gid:1")
	expect(1, []string{"is a node"}, "entry", "update", web, "--parent-id", "spiffe://example.org/sigil/node/node-1")
	out, _ = expect(0, nil, "-o", "json", "entry", "update", web, "--dns", "web.example.org")
	var upd struct {
		Entry   api.Entry `json:"entry"`
		Changes []struct {
			Field, Old, New string
		} `json:"changes"`
	}
	if err := json.Unmarshal([]byte(out), &upd); err != nil || upd.Entry.ID != web || len(upd.Changes) != 1 || upd.Changes[0].Field != "dns_names" || upd.Changes[0].New != "web.example.org" {
		t.Errorf("update json: %v\n%s", err, out)
	}
	out, _ = expect(0, nil, "-o", "json", "entry", "show", web)
	var final api.Entry
	if err := json.Unmarshal([]byte(out), &final); err != nil || final.Hint != "x" || final.X509TTL != 0 || len(final.DNSNames) != 1 || len(final.Selectors) != 1 {
		t.Errorf("entry after the updates: %v %+v", err, final)
	}

	// A mistyped subcommand.
	expect(2, []string{`unknown command "lst"`}, "entry", "lst")
}

// IP SANs through sigilctl as typed: given, shown, replaced and cleared;
// a bad address is refused with its reason. A hint another entry of the
// same parent already has is warned about on stderr, and the entry is
// still stored (the warning is sigilctl's: the appliance accepts it).
func TestSigilctlEntryIPsAndHints(t *testing.T) {
	tr := clustertest.NewTrust(t, "eip", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	agent := joinAgent(t, c, tr)
	other := joinAgent(t, c, tr)
	sock := c.ConfigOf("node-1").API.LocalSocket
	expect := func(wantCode int, want []string, args ...string) (string, string) {
		t.Helper()
		var out, errOut bytes.Buffer
		code := ctl.Run(context.Background(), append([]string{"--socket", sock}, args...), &out, &errOut)
		if code != wantCode {
			t.Errorf("sigilctl %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, wantCode, out.String(), errOut.String())
		}
		for _, w := range want {
			if !strings.Contains(out.String()+errOut.String(), w) {
				t.Errorf("sigilctl %s: output lacks %q\nstdout: %s\nstderr: %s", strings.Join(args, " "), w, out.String(), errOut.String())
			}
		}
		return out.String(), errOut.String()
	}
	create := func(path, parent string, extra ...string) []string {
		return append([]string{"entry", "create", "--spiffe-id", "spiffe://example.org" + path, "--parent-id", parent}, extra...)
	}
	idOf := func(out string) string {
		t.Helper()
		m := regexp.MustCompile(`(?m)^id\s+(\S+)`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no id in:\n%s", out)
		}
		return m[1]
	}

	expect(1, []string{`ip address "10.0.0.256": not an IPv4 or IPv6 address`}, create("/db", agent, "--selector", "unix:uid:1", "--ip", "10.0.0.256")...)
	expect(1, []string{"224.0.0.1 is a multicast address"}, create("/db", agent, "--selector", "unix:uid:1", "--ip", "224.0.0.1")...)
	expect(1, []string{"0.0.0.0 is the unspecified address"}, create("/db", agent, "--selector", "unix:uid:1", "--ip", "0.0.0.0")...)
	// Written as the appliance stores it.
	out, errOut := expect(0, nil, create("/db", agent, "--selector", "unix:uid:1", "--ip", "10.0.0.5", "--ip", "FD00:0::1", "--hint", "db")...)
	if !regexp.MustCompile(`ip_addresses\s+10.0.0.5,fd00::1\n`).MatchString(out) {
		t.Errorf("entry create --ip printed:\n%s", out)
	}
	if strings.Contains(errOut, "warning") {
		t.Errorf("the first entry with a hint was warned about: %q", errOut)
	}
	db := idOf(out)
	out, _ = expect(0, nil, "-o", "json", "entry", "show", db)
	var shown api.Entry
	if err := json.Unmarshal([]byte(out), &shown); err != nil || strings.Join(shown.IPAddresses, ",") != "10.0.0.5,fd00::1" {
		t.Errorf("entry show json: %v\n%s", err, out)
	}
	if !strings.Contains(out, `"ip_addresses"`) {
		t.Errorf("entry show json has no ip_addresses:\n%s", out)
	}
	expect(0, []string{"ip_addresses", "10.0.0.5,fd00::1 -> 192.0.2.1"}, "entry", "update", db, "--ip", "192.0.2.1")
	expect(0, []string{"ip_addresses", "192.0.2.1 -> (empty)"}, "entry", "update", db, "--ip", "")

	// The same hint on another entry of the parent: stored, with a warning.
	out, errOut = expect(0, nil, create("/db-2", agent, "--selector", "unix:uid:2", "--hint", "db")...)
	db2 := idOf(out)
	if !strings.Contains(errOut, `warning: hint "db" is also on entry `+db) || !strings.Contains(errOut, "oldest entry's SVID only") {
		t.Errorf("no warning for a shared hint: %q", errOut)
	}
	// Another parent's entries do not share hints with these; nor does
	// an entry without a hint.
	for _, args := range [][]string{create("/db-3", other, "--selector", "unix:uid:3", "--hint", "db"), create("/plain", agent, "--selector", "unix:uid:4")} {
		if _, errOut := expect(0, nil, args...); strings.Contains(errOut, "warning") {
			t.Errorf("sigilctl %s warned: %q", strings.Join(args, " "), errOut)
		}
	}
	// An update that gives an entry a hint in use warns too; one that
	// leaves the hint alone does not.
	out, _ = expect(0, nil, create("/web", agent, "--selector", "unix:uid:5")...)
	web := idOf(out)
	if _, errOut := expect(0, nil, "entry", "update", web, "--hint", "db"); !strings.Contains(errOut, `hint "db" is also on entry `) ||
		!strings.Contains(errOut, db) || !strings.Contains(errOut, db2) {
		t.Errorf("update to a shared hint: %q", errOut)
	}
	if _, errOut := expect(0, nil, "entry", "update", web, "--x509-ttl", "10m"); strings.Contains(errOut, "warning") {
		t.Errorf("an update that keeps the hint warned: %q", errOut)
	}
}
