package ctl_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/ctl"
)

// fedBundleFile writes a SPIFFE bundle document of trust domain name
// (one fresh root, this sequence) and returns its path.
func fedBundleFile(t *testing.T, name string, seq uint64) string {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://" + name)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(seq) + 1), Subject: pkix.Name{CommonName: name}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(der)
	b := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(name), []*x509.Certificate{root})
	b.SetSequenceNumber(seq)
	doc, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "bundle.json")
	if err := os.WriteFile(p, doc, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Federation through sigilctl as typed: a relationship with an
// out-of-band bundle, shown and listed, its bundle set forward (and a
// rollback refused), an entry federating with it, and its deletion.
func TestSigilctlFederation(t *testing.T) {
	tr := clustertest.NewTrust(t, "fedctl", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	agent := joinAgent(t, c, tr)
	sock := c.ConfigOf("node-1").API.LocalSocket
	sigilctl := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := ctl.Run(context.Background(), append([]string{"--socket", sock}, args...), &out, &errOut)
		return code, out.String(), errOut.String()
	}
	must := func(args ...string) string {
		t.Helper()
		code, out, errOut := sigilctl(args...)
		if code != 0 {
			t.Fatalf("sigilctl %v: exit %d: %s", args, code, errOut)
		}
		return out
	}
	b3, b2, b4 := fedBundleFile(t, "other.example", 3), fedBundleFile(t, "other.example", 2), fedBundleFile(t, "other.example", 4)
	out := must("federation", "add", "other.example", "--bundle-endpoint", "https://bundle.other.example/", "--profile", "https_spiffe",
		"--endpoint-spiffe-id", "spiffe://other.example/spire/server", "--bundle-file", b3)
	if !strings.Contains(out, "sequence 3") || !strings.Contains(out, "https_spiffe") {
		t.Fatalf("federation add printed:\n%s", out)
	}
	if code, _, errOut := sigilctl("federation", "add", "example.org"); code == 0 || !strings.Contains(errOut, "this appliance's own") {
		t.Fatalf("federation with ourselves: exit %d: %s", code, errOut)
	}
	if code, _, errOut := sigilctl("federation", "add", "web.example", "--bundle-endpoint", "https://web.example/b"); code == 0 || !strings.Contains(errOut, "--profile") {
		t.Fatalf("an endpoint without a profile: exit %d: %s", code, errOut)
	}
	must("federation", "add", "web.example", "--bundle-endpoint", "https://web.example/b", "--profile", "https_web")
	if out := must("federation", "list"); !strings.Contains(out, "other.example") || !strings.Contains(out, "web.example") {
		t.Fatalf("federation list:\n%s", out)
	}
	if code, _, errOut := sigilctl("federation", "bundle-set", "other.example", "--bundle-file", b2); code == 0 || !strings.Contains(errOut, "rollback") {
		t.Fatalf("a rolled-back bundle: exit %d: %s", code, errOut)
	}
	if out := must("federation", "bundle-set", "other.example", "--bundle-file", b4); !strings.Contains(out, "sequence 4") {
		t.Fatalf("bundle-set printed:\n%s", out)
	}
	if code, _, errOut := sigilctl("entry", "create", "--spiffe-id", "spiffe://example.org/fed", "--parent-id", agent, "--selector", "unix:uid:1000",
		"--federates-with", "nobody.example"); code == 0 || !strings.Contains(errOut, "not a federation relationship") {
		t.Fatalf("an entry federating with an unknown trust domain: exit %d: %s", code, errOut)
	}
	out = must("entry", "create", "--spiffe-id", "spiffe://example.org/fed", "--parent-id", agent, "--selector", "unix:uid:1000",
		"--federates-with", "other.example", "--federates-with", "web.example")
	if !strings.Contains(out, "other.example,web.example") {
		t.Fatalf("entry create printed:\n%s", out)
	}
	id := regexp.MustCompile(`(?m)^id\s+(\S+)`).FindStringSubmatch(out)
	if id == nil {
		t.Fatalf("no entry id in:\n%s", out)
	}
	if out := must("entry", "update", id[1], "--federates-with", "other.example"); !strings.Contains(out, "other.example,web.example -> other.example") {
		t.Fatalf("entry update --federates-with printed:\n%s", out)
	}
	must("federation", "delete", "web.example")
	// Deleted relationships stay named by entries until an update drops
	// them; --federates-with '' clears the list.
	if out := must("entry", "update", id[1], "--federates-with", ""); !strings.Contains(out, "other.example -> (empty)") {
		t.Fatalf("entry update --federates-with '' printed:\n%s", out)
	}
	if out := must("federation", "show", "other.example"); !strings.Contains(out, "sequence 4") {
		t.Fatalf("federation show:\n%s", out)
	}
}
