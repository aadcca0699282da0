package node_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// TestIssuingCertRenewalUnderLoad: node-1 installs a renewed issuing
// certificate (the root ceremony signed its existing HSM key again) while
// an agent asks it for X.509-SVIDs every few milliseconds. No request
// fails; SVIDs signed after the install chain to the new certificate; the
// peers go on talking to node-1 (new handshakes see its new chain); the
// change is recorded, audited with both serials, shown in every node's
// expiry metric, carried by a new JWT key; and node-1 restarts with the
// new certificate.
func TestIssuingCertRenewalUnderLoad(t *testing.T) {
	ic := newIssuer(t, "icr")
	c, tr := ic.c, ic.tr
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	old := c.Node("node-1").Authority().Issuing()
	roots := x509bundle.FromX509Authorities(tr.TrustDomain, []*x509.Certificate{tr.Root})

	// The load: one request every 2ms through node-1, counting failures
	// and keeping the issuer of the last SVID.
	ag := ic.agent(t, "node-1")
	l := startSVIDLoad(t, ag, web.ID, 2*time.Millisecond, roots)
	t.Cleanup(l.end)
	clustertest.Eventually(t, 30*time.Second, "the load to get SVIDs", func() bool { return l.ok.Load() >= 20 })

	newPath, renewed := tr.SignIssuing(t, "node-1", "1y", false)
	pemBytes, err := os.ReadFile(newPath)
	if err != nil {
		t.Fatal(err)
	}
	configured, err := os.ReadFile(c.ConfigOf("node-1").IssuingCert)
	if err != nil {
		t.Fatal(err)
	}
	before := l.ok.Load()
	r, err := c.Admin("node-1").NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{Node: "node-1", PEM: pemBytes})
	if err != nil {
		t.Fatalf("install: %v", err)
	}
	newSerial, oldSerial := renewed.SerialNumber.Text(16), old.SerialNumber.Text(16)
	if r.Node != "node-1" || r.Serial != newSerial || r.PreviousSerial != oldSerial || r.JWTKey == "" || !r.NotAfter.Equal(renewed.NotAfter) {
		t.Fatalf("install answered %+v; want serial %s replacing %s and a JWT key", r, newSerial, oldSerial)
	}
	if got := c.Node("node-1").Authority().Issuing(); !got.Equal(renewed) {
		t.Fatalf("node-1 signs with serial %x after the install", got.SerialNumber)
	}
	clustertest.Eventually(t, 30*time.Second, "SVIDs from node-1 to chain to the new certificate", func() bool {
		last := l.lastIssuer.Load()
		return l.ok.Load() > before+20 && last != nil && last.Equal(renewed)
	})

	// The peers: node-1's raft connections are dropped, so every peer
	// handshakes again with node-1's new chain; writes through node-1
	// still commit and reach it (the load's issuances commit through raft
	// too).
	c.Node("node-1").Raft().ResetConnections(0)
	for i := range 3 {
		if _, err := c.Admin("node-1").EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{
			SPIFFEID: fmt.Sprintf("spiffe://example.org/after-%d", i), ParentID: agentID,
			Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}, X509TTL: 600}, Force: true}); err != nil {
			t.Fatalf("write through node-1 after the install: %v", err)
		}
	}
	head := l.ok.Load()
	clustertest.Eventually(t, 20*time.Second, "issuance to go on after node-1's connections were reset", func() bool { return l.ok.Load() > head+20 })
	l.end()
	if n := l.failed.Load(); n != 0 {
		t.Fatalf("%d of %d requests failed during the install; first: %v", n, n+l.ok.Load(), l.firstErr.Load())
	}
	t.Logf("%d SVIDs issued, none failed", l.ok.Load())

	// Recorded on every replica, with the expiry; audited with both serials
	// and the admin who asked.
	for _, id := range []string{"node-2", "node-3"} {
		clustertest.Eventually(t, 10*time.Second, id+" to record node-1's new CA", func() bool {
			for _, rec := range c.Node(id).State().NodeCAs() {
				if rec.Node == "node-1" {
					return rec.Serial == newSerial && rec.NotAfter.Equal(renewed.NotAfter.UTC())
				}
			}
			return false
		})
	}
	// (A node showing a changed CA itself after a start is audited in its
	// own name: not here.)
	var recs []api.AuditRecord
	for _, rec := range auditActions(t, c, "node-3")[state.CmdNodeCAInstall] {
		if !strings.Contains(rec.Actor, "/sigil/node/") {
			recs = append(recs, rec)
		}
	}
	if len(recs) != 1 || recs[0].Detail["serial"] != newSerial || recs[0].Detail["previous_serial"] != oldSerial ||
		recs[0].Actor != "spiffe://example.org/sigil/admin/test-admin" || recs[0].Target != "node-1" {
		t.Fatalf("install audit records: %+v", recs)
	}
	// The JWT key published with it carries the new CA.
	found := false
	for _, k := range c.Node("node-2").State().Bundle().JWTKeys {
		if k.KID == r.JWTKey {
			found = bytes.Equal(k.CA, renewed.Raw)
		}
	}
	if !found {
		t.Fatalf("JWT key %s is not in the bundle with the new CA", r.JWTKey)
	}
	// Every node's metric shows node-1's new certificate.
	want := fmt.Sprintf(`sigil_node_issuing_ca_expiry_seconds{node="node-1",serial="%s"}`, newSerial)
	for _, id := range []string{"node-1", "node-3"} {
		clustertest.Eventually(t, 10*time.Second, id+" to report node-1's new expiry", func() bool {
			v := scrape(t, c, id)[want]
			return v > 360*24*3600 && v <= time.Until(renewed.NotAfter).Seconds()+1
		})
	}
	// The status answer lists it.
	st, err := c.Admin("node-2").ClusterStatus(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	listed := false
	for _, e := range st.Expiries {
		listed = listed || e.Kind == api.ExpiryIssuingCA && e.Name == "node-1" && e.Serial == newSerial
	}
	if !listed {
		t.Fatalf("cluster status expiries lack node-1's new CA: %+v", st.Expiries)
	}

	// The files: the configured issuing-cert is the operator's and stays
	// as it was (the packaged unit could not write it); the installed
	// certificate is kept in node-1's data directory.
	path := c.ConfigOf("node-1").IssuingCert
	if cur, err := os.ReadFile(path); err != nil || !bytes.Equal(cur, configured) {
		t.Fatalf("the install changed the configured %s: %v", path, err)
	}
	dir := filepath.Join(c.ConfigOf("node-1").DataDir, "issuing")
	if cur, err := os.ReadFile(filepath.Join(dir, "current.pem")); err != nil || !bytes.Equal(cur, pemBytes) {
		t.Fatalf("%s/current.pem after the install: %v\n%s", dir, err, cur)
	}
	if fi, err := os.Stat(filepath.Join(dir, "current.pem")); err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("%s/current.pem: %v, mode %v, want 0644", dir, err, fi.Mode())
	}
	if _, err := os.Stat(filepath.Join(dir, "previous.pem")); !os.IsNotExist(err) {
		t.Fatalf("a first install left previous.pem: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.new-*")); len(left) != 0 {
		t.Fatalf("staged files left: %v", left)
	}

	// After a restart, its config still naming the old certificate's
	// file, node-1 uses the new certificate and says so.
	c.Stop("node-1")
	c.Start("node-1")
	if got := c.Node("node-1").Authority().Issuing(); !got.Equal(renewed) {
		t.Fatalf("node-1 restarted with serial %x, want %s", got.SerialNumber, newSerial)
	}
	if !strings.Contains(c.Log.String(), "issuing certificate installed while the node ran is used instead of the configured issuing-cert") {
		t.Error("the start did not log that it used the installed certificate")
	}
	var chain []*x509.Certificate
	clustertest.Eventually(t, 30*time.Second, "node-1 to issue after its restart", func() bool {
		res, err := ic.agent(t, "node-1").SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csrFor(t, "")}}})
		if err != nil || res.Results[0].Error != "" {
			return false
		}
		chain = nil
		for _, der := range res.Results[0].Chain {
			c, _ := x509.ParseCertificate(der)
			chain = append(chain, c)
		}
		return true
	})
	if _, _, err := x509svid.Verify(chain, roots); err != nil || !chain[1].Equal(renewed) {
		t.Fatalf("SVID after the restart: %v, issued by serial %x", err, chain[1].SerialNumber)
	}

	// A second install keeps the first one as previous.pem.
	secondPath, _ := tr.SignIssuing(t, "node-1", "1y", false)
	second, err := os.ReadFile(secondPath)
	if err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 30*time.Second, "the second install", func() bool {
		_, err := c.Admin("node-1").NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: second})
		return err == nil
	})
	if cur, err := os.ReadFile(filepath.Join(dir, "current.pem")); err != nil || !bytes.Equal(cur, second) {
		t.Fatalf("current.pem after the second install: %v", err)
	}
	if prev, err := os.ReadFile(filepath.Join(dir, "previous.pem")); err != nil || !bytes.Equal(prev, pemBytes) {
		t.Fatalf("previous.pem after the second install: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.new*")); len(left) != 0 {
		t.Fatalf("staged files left: %v", left)
	}
}

