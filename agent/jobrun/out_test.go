package jobrun

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/appliance/api"
)

// fakeCache holds one run's SVID, a bundle, and signs JWT-SVIDs.
type fakeCache struct {
	snap    *cache.Snapshot
	changed chan struct{}
	jwts    int
}

func (f *fakeCache) Current() (*cache.Snapshot, <-chan struct{}) { return f.snap, f.changed }
func (f *fakeCache) JWTSVID(_ context.Context, e api.Entry, aud []string) (string, time.Time, error) {
	f.jwts++
	return "jwt-for-" + e.SPIFFEID + "-" + strings.Join(aud, ","), time.Now().Add(time.Hour), nil
}

func selfSigned(t *testing.T, uri string, serial int64) (*x509.Certificate, []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(uri)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), URIs: []*url.URL{u}, NotBefore: time.Now().Add(-time.Minute),
		NotAfter: time.Now().Add(time.Hour), IsCA: serial == 1, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	kd, _ := x509.MarshalPKCS8PrivateKey(k)
	return c, kd
}

func newFakeCache(t *testing.T) *fakeCache {
	root, _ := selfSigned(t, "spiffe://example.org", 1)
	leaf, key := selfSigned(t, "spiffe://example.org/ci/run", 2)
	b := spiffebundle.New(spiffeid.RequireTrustDomainFromString("example.org"))
	b.AddX509Authority(root)
	e := api.Entry{ID: "entry-1", SPIFFEID: "spiffe://example.org/ci/run"}
	v := &cache.SVID{EntryID: e.ID, SPIFFEID: e.SPIFFEID, Chain: []*x509.Certificate{leaf}, KeyDER: key, ChainDER: leaf.Raw, NotAfter: leaf.NotAfter}
	return &fakeCache{snap: &cache.Snapshot{Entries: []api.Entry{e}, SVIDs: map[string]*cache.SVID{e.ID: v}, Bundle: b},
		changed: make(chan struct{})}
}

// --out: svid.pem, svid-key.pem, bundle.pem and a JWT-SVID per audience,
// all 0600 in a 0700 directory made for the run, and all gone at the end.
func TestOutFilesWrittenPrivateAndRemoved(t *testing.T) {
	fc := newFakeCache(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dir := filepath.Join(t.TempDir(), "a", "out")
	o, err := newOutFiles(dir, []string{"https://vault.example.org", "sts"}, log)
	if err != nil {
		t.Fatal(err)
	}
	if err := o.update(context.Background(), fc, "entry-1"); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("out dir: %v %v", st.Mode(), err)
	}
	want := []string{SVIDFile, KeyFile, BundleFile, "jwt-https___vault.example.org.token", "jwt-sts.token"}
	ents, _ := os.ReadDir(dir)
	if len(ents) != len(want) {
		t.Fatalf("files %v, want %v", ents, want)
	}
	for _, n := range want {
		st, err := os.Stat(filepath.Join(dir, n))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", n, st, err)
		}
	}
	read := func(n string) []byte { b, _ := os.ReadFile(filepath.Join(dir, n)); return b }
	if blk, _ := pem.Decode(read(SVIDFile)); blk == nil || !bytes.Equal(blk.Bytes, fc.snap.SVIDs["entry-1"].Chain[0].Raw) {
		t.Fatal("svid.pem is not the run's SVID")
	}
	if blk, _ := pem.Decode(read(KeyFile)); blk == nil || blk.Type != "PRIVATE KEY" || !bytes.Equal(blk.Bytes, fc.snap.SVIDs["entry-1"].KeyDER) {
		t.Fatal("svid-key.pem is not the run's key")
	}
	if string(read("jwt-sts.token")) != "jwt-for-spiffe://example.org/ci/run-sts" {
		t.Fatalf("jwt-sts.token: %q", read("jwt-sts.token"))
	}
	// Nothing changed: nothing written again, JWT-SVIDs kept until half
	// their life.
	if err := o.update(context.Background(), fc, "entry-1"); err != nil || fc.jwts != 2 {
		t.Fatalf("second update: %v, %d JWT-SVIDs fetched", err, fc.jwts)
	}
	// Rotation: the new SVID replaces the files.
	leaf, key := selfSigned(t, "spiffe://example.org/ci/run", 3)
	fc.snap.SVIDs["entry-1"] = &cache.SVID{EntryID: "entry-1", Chain: []*x509.Certificate{leaf}, KeyDER: key, ChainDER: leaf.Raw, NotAfter: leaf.NotAfter}
	if err := o.update(context.Background(), fc, "entry-1"); err != nil {
		t.Fatal(err)
	}
	if blk, _ := pem.Decode(read(SVIDFile)); blk == nil || !bytes.Equal(blk.Bytes, leaf.Raw) {
		t.Fatal("svid.pem not rotated")
	}
	o.remove()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("out dir made for the run left behind: %v", err)
	}
	if _, err := os.Stat(filepath.Dir(dir)); err != nil {
		t.Fatalf("the parent went too: %v", err)
	}

	// A directory the user gave is kept, as are files not ours.
	mine := t.TempDir()
	if err := os.WriteFile(filepath.Join(mine, "notes"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	o, err = newOutFiles(mine, nil, log)
	if err != nil {
		t.Fatal(err)
	}
	if err := o.update(context.Background(), fc, "entry-1"); err != nil {
		t.Fatal(err)
	}
	o.remove()
	if ents, _ := os.ReadDir(mine); len(ents) != 1 || ents[0].Name() != "notes" {
		t.Fatalf("left in the user's dir: %v", ents)
	}
	if err := o.update(context.Background(), fc, "other-entry"); err == nil {
		t.Fatal("an entry not in the cache was written")
	}
}

func TestJWTFileNames(t *testing.T) {
	if n := JWTFileName("https://a.example/x?y=1"); n != "jwt-https___a.example_x_y_1.token" {
		t.Fatal(n)
	}
	if n := JWTFileName("../../etc"); strings.Contains(n, "/") {
		t.Fatal(n)
	}
	if _, err := jwtFileNames([]string{"a/b", "a:b"}); err == nil {
		t.Fatal("two audiences sharing a file accepted")
	}
	if _, err := jwtFileNames([]string{"a", "a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := jwtFileNames([]string{""}); err == nil {
		t.Fatal("empty audience accepted")
	}
}
