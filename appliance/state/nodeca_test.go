package state

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"
)

// TestNodeCAInstall: a renewed issuing CA of the proposing node is
// recorded with its expiry and audited with both serials, whether an
// admin installed it or the node showed it (a node's first showing is
// recorded, not audited); one of another node, of
// another root, expired at the command's time, revoked, or in a command
// older than version 8 is refused and changes nothing. A node whose
// recorded CA was revoked gets its new one through.
func TestNodeCAInstall(t *testing.T) {
	p := newCRLPKI(t)
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}})
	a.must(CmdJWTKeyAdd, p.jwtKey(t, "node-1-aaaaaaaa", "node-1", p.nodes["node-1"].Raw))
	old := p.nodes["node-1"]
	renew := func(cn string, notBefore, notAfter time.Time, by *crlPKI) *x509.Certificate {
		t.Helper()
		if by == nil {
			by = p
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn}, NotBefore: notBefore,
			NotAfter: notAfter, IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		der, err := x509.CreateCertificate(rand.Reader, tmpl, by.root, &k.PublicKey, by.rootKey)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c
	}
	day := 24 * time.Hour
	record := func() NodeCA {
		for _, r := range a.fsm.NodeCAs() {
			if r.Node == "node-1" {
				return r
			}
		}
		return NodeCA{}
	}
	if r := record(); r.Serial != old.SerialNumber.Text(16) || !r.NotAfter.Equal(old.NotAfter) {
		t.Fatalf("record after the JWT key: %+v", r)
	}
	otherRoot := newCRLPKI(t)
	before := record()
	for name, tc := range map[string]struct {
		cmd  []byte
		want string
	}{
		"another node's CA": {testCommand(t, CmdNodeCAInstall, admin, "", t0, NodeCAInstall{Cert: renew("node-2", t0, t0.Add(day), nil).Raw}), "not an issuing CA of node node-1"},
		"another root":      {testCommand(t, CmdNodeCAInstall, admin, "", t0, NodeCAInstall{Cert: renew("node-1", t0, t0.Add(day), otherRoot).Raw}), "not a valid chain"},
		"expired":           {testCommand(t, CmdNodeCAInstall, admin, "", t0, NodeCAInstall{Cert: renew("node-1", t0.Add(-2*day), t0.Add(-day), nil).Raw}), "not a valid chain"},
		"junk":              {testCommand(t, CmdNodeCAInstall, admin, "", t0, NodeCAInstall{Cert: []byte("junk")}), "issuing CA certificate"},
	} {
		a.index++
		if _, err := a.fsm.Apply(a.index, origin, tc.cmd); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a refusal containing %q", name, err, tc.want)
		}
		if r := record(); r.Serial != before.Serial || r.Index != before.Index {
			t.Fatalf("%s: refusal changed the record to %+v", name, r)
		}
	}

	// A version 2 command (on a fresh replica: this one refuses every
	// version older than the newest it committed).
	fresh := newApplier(t)
	fresh.index++
	if _, err := fresh.fsm.Apply(fresh.index, origin, v2Command(t, CmdNodeCAInstall, admin, "", t0, NodeCAInstall{Cert: renew("node-1", t0, t0.Add(day), nil).Raw})); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "needs command version 8") {
		t.Errorf("version 2 command: %v", err)
	}

	// A node showing its CA for the first time: recorded, not audited
	// (nothing changed; what it started with is registered).
	first := newApplier(t)
	first.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}})
	if _, err := first.applyAs(nodeActor, CmdNodeCAInstall, NodeCAInstall{Cert: old.Raw}); err != nil {
		t.Fatal(err)
	}
	if recs := first.fsm.NodeCAs(); len(recs) != 1 || recs[0].Serial != old.SerialNumber.Text(16) {
		t.Fatalf("first show: %+v", recs)
	}
	for _, r := range first.fsm.Audit(0, 0) {
		if r.Action == CmdNodeCAInstall {
			t.Fatalf("first show audited: %+v", r)
		}
	}

	// node-1's recorded CA is revoked: its commands are refused from now
	// on, but its renewed CA gets through (checkOriginCA), recorded and
	// audited with both serials.
	a.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 1, t0, t0.Add(day), "node-1")})
	if _, err := a.apply(CmdEntryCreate, t0, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "revokes") {
		t.Fatalf("a command through node-1 with its CA revoked: %v", err)
	}
	renewed := renew("node-1", t0.Add(-time.Hour), t0.Add(200*day), nil)
	if _, err := a.apply(CmdNodeCAInstall, t0, NodeCAInstall{Cert: renewed.Raw, Previous: old.SerialNumber.Text(16)}); err != nil {
		t.Fatal(err)
	}
	if r := record(); r.Serial != renewed.SerialNumber.Text(16) || !r.NotAfter.Equal(renewed.NotAfter) {
		t.Fatalf("record after the install: %+v", r)
	}
	var audited []AuditRecord
	for _, r := range a.fsm.Audit(0, 0) {
		if r.Action == CmdNodeCAInstall {
			audited = append(audited, r)
		}
	}
	if len(audited) != 1 || audited[0].Actor != admin || audited[0].Detail["serial"] != renewed.SerialNumber.Text(16) ||
		audited[0].Detail["previous_serial"] != old.SerialNumber.Text(16) || audited[0].Target != "node-1" {
		t.Fatalf("audit: %+v", audited)
	}
	a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1"))
	// The node showing the recorded CA again: nothing changes, nothing is
	// audited.
	idx := record().Index
	if _, err := a.applyAs(nodeActor, CmdNodeCAInstall, NodeCAInstall{Cert: renewed.Raw}); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, r := range a.fsm.Audit(0, 0) {
		if r.Action == CmdNodeCAInstall {
			n++
		}
	}
	if record().Index != idx || n != 1 {
		t.Fatalf("showing the recorded CA again: record index %d (was %d), %d install records", record().Index, idx, n)
	}
	// The node showing the revoked CA itself is refused.
	if _, err := a.applyAs(nodeActor, CmdNodeCAInstall, NodeCAInstall{Cert: old.Raw}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("showing the revoked CA: %v", err)
	}
	if r := record(); r.Serial != renewed.SerialNumber.Text(16) {
		t.Fatalf("record after the refused show: %+v", r)
	}
}