// TestIssuingCertInstallRefusals: every certificate node-1 must not take
// is refused with the reason, and nothing changes (the certificate it
// signs with, its file, the state's record).
func TestIssuingCertInstallRefusals(t *testing.T) {
	tr := clustertest.NewTrust(t, "icx", []string{"node-1", "node-2"}, []string{"rogue-1"})
	c := clustertest.NewCluster(t, tr, "node-1")
	ctx := context.Background()
	admin := c.Admin("node-1")
	cur := c.Node("node-1").Authority().Issuing()
	path := c.ConfigOf("node-1").IssuingCert
	fileBefore, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 30*time.Second, "node-1 to show its CA after its start", func() bool {
		return len(c.Node("node-1").State().NodeCAs()) == 1
	})
	recordBefore := c.Node("node-1").State().NodeCAs()
	auditedBefore := len(auditActions(t, c, "node-1")[state.CmdNodeCAInstall])

	// Certificates the root key signs outside the ceremony, as a
	// mistaken or hostile tool would: built on node-1's certificate.
	ks := pkcs11.New(pkcs11.Options{})
	t.Cleanup(func() { _ = ks.Close() })
	rootKey, err := ks.Signer(ctx, tr.RootToken.KeyURI("root"))
	if err != nil {
		t.Fatal(err)
	}
	forge := func(mod func(*x509.Certificate), pub crypto.PublicKey) []byte {
		t.Helper()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: cur.Subject,
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(400 * 24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
			URIs: cur.URIs, PermittedURIDomains: cur.PermittedURIDomains}
		mod(tmpl)
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tr.Root, pub, rootKey)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	file := func(p string) []byte {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	rogue, _ := tr.SignIssuing(t, "node-1", "1y", true)
	shorter, _ := tr.SignIssuing(t, "node-1", "30d", false)
	node2, _ := tr.SignIssuing(t, "node-2", "1y", false)
	otherTD, _ := url.Parse("spiffe://other.org")
	for _, tc := range []struct {
		name string
		node string
		pem  []byte
		code codes.Code
		want string
	}{
		{"another root", "node-1", file(rogue), codes.FailedPrecondition, "does not chain to the root"},
		{"another node's key", "node-1", forge(func(*x509.Certificate) {}, tr.Nodes["node-2"].Issuing.PublicKey), codes.FailedPrecondition, "HSM key is not the key of the issuing CA certificate"},
		{"outlives the root", "node-1", forge(func(c *x509.Certificate) { c.NotAfter = tr.Root.NotAfter.Add(24 * time.Hour) }, cur.PublicKey), codes.FailedPrecondition, "after the root that signed it"},
		{"expired", "node-1", forge(func(c *x509.Certificate) {
			c.NotBefore, c.NotAfter = time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)
		}, cur.PublicKey), codes.FailedPrecondition, "expired"},
		{"another trust domain", "node-1", forge(func(c *x509.Certificate) {
			c.URIs, c.PermittedURIDomains = []*url.URL{otherTD}, []string{"other.org"}
		}, cur.PublicKey), codes.FailedPrecondition, "this node serves trust domain example.org"},
		{"expires sooner", "node-1", file(shorter), codes.FailedPrecondition, "not later than the current one"},
		{"the current one again", "node-1", fileBefore, codes.FailedPrecondition, "signs with already"},
		{"another node's certificate", "node-1", file(node2), codes.InvalidArgument, `is for node "node-2", not node "node-1"`},
		{"a request for another node", "node-2", file(node2), codes.FailedPrecondition, `the request is for node "node-2", and this is node node-1: send it to node "node-2"`},
		{"a request for another node, by the certificate", "", file(node2), codes.FailedPrecondition, `this is node node-1`},
		{"not a certificate", "node-1", []byte("hello"), codes.InvalidArgument, "holds no PEM CERTIFICATE"},
	} {
		_, err := admin.NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{Node: tc.node, PEM: tc.pem})
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.want) {
			t.Errorf("%s: %v, want %v containing %q", tc.name, err, tc.code, tc.want)
		}
	}
	// The revoked one: a renewal the root has revoked since.
	revoked, revokedCert := tr.SignIssuing(t, "node-1", "1y", false)
	crlPath := tr.Nodes["node-1"].IssuingPath
	tr.Nodes["node-1"].IssuingPath = revoked // RootCRL revokes the node's IssuingPath
	crl := tr.RootCRL(t, 1, "node-1")
	tr.Nodes["node-1"].IssuingPath = crlPath
	if _, err := admin.RootCRLAdd(ctx, &api.RootCRLRequest{CRL: crl}); err != nil {
		t.Fatal(err)
	}
	_, err = admin.NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: file(revoked)})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "on the root's CRL") {
		t.Errorf("revoked renewal (serial %x): %v", revokedCert.SerialNumber, err)
	}

	if got := c.Node("node-1").Authority().Issuing(); !got.Equal(cur) {
		t.Fatalf("a refusal changed the certificate node-1 signs with: serial %x", got.SerialNumber)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, fileBefore) {
		t.Fatal("a refusal changed node-1's issuing-cert file")
	}
	if left, _ := filepath.Glob(filepath.Join(c.ConfigOf("node-1").DataDir, "issuing", "*")); len(left) != 0 {
		t.Fatalf("a refusal left files in the data directory: %v", left)
	}
	if after := c.Node("node-1").State().NodeCAs(); len(after) != 1 || after[0].Serial != recordBefore[0].Serial || after[0].Index != recordBefore[0].Index {
		t.Fatalf("a refusal changed the state's record: %+v, was %+v", after, recordBefore)
	}
	if recs := auditActions(t, c, "node-1")[state.CmdNodeCAInstall]; len(recs) != auditedBefore {
		t.Fatalf("refusals audited as installs: %+v", recs)
	}
}

