package ceremony

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/sigil-appliance/sigil/keystore/pkcs11"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// rootOn is a root script for tok: kind root, or reissue-root when
// previous is set. extra lines go into the root section.
func (e *ceremonyEnv) rootOn(tok *testenv.Token, label, commonName, td, validity, output, extra string) string {
	kind, keyCurve := KindRoot, "  curve: P-384\n"
	if strings.Contains(extra, "previous:") {
		kind, keyCurve = KindReissueRoot, ""
	}
	return fmt.Sprintf(`kind: %s
trust-domain: %s
transcript: %s
%skey:
  label: %s
%sroot:
  subject:
    common-name: %s
    organization: Sigil Test
  validity: %s
%s  output: %s
`, kind, td, e.path("transcript.jsonl"), e.hsmSection(tok, pinFile(tok)), label, keyCurve, commonName, validity, extra, output)
}

func (e *ceremonyEnv) crossScript(label, oldRoot, newRoot, validity, output string) string {
	return fmt.Sprintf(`kind: cross-sign
trust-domain: example.org
transcript: %s
%skey:
  label: %s
cross-sign:
  old-root-certificate: %s
  new-root-certificate: %s
  validity: %s
  output: %s
`, e.path("transcript.jsonl"), e.hsmSection(e.root, pinFile(e.root)), label, oldRoot, newRoot, validity, output)
}