// TestIssuingCertStartIgnoresBadCopy: a certificate in the data
// directory's issuing/current.pem that is not one node-1 may use, or is
// stale (the configured one expires later), is ignored at start with a
// warning naming why, and node-1 starts with the configured issuing-cert;
// a valid one that expires later is used.
func TestIssuingCertStartIgnoresBadCopy(t *testing.T) {
	tr := clustertest.NewTrust(t, "icd", []string{"node-1", "node-2"}, []string{"rogue-1"})
	c := clustertest.NewCluster(t, tr, "node-1")
	configured := c.Node("node-1").Authority().Issuing()
	dir := filepath.Join(c.ConfigOf("node-1").DataDir, "issuing")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	file := func(p string) []byte {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	stale, _ := tr.SignIssuing(t, "node-1", "30d", false)
	rogue, _ := tr.SignIssuing(t, "node-1", "1y", true)
	node2, _ := tr.SignIssuing(t, "node-2", "1y", false)
	c.Stop("node-1")
	for _, tc := range []struct {
		name, reason string
		pem          []byte
	}{
		{"not a certificate", "CERTIFICATE", []byte("hello")},
		{"stale", "expires no later than the configured issuing-cert", file(stale)},
		{"another root", "does not chain to the root", file(rogue)},
		{"another node's key", "another key than the configured issuing-cert", file(node2)},
	} {
		if err := os.WriteFile(filepath.Join(dir, "current.pem"), tc.pem, 0o644); err != nil {
			t.Fatal(err)
		}
		before := strings.Count(c.Log.String(), "the issuing certificate installed in the data directory is not used")
		n := c.Start("node-1")
		if got := n.Authority().Issuing(); !got.Equal(configured) {
			t.Errorf("%s: node-1 started with serial %x, want the configured %x", tc.name, got.SerialNumber, configured.SerialNumber)
		}
		var warned bool
		for _, l := range strings.Split(c.Log.String(), "\n") {
			warned = warned || strings.Contains(l, "the issuing certificate installed in the data directory is not used") && strings.Contains(l, `"level":"WARN"`) && strings.Contains(l, tc.reason)
		}
		if after := strings.Count(c.Log.String(), "the issuing certificate installed in the data directory is not used"); after != before+1 || !warned {
			t.Errorf("%s: %d warnings, want one giving the reason %q", tc.name, after-before, tc.reason)
		}
		c.Stop("node-1")
	}
	// A valid one expiring later is used (as an install would have left
	// it).
	good, goodCert := tr.SignIssuing(t, "node-1", "1y", false)
	if err := os.WriteFile(filepath.Join(dir, "current.pem"), file(good), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := c.Start("node-1").Authority().Issuing(); !got.Equal(goodCert) {
		t.Fatalf("node-1 started with serial %x, want the data directory's %x", got.SerialNumber, goodCert.SerialNumber)
	}
}