// describe validates script and returns its dry-run plan.
func (e *ceremonyEnv) describe(t *testing.T, kind, script string) string {
	t.Helper()
	cfg, err := Parse([]byte(script), kind)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := cfg.Validate(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := plan.Describe(&b, time.Now()); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func mustCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	c, err := readCert(path)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// A new root for a rotation is made by kind root beside the old one, on
// the same ceremony token under another label or on another token; the old
// key stays as it was and keeps signing, and no label that is taken can be
// reused on its token.
func TestSecondRootLeavesTheOldOneAlone(t *testing.T) {
	e := newEnv(t, "second", "node-1", "ceremony-2")
	other := e.nodes["ceremony-2"]
	mustRun(t, e, KindRoot, e.rootOn(e.root, "root-2026", "Sigil Test Root 2026", "example.org", "10y", e.path("old.pem"), ""))
	mustRun(t, e, KindIssuingCSR, e.csrScript("node-1", "issuing", e.path("n.csr")))
	mustRun(t, e, KindSignIssuing, e.signScript(pinFile(e.root), "root-2026", e.path("old.pem"), e.path("n.csr"), "node-1", e.path("n-old.pem")))
	oldKeys := e.root.PrivateKeys(t)["root-2026"]

	// The same token, a new label; and another token, where even the old
	// label is free (labels are per token).
	out := mustRun(t, e, KindRoot, e.rootOn(e.root, "root-2031", "Sigil Test Root 2031", "example.org", "10y", e.path("new.pem"), ""))
	if !strings.Contains(out, "key generated in HSM") {
		t.Fatalf("second root:\n%s", out)
	}
	mustRun(t, e, KindRoot, e.rootOn(other, "root-2026", "Sigil Test Root 2031b", "example.org", "10y", e.path("new-b.pem"), ""))

	keys := e.root.PrivateKeys(t)
	if len(keys) != 2 || keys["root-2031"]["Access"] != testenv.NonExtractable {
		t.Fatalf("ceremony token keys after the second root: %v", keys)
	}
	if fmt.Sprint(keys["root-2026"]) != fmt.Sprint(oldKeys) {
		t.Fatalf("the old root key changed: %v, was %v", keys["root-2026"], oldKeys)
	}
	oldRoot, newRoot, newB := mustCert(t, e.path("old.pem")), mustCert(t, e.path("new.pem")), mustCert(t, e.path("new-b.pem"))
	if samePublicKey(oldRoot.PublicKey, newRoot.PublicKey) || samePublicKey(oldRoot.PublicKey, newB.PublicKey) || samePublicKey(newRoot.PublicKey, newB.PublicKey) {
		t.Fatal("two roots share a key")
	}

	// The old key still signs as the old root (sign-issuing checks the HSM
	// key is the certificate's), and the new one as the new root.
	mustRun(t, e, KindSignIssuing, e.signScript(pinFile(e.root), "root-2026", e.path("old.pem"), e.path("n.csr"), "node-1", e.path("n-old-2.pem")))
	mustRun(t, e, KindSignIssuing, e.signScript(pinFile(e.root), "root-2031", e.path("new.pem"), e.path("n.csr"), "node-1", e.path("n-new.pem")))
	for file, root := range map[string]*x509.Certificate{"n-old.pem": oldRoot, "n-old-2.pem": oldRoot, "n-new.pem": newRoot} {
		if err := mustCert(t, e.path(file)).CheckSignatureFrom(root); err != nil {
			t.Errorf("%s: %v", file, err)
		}
	}

	// A label taken on its token is refused, whichever root holds it, and
	// the refusal changes nothing.
	for _, tc := range []struct {
		name  string
		tok   *testenv.Token
		label string
	}{{"old label on the old token", e.root, "root-2026"}, {"new label on the old token", e.root, "root-2031"}, {"old label on the other token", other, "root-2026"}} {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, e)
			out, err := e.run(t, KindRoot, e.rootOn(tc.tok, tc.label, "Clobber", "example.org", "10y", e.path("clobber.pem"), ""))
			if err == nil || !strings.Contains(err.Error(), "already holds an object with label "+tc.label) {
				t.Fatalf("root over taken label %s: %v\n%s", tc.label, err, out)
			}
			if after := snapshot(t, e); after != before {
				t.Fatalf("a refused root changed files or tokens:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// issueSVID signs an X.509-SVID with the node's issuing key, which never
// leaves the node's token.
func issueSVID(t *testing.T, tok *testenv.Token, label string, issuing *x509.Certificate) *x509.Certificate {
	t.Helper()
	ks := pkcs11.New(pkcs11.Options{SessionsPerToken: 1})
	defer func() { _ = ks.Close() }()
	signer, err := ks.Signer(context.Background(), tok.KeyURI(label))
	if err != nil {
		t.Fatal(err)
	}
	id, _ := url.Parse("spiffe://example.org/workload/web")
	now := time.Now()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()),
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(time.Hour),
		URIs:         []*url.URL{id},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, issuing, signer.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// The old root's key certifies the new root: the cross certificate carries
// the new root's name, key and constraints, verifies under the old root, and
// an SVID signed under the new root verifies, with it, against the old root
// alone (crypto/x509, go-spiffe and openssl).
func TestCrossSign(t *testing.T) {
	e := newEnv(t, "cross", "node-1")
	mustRun(t, e, KindRoot, e.rootOn(e.root, "root-2026", "Sigil Test Root 2026", "example.org", "10y", e.path("old.pem"), "  path-length: 2\n"))
	mustRun(t, e, KindRoot, e.rootOn(e.root, "root-2031", "Sigil Test Root 2031", "example.org", "12y", e.path("new.pem"), ""))
	mustRun(t, e, KindIssuingCSR, e.csrScript("node-1", "issuing", e.path("n.csr")))
	mustRun(t, e, KindSignIssuing, e.signScript(pinFile(e.root), "root-2031", e.path("new.pem"), e.path("n.csr"), "node-1", e.path("n-new.pem")))
	oldRoot, newRoot, issuing := mustCert(t, e.path("old.pem")), mustCert(t, e.path("new.pem")), mustCert(t, e.path("n-new.pem"))
	if oldRoot.MaxPathLen != 2 || newRoot.MaxPathLen != 1 {
		t.Fatalf("path lengths: old %d, new %d", oldRoot.MaxPathLen, newRoot.MaxPathLen)
	}

	script := e.crossScript("root-2026", e.path("old.pem"), e.path("new.pem"), "1y", e.path("cross.pem"))
	plan := e.describe(t, KindCrossSign, script)
	for _, w := range []string{
		"PLAN of the cross-sign ceremony",
		"old root:              CN=Sigil Test Root 2026,O=Sigil Test",
		"new root:              CN=Sigil Test Root 2031,O=Sigil Test",
		"Find the existing key in the HSM and check it is the key of the old root certificate " + e.path("old.pem"),
		"public key sha256:     " + spkiFingerprint(oldRoot.PublicKey),
		"subject:               CN=Sigil Test Root 2031,O=Sigil Test (the new root's, byte for byte)",
		"issuer:                CN=Sigil Test Root 2026,O=Sigil Test",
		"CA:                    yes, path length 1",
		"name constraint:       URI SANs in example.org only (the new root's)",
		fmt.Sprintf("subject key ID:        %x (the new root's)", newRoot.SubjectKeyId),
		"public key:            the new root's, sha256 " + spkiFingerprint(newRoot.PublicKey),
		fmt.Sprintf("Sign it with the old root key \"root-2026\" on token %q", e.root.Label),
		"Write the cross certificate to " + e.path("cross.pem"),
	} {
		if !strings.Contains(plan, w) {
			t.Errorf("cross-sign plan lacks %q:\n%s", w, plan)
		}
	}
	keysBefore := e.root.ListObjects(t)
	out := mustRun(t, e, KindCrossSign, script)
	t.Logf("cross-sign ceremony:\n%s", out)
	for _, w := range []string{"] roots checked", "key found in HSM", "cross certificate built and checked", "certificate signed",
		"cross certificate verified under the old root", "wrote cross certificate", "ceremony complete"} {
		if !strings.Contains(out, w) {
			t.Errorf("cross-sign output lacks %q", w)
		}
	}
	if e.root.ListObjects(t) != keysBefore {
		t.Error("cross-sign changed the token's objects")
	}

	cross := mustCert(t, e.path("cross.pem"))
	if err := cross.CheckSignatureFrom(oldRoot); err != nil {
		t.Fatalf("cross certificate under the old root: %v", err)
	}
	if !bytes.Equal(cross.RawSubject, newRoot.RawSubject) || !bytes.Equal(cross.RawIssuer, oldRoot.RawSubject) ||
		!samePublicKey(cross.PublicKey, newRoot.PublicKey) || !bytes.Equal(cross.SubjectKeyId, newRoot.SubjectKeyId) ||
		!bytes.Equal(cross.AuthorityKeyId, oldRoot.SubjectKeyId) {
		t.Fatalf("cross certificate: subject %s issuer %s SKI %x AKI %x", cross.Subject, cross.Issuer, cross.SubjectKeyId, cross.AuthorityKeyId)
	}
	if !cross.IsCA || cross.MaxPathLen != 1 || cross.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign ||
		fmt.Sprint(cross.PermittedURIDomains) != "[example.org]" || !cross.PermittedDNSDomainsCritical ||
		len(cross.URIs) != 1 || cross.URIs[0].String() != "spiffe://example.org" {
		t.Fatalf("cross certificate: CA=%v pathlen=%d ku=%b constraints=%v URIs=%v", cross.IsCA, cross.MaxPathLen, cross.KeyUsage, cross.PermittedURIDomains, cross.URIs)
	}
	if cross.NotBefore.Before(oldRoot.NotBefore) || cross.NotAfter.After(oldRoot.NotAfter) ||
		time.Until(cross.NotAfter) > 366*24*time.Hour || time.Until(cross.NotAfter) < 364*24*time.Hour {
		t.Fatalf("cross certificate validity %s..%s (old root %s..%s)", cross.NotBefore, cross.NotAfter, oldRoot.NotBefore, oldRoot.NotAfter)
	}

	// An SVID signed under the new root, verified with the old root alone.
	leaf := issueSVID(t, e.nodes["node-1"], "issuing", issuing)
	oldOnly := x509.NewCertPool()
	oldOnly.AddCert(oldRoot)
	inter := x509.NewCertPool()
	inter.AddCert(issuing)
	opts := x509.VerifyOptions{Roots: oldOnly, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
	if _, err := leaf.Verify(opts); err == nil {
		t.Fatal("an SVID under the new root verified against the old root without the cross certificate")
	}
	inter.AddCert(cross)
	chains, err := leaf.Verify(opts)
	if err != nil {
		t.Fatalf("SVID -> issuing -> cross -> old root: %v", err)
	}
	if c := chains[0]; len(c) != 4 || c[1] != issuing || c[2] != cross || c[3] != oldRoot {
		t.Fatalf("chain %v", chains)
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	id, _, err := x509svid.Verify([]*x509.Certificate{leaf, issuing, cross}, x509bundle.FromX509Authorities(td, []*x509.Certificate{oldRoot}))
	if err != nil || id.String() != "spiffe://example.org/workload/web" {
		t.Fatalf("go-spiffe with the old root only: %v %v", id, err)
	}
	// Relying parties that already have the new root need no cross.
	if _, _, err := x509svid.Verify([]*x509.Certificate{leaf, issuing}, x509bundle.FromX509Authorities(td, []*x509.Certificate{newRoot})); err != nil {
		t.Fatalf("go-spiffe with the new root: %v", err)
	}
	writeFile(t, e.path("leaf.pem"), pemBytes("CERTIFICATE", leaf.Raw), 0o644)
	writeFile(t, e.path("untrusted.pem"), append(pemBytes("CERTIFICATE", issuing.Raw), pemBytes("CERTIFICATE", cross.Raw)...), 0o644)
	if got := openssl(t, "verify", "-CAfile", e.path("old.pem"), "-untrusted", e.path("untrusted.pem"), e.path("leaf.pem")); !strings.Contains(got, ": OK") {
		t.Fatalf("openssl verify with the old root only: %s", got)
	}

	n, err := VerifyTranscript(e.path("transcript.jsonl"))
	if err != nil || n == 0 || !strings.Contains(readFile(t, e.path("transcript.jsonl")), `"kind":"cross-sign","step":"cross certificate verified under the old root"`) {
		t.Fatalf("transcript: %d records, %v", n, err)
	}
}

// Every refusal of a cross-sign names its reason, and leaves files, tokens
// and transcript as they were: validation refuses before any HSM opens,
// and a key that is not the old root's is refused before anything is
// built or signed.
func TestCrossSignRefusals(t *testing.T) {
	e := newEnv(t, "xrefuse", "node-1")
	root := func(label, cn, td, validity, out, extra string) {
		mustRun(t, e, KindRoot, e.rootOn(e.root, label, cn, td, validity, e.path(out), extra))
	}
	root("root-2026", "Sigil Test Root 2026", "example.org", "10y", "old.pem", "  path-length: 2\n")
	root("root-2031", "Sigil Test Root 2031", "example.org", "20y", "new.pem", "")
	root("root-short", "Sigil Test Root Short", "example.org", "2y", "new-short.pem", "")
	root("root-pl1", "Sigil Test Root PL1", "example.org", "10y", "old-pl1.pem", "")
	root("root-other", "Other Root", "other.org", "10y", "other-td.pem", "")
	root("root-same-name", "Sigil Test Root 2026", "example.org", "10y", "same-name.pem", "")
	mustRun(t, e, KindReissueRoot, e.rootOn(e.root, "root-2026", "Sigil Test Root 2026 reissued", "example.org", "10y", e.path("old-reissued.pem"), "  previous: "+e.path("old.pem")+"\n"))
	mustRun(t, e, KindIssuingCSR, e.csrScript("node-1", "issuing", e.path("n.csr")))
	mustRun(t, e, KindSignIssuing, e.signScript(pinFile(e.root), "root-2031", e.path("new.pem"), e.path("n.csr"), "node-1", e.path("n.pem")))
	writeFile(t, e.path("exists.pem"), []byte("taken"), 0o644)

	good := e.crossScript("root-2026", e.path("old.pem"), e.path("new.pem"), "1y", e.path("cross.pem"))
	with := func(old, new string) string { return strings.Replace(good, old, new, 1) }
	cases := []struct{ name, script, want string }{
		{"key of the new root", with("label: root-2026", "label: root-2031"),
			`key "root-2031" on token "` + e.root.Label + `" is not the key of old root certificate ` + e.path("old.pem")},
		{"key of another root", with("label: root-2026", "label: root-other"), "is not the key of old root certificate"},
		{"missing key", with("label: root-2026", "label: no-such-key"), "key not found"},
		{"new root of another trust domain", with(e.path("new.pem"), e.path("other-td.pem")),
			"cross-sign.new-root-certificate " + e.path("other-td.pem") + " is for [spiffe://other.org], not trust domain example.org"},
		{"script of another trust domain", with("trust-domain: example.org", "trust-domain: other.org"),
			"cross-sign.old-root-certificate " + e.path("old.pem") + " is for [spiffe://example.org], not trust domain other.org"},
		{"new root not self-signed", with(e.path("new.pem"), e.path("n.pem")),
			"cross-sign.new-root-certificate " + e.path("n.pem") + " is not self-signed: it was issued by CN=Sigil Test Root 2031,O=Sigil Test to CN=node-1"},
		{"old root not self-signed", with(e.path("old.pem"), e.path("n.pem")), "cross-sign.old-root-certificate " + e.path("n.pem") + " is not self-signed"},
		{"issuing CA as the new root", with(e.path("new.pem"), e.path("n.pem")), "has path length 0; a Sigil root has 1 or 2"},
		{"new root with the old root's key", with(e.path("new.pem"), e.path("old-reissued.pem")),
			"has the old root's key: that is a re-issued root (reissue-root), not a successor to cross-sign"},
		{"new root with the old root's name", with(e.path("new.pem"), e.path("same-name.pem")), "has the old root's subject (CN=Sigil Test Root 2026,O=Sigil Test)"},
		{"old root of path length 1", strings.Replace(with(e.path("old.pem"), e.path("old-pl1.pem")), "label: root-2026", "label: root-pl1", 1),
			"cross-sign.old-root-certificate " + e.path("old-pl1.pem") + " has path length 1: an SVID's chain through a cross certificate"},
		{"outliving the old root", with("validity: 1y", "validity: 11y"), "cross-sign.validity 11y would outlive the old root (expires "},
		{"outliving the new root", strings.Replace(with(e.path("new.pem"), e.path("new-short.pem")), "validity: 1y", "validity: 3y", 1), "cross-sign.validity 3y would outlive the new root (expires "},
		{"no validity", with("  validity: 1y\n", ""), "cross-sign.validity is required"},
		{"CSR as the new root", with(e.path("new.pem"), e.path("n.csr")), "holds no PEM CERTIFICATE"},
		{"no old root", with("  old-root-certificate: "+e.path("old.pem")+"\n", ""), "cross-sign.old-root-certificate is required"},
		{"existing output", with(e.path("cross.pem"), e.path("exists.pem")), "already exists"},
		{"curve of an existing key", with("  label: root-2026\n", "  label: root-2026\n  curve: P-384\n"), "key.curve is not used by kind cross-sign"},
		{"section of another kind", good + "root:\n  validity: 1y\n", "root is not used by kind cross-sign"},
		{"unknown field", with("  validity: 1y\n", "  validity: 1y\n  path-length: 2\n"), "cross-sign.path-length is an unknown field (line 14); cross-sign has: old-root-certificate, new-root-certificate, validity, output"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, e)
			out, err := e.run(t, KindCrossSign, tc.script)
			if err == nil {
				t.Fatalf("cross-sign was not refused:\n%s", out)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
			if strings.Contains(out, "certificate signed") {
				t.Fatalf("a refused cross-sign signed something:\n%s", out)
			}
			if after := snapshot(t, e); after != before {
				t.Fatalf("a refused cross-sign changed files or tokens:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			if strings.Contains(err.Error()+out, e.root.PIN(t)) {
				t.Fatal("the PIN appears in the output")
			}
		})
	}
	if _, err := os.Stat(e.path("cross.pem")); !os.IsNotExist(err) {
		t.Fatal("a refused cross-sign left its output")
	}
	// And the good script runs.
	mustRun(t, e, KindCrossSign, good)
	if _, err := VerifyTranscript(e.path("transcript.jsonl")); err != nil {
		t.Fatal(err)
	}
}

// root.path-length is 1 by default, 2 when asked, and nothing else.
func TestRootPathLength(t *testing.T) {
	e := newEnv(t, "pathlen")
	plan := e.describe(t, KindRoot, e.rootOn(e.root, "r1", "R1", "example.org", "10y", e.path("r1.pem"), ""))
	if !strings.Contains(plan, "CA:                    yes, path length 1 (root, then issuing CAs, then SVIDs; it cannot cross-sign a successor") {
		t.Errorf("default root plan:\n%s", plan)
	}
	plan = e.describe(t, KindRoot, e.rootOn(e.root, "r2", "R2", "example.org", "10y", e.path("r2.pem"), "  path-length: 2\n"))
	if !strings.Contains(plan, "CA:                    yes, path length 2 (root, then a cross certificate") {
		t.Errorf("path-length 2 root plan:\n%s", plan)
	}
	out := mustRun(t, e, KindRoot, e.rootOn(e.root, "r2", "R2", "example.org", "10y", e.path("r2.pem"), "  path-length: 2\n"))
	if c := mustCert(t, e.path("r2.pem")); c.MaxPathLen != 2 || !strings.Contains(out, "path length:           2") {
		t.Fatalf("path-length 2 root has path length %d:\n%s", c.MaxPathLen, out)
	}
	for _, bad := range []string{"0", "3", "-1"} {
		_, err := e.run(t, KindRoot, e.rootOn(e.root, "rx", "RX", "example.org", "10y", e.path("rx.pem"), "  path-length: "+bad+"\n"))
		if err == nil || !strings.Contains(err.Error(), "root.path-length must be 1 (issuing CAs only) or 2") {
			t.Errorf("path-length %s: %v", bad, err)
		}
	}
	if _, err := os.Stat(filepath.Join(e.dir, "rx.pem")); !os.IsNotExist(err) {
		t.Fatal("a refused root wrote its output")
	}
}
