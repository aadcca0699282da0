package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/sigil-appliance/sigil/keystore"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func openTPM(t *testing.T, tp *testenv.TPM) *TPM {
	t.Helper()
	k, err := Open(context.Background(), Config{Path: tp.Socket})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Error(err)
		}
	})
	return k
}

func writeFile(t *testing.T, path string, b []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, b, mode); err != nil {
		t.Fatal(err)
	}
}

func createKey(t *testing.T, k *TPM, uri string, alg keystore.Algorithm) *ecdsa.PublicKey {
	t.Helper()
	pub, err := k.CreateKey(context.Background(), keystore.CreateKeyRequest{URI: uri, Algorithm: alg})
	if err != nil {
		t.Fatalf("CreateKey(%s): %v", uri, err)
	}
	return pub.(*ecdsa.PublicKey)
}

func mustSigner(t *testing.T, k *TPM, uri string) crypto.Signer {
	t.Helper()
	s, err := k.Signer(context.Background(), uri)
	if err != nil {
		t.Fatalf("Signer(%s): %v", uri, err)
	}
	return s
}

func digest(h crypto.Hash, msg string) []byte {
	w := h.New()
	w.Write([]byte(msg))
	return w.Sum(nil)
}

// signVerify signs with the TPM and checks the signature with crypto/ecdsa.
func signVerify(t *testing.T, s crypto.Signer, h crypto.Hash, msg string) error {
	t.Helper()
	d := digest(h, msg)
	sig, err := s.Sign(rand.Reader, d, h)
	if err != nil {
		return err
	}
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d, sig) {
		return fmt.Errorf("%v signature over %q does not verify", h, msg)
	}
	return nil
}

// handles lists what tpm2_getcap reports for a handle class
// ("handles-transient", "handles-loaded-session"): the TPM's own view.
func handles(t *testing.T, tp *testenv.TPM, class string) []string {
	t.Helper()
	out, err := tp.Tool(context.Background(), "tpm2_getcap", class)
	if err != nil {
		t.Fatal(err)
	}
	var hs []string
	for _, line := range strings.Split(string(out), "\n") {
		if h, ok := strings.CutPrefix(strings.TrimSpace(line), "- "); ok {
			hs = append(hs, h)
		}
	}
	return hs
}

func TestCreateSignVerify(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	ctx := context.Background()
	k := openTPM(t, tp)
	file := filepath.Join(t.TempDir(), "agent.key")
	uri := "tpmkey:file=" + file
	pub := createKey(t, k, uri, keystore.ECDSAP256)
	if pub.Curve != elliptic.P256() {
		t.Fatalf("curve %v, want P-256", pub.Curve.Params().Name)
	}

	s := mustSigner(t, k, uri)
	if !s.Public().(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("Signer's public key differs from CreateKey's")
	}
	if got, err := k.PublicKey(ctx, uri); err != nil || !got.(*ecdsa.PublicKey).Equal(pub) {
		t.Fatalf("PublicKey: %v, %v", got, err)
	}
	for _, h := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
		if err := signVerify(t, s, h, "hello"); err != nil {
			t.Fatalf("%v: %v", h, err)
		}
	}

	d := sha256.Sum256([]byte("x"))
	if _, err := s.Sign(rand.Reader, d[:20], crypto.SHA256); err == nil || !strings.Contains(err.Error(), "digest is 20 bytes") {
		t.Fatalf("short digest: %v", err)
	}
	if _, err := s.Sign(rand.Reader, d[:], crypto.SHA384); err == nil || !strings.Contains(err.Error(), "SHA-384 digests are 48") {
		t.Fatalf("digest of the wrong hash: %v", err)
	}
	if _, err := s.Sign(rand.Reader, d[:16], crypto.MD5); err == nil || !strings.Contains(err.Error(), "want SHA-256") {
		t.Fatalf("MD5: %v", err)
	}
	if _, err := s.Sign(rand.Reader, d[:], crypto.Hash(0)); err == nil {
		t.Fatal("signed without a hash function")
	}
}

func TestCreateKeyFile(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	ctx := context.Background()
	k := openTPM(t, tp)
	dir := t.TempDir()
	file := filepath.Join(dir, "agent.key")
	uri := "tpmkey:file=" + file
	createKey(t, k, uri, keystore.ECDSAP256)

	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("blob mode %v, want 0600", st.Mode().Perm())
	}
	before, _ := os.ReadFile(file)
	if blk, _ := pem.Decode(before); blk == nil || blk.Type != "TSS2 PRIVATE KEY" {
		t.Fatalf("blob is not a TSS2 PRIVATE KEY PEM:\n%s", before)
	}

	// A second CreateKey must not replace the key (the agent's identity).
	_, err = k.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256})
	if !errors.Is(err, keystore.ErrAlreadyExists) || !strings.Contains(err.Error(), file) {
		t.Fatalf("second CreateKey: %v, want ErrAlreadyExists naming %s", err, file)
	}
	if after, _ := os.ReadFile(file); !bytes.Equal(before, after) {
		t.Fatal("second CreateKey changed the blob")
	}
	// Nor any other file in its place.
	other := filepath.Join(dir, "notes.txt")
	writeFile(t, other, []byte("keep me"), 0o644)
	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: "tpmkey:file=" + other, Algorithm: keystore.ECDSAP256}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Fatalf("CreateKey over an unrelated file: %v", err)
	}
	if b, _ := os.ReadFile(other); string(b) != "keep me" {
		t.Fatal("CreateKey overwrote an unrelated file")
	}

	for _, alg := range []keystore.Algorithm{keystore.RSA3072, "", "ed25519"} {
		f := filepath.Join(dir, "unsupported.key")
		_, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: "tpmkey:file=" + f, Algorithm: alg})
		if !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
			t.Fatalf("CreateKey(%q): %v, want ErrUnsupportedAlgorithm", alg, err)
		}
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("CreateKey(%q) failed but left a file", alg)
		}
	}
	// A cancelled context stops CreateKey before the TPM does any work.
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	f := filepath.Join(dir, "cancelled.key")
	if _, err := k.CreateKey(cancelled, keystore.CreateKeyRequest{URI: "tpmkey:file=" + f, Algorithm: keystore.ECDSAP256}); !errors.Is(err, context.Canceled) {
		t.Fatalf("CreateKey with a cancelled context: %v", err)
	}
	if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("cancelled CreateKey left a file")
	}
	// A directory that does not exist: an error naming the path.
	_, err = k.CreateKey(ctx, keystore.CreateKeyRequest{URI: "tpmkey:file=" + filepath.Join(dir, "no", "such", "dir.key"), Algorithm: keystore.ECDSAP256})
	if err == nil || !strings.Contains(err.Error(), "no/such/dir.key") {
		t.Fatalf("CreateKey into a missing directory: %v", err)
	}
}

func TestP384(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	uri := "tpmkey:file=" + filepath.Join(t.TempDir(), "p384.key")
	pub := createKey(t, k, uri, keystore.ECDSAP384)
	if pub.Curve != elliptic.P384() {
		t.Fatalf("curve %v, want P-384", pub.Curve.Params().Name)
	}
	s := mustSigner(t, k, uri)
	for _, h := range []crypto.Hash{crypto.SHA384, crypto.SHA256} {
		if err := signVerify(t, s, h, "p384"); err != nil {
			t.Fatal(err)
		}
	}
}

// A host reboot: the TPM restarts, Sigil reopens it, recreates the same
// SRK from the owner seed, and the blob on disk signs with the same key.
func TestRestart(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	uri := "tpmkey:file=" + filepath.Join(t.TempDir(), "agent.key")
	pub := createKey(t, k, uri, keystore.ECDSAP256)
	if err := signVerify(t, mustSigner(t, k, uri), crypto.SHA256, "before"); err != nil {
		t.Fatal(err)
	}
	srkName := k.srk.Name.Buffer
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}

	tp.Stop(t)
	tp.Start(t)
	k2 := openTPM(t, tp)
	if !bytes.Equal(k2.srk.Name.Buffer, srkName) {
		t.Fatal("the SRK changed across a restart")
	}
	s := mustSigner(t, k2, uri)
	if !s.Public().(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("the key changed across a restart")
	}
	for i := range 3 {
		if err := signVerify(t, s, crypto.SHA256, fmt.Sprint("after ", i)); err != nil {
			t.Fatal(err)
		}
	}
	// HARDWARE-NOTES gotcha 9 says swtpm answers the first TPM2_Sign
	// after a start with TPM_RC_RETRY, which the transport resends.
	// Logged, not asserted: swtpm 0.7.1 here has not done it once, on
	// this transport or on a raw connection.
	t.Logf("TPM answers retried since the restart: %d", k2.tpm.retries.Load())
}

// A copied blob is useless on another TPM: its SRK comes from another seed.
func TestBlobFromAnotherTPM(t *testing.T) {
	t.Parallel()
	a, b := testenv.NewTPM(t), testenv.NewTPM(t)
	ctx := context.Background()
	ka, kb := openTPM(t, a), openTPM(t, b)
	file := filepath.Join(t.TempDir(), "agent.key")
	createKey(t, ka, "tpmkey:file="+file, keystore.ECDSAP256)
	stolen := filepath.Join(t.TempDir(), "copied.key")
	data, _ := os.ReadFile(file)
	if err := os.WriteFile(stolen, data, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := kb.Signer(ctx, "tpmkey:file="+stolen)
	if !errors.Is(err, keystore.ErrWrongDevice) || !strings.Contains(err.Error(), stolen) {
		t.Fatalf("Signer with a blob from another TPM: %v, want ErrWrongDevice naming the file", err)
	}
	t.Log(err)
	if _, err := kb.PublicKey(ctx, "tpmkey:file="+stolen); !errors.Is(err, keystore.ErrWrongDevice) {
		t.Fatalf("PublicKey with a blob from another TPM: %v, want ErrWrongDevice", err)
	}
	if bytes.Equal(ka.srk.Name.Buffer, kb.srk.Name.Buffer) {
		t.Fatal("two swtpm instances share a storage root key")
	}
	// The owner still can.
	if err := signVerify(t, mustSigner(t, ka, "tpmkey:file="+stolen), crypto.SHA256, "home"); err != nil {
		t.Fatal(err)
	}
}

func TestPCRBoundKey(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	ctx := context.Background()
	k := openTPM(t, tp)
	dir := t.TempDir()
	both := filepath.Join(dir, "bound-16-23.key")
	only16 := filepath.Join(dir, "bound-16.key")
	createKey(t, k, "tpmkey:file="+both+";pcrs=23,16", keystore.ECDSAP256)
	createKey(t, k, "tpmkey:file="+only16+";pcrs=16", keystore.ECDSAP256)

	// The blob records the binding, so later URIs need not repeat it.
	kb, err := readBlob(both)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(kb.pcrs, []uint{16, 23}) {
		t.Fatalf("blob records PCRs %v, want [16 23]", kb.pcrs)
	}
	pt, _ := kb.pub.Contents()
	if pt.ObjectAttributes.UserWithAuth {
		t.Fatal("PCR-bound key has userWithAuth: the empty password would bypass its policy")
	}

	sBoth, s16 := mustSigner(t, k, "tpmkey:file="+both), mustSigner(t, k, "tpmkey:file="+only16)
	for _, s := range []crypto.Signer{sBoth, s16} {
		if err := signVerify(t, s, crypto.SHA256, "PCRs as they were"); err != nil {
			t.Fatal(err)
		}
	}

	if _, err := tp.Tool(ctx, "tpm2_pcrextend", "23:sha256="+strings.Repeat("ab", 32)); err != nil {
		t.Fatal(err)
	}
	err = signVerify(t, sBoth, crypto.SHA256, "PCR 23 changed")
	if !errors.Is(err, keystore.ErrPolicy) || !strings.Contains(err.Error(), both) {
		t.Fatalf("sign after PCR 23 changed: %v, want ErrPolicy naming the file", err)
	}
	t.Log(err)
	// The policy covers exactly the PCRs it names.
	if err := signVerify(t, s16, crypto.SHA256, "PCR 16 unchanged"); err != nil {
		t.Fatalf("key bound to PCR 16 only, after PCR 23 changed: %v", err)
	}

	// The policy is about values: PCR 16 is resettable, and back at its
	// old value the key signs again.
	if _, err := tp.Tool(ctx, "tpm2_pcrextend", "16:sha256="+strings.Repeat("cd", 32)); err != nil {
		t.Fatal(err)
	}
	if err := signVerify(t, s16, crypto.SHA256, "PCR 16 changed"); !errors.Is(err, keystore.ErrPolicy) {
		t.Fatalf("sign after PCR 16 changed: %v, want ErrPolicy", err)
	}
	if _, err := tp.Tool(ctx, "tpm2_pcrreset", "16"); err != nil {
		t.Fatal(err)
	}
	if err := signVerify(t, s16, crypto.SHA256, "PCR 16 reset"); err != nil {
		t.Fatalf("sign after PCR 16 was reset to its old value: %v", err)
	}

	// Reopened, the blob is still bound.
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	k2 := openTPM(t, tp)
	if err := signVerify(t, mustSigner(t, k2, "tpmkey:file="+both), crypto.SHA256, "reopened"); !errors.Is(err, keystore.ErrPolicy) {
		t.Fatalf("reopened PCR-bound key: %v, want ErrPolicy", err)
	}
	// Every policy session was flushed, failed signatures included.
	if s := handles(t, tp, "handles-loaded-session"); len(s) != 0 {
		t.Fatalf("policy sessions left loaded: %v", s)
	}
}

func TestUnavailable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()

	// A socket file nobody listens on: what a crashed swtpm leaves.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	regular := filepath.Join(dir, "file")
	writeFile(t, regular, nil, 0o600)

	for _, path := range []string{filepath.Join(dir, "no.sock"), stale, regular, "/dev/tpmrm-sigil-test-absent"} {
		_, err := Open(ctx, Config{Path: path})
		if !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), path) {
			t.Errorf("Open(%s): %v, want ErrUnavailable naming the path", path, err)
		}
	}
	if _, err := Open(ctx, Config{}); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Open without a path: %v", err)
	}

	// A stopped swtpm.
	tp := testenv.NewTPM(t)
	tp.Stop(t)
	if _, err := Open(ctx, Config{Path: tp.Socket}); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Open on a stopped swtpm: %v", err)
	}
	tp.Start(t)

	// A closed TPM.
	k := openTPM(t, tp)
	uri := "tpmkey:file=" + filepath.Join(dir, "agent.key")
	createKey(t, k, uri, keystore.ECDSAP256)
	s := mustSigner(t, k, uri)
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := signVerify(t, s, crypto.SHA256, "closed"); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Sign after Close: %v", err)
	}
	if _, err := k.Signer(ctx, uri); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Signer after Close: %v", err)
	}
	uri2 := "tpmkey:file=" + filepath.Join(dir, "agent2.key")
	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri2, Algorithm: keystore.ECDSAP256}); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("CreateKey after Close: %v", err)
	}
	// Close flushed the key and the SRK.
	if h := handles(t, tp, "handles-transient"); len(h) != 0 {
		t.Errorf("transient objects left after Close: %v", h)
	}
}

func TestParseKeyURI(t *testing.T) {
	t.Parallel()
	good := map[string]KeyURI{
		"tpmkey:file=/var/lib/sigil/agent.key":              {File: "/var/lib/sigil/agent.key"},
		"tpmkey:file=/a.key;pcrs=7,0,16":                    {File: "/a.key", PCRs: []uint{0, 7, 16}},
		"tpmkey:pcrs=23;file=/a.key":                        {File: "/a.key", PCRs: []uint{23}},
		"tpmkey:file=/dir with space/k":                     {File: "/dir with space/k"},
		"tpmkey:file=/a.key;pcrs=0,1,2,3,4,5,6,7,8,9,10,11": {File: "/a.key", PCRs: []uint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}},
	}
	for raw, want := range good {
		u, err := ParseKeyURI(raw)
		if err != nil || u.File != want.File || !slices.Equal(u.PCRs, want.PCRs) {
			t.Errorf("ParseKeyURI(%q) = %+v, %v; want %+v", raw, u, err, want)
			continue
		}
		if again, err := ParseKeyURI(u.String()); err != nil || again.String() != u.String() {
			t.Errorf("%q: canonical form %q does not round-trip: %v", raw, u.String(), err)
		}
	}
}

func TestInvalidURI(t *testing.T) {
	t.Parallel()
	bad := map[string]string{
		"":                             "scheme",
		"pkcs11:token=x;object=y":      "scheme",
		"TPMKEY:file=/a":               "scheme",
		"tpmkey:":                      "not name=value",
		"tpmkey:file":                  "not name=value",
		"tpmkey:file=":                 "not an absolute path",
		"tpmkey:file=relative/a.key":   "not an absolute path",
		"tpmkey:file=/a/../b.key":      "not a clean path",
		"tpmkey:file=/a/":              "not a clean path",
		"tpmkey:file=/a;file=/b":       "given twice",
		"tpmkey:pcrs=7":                "no file",
		"tpmkey:file=/a;pcrs=":         "pcrs is empty",
		"tpmkey:file=/a;pcrs=24":       `pcr "24"`,
		"tpmkey:file=/a;pcrs=-1":       `pcr "-1"`,
		"tpmkey:file=/a;pcrs=0,,7":     `pcr ""`,
		"tpmkey:file=/a;pcrs=7,7":      "listed twice",
		"tpmkey:file=/a;pcrs=0x7":      `pcr "0x7"`,
		"tpmkey:file=/a;colour=red":    `unknown attribute "colour"`,
		"tpmkey:file=/a;pcrs=7;pcrs=8": "given twice",
		"tpmkey:file=/a;":              "not name=value",
	}
	for raw, detail := range bad {
		_, err := ParseKeyURI(raw)
		if !errors.Is(err, keystore.ErrInvalidURI) || !strings.Contains(err.Error(), detail) {
			t.Errorf("ParseKeyURI(%q) = %v; want ErrInvalidURI with %q", raw, err, detail)
		}
	}

	// And through the Manager, before anything touches the TPM or disk.
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	ctx := context.Background()
	for raw := range bad {
		if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: raw, Algorithm: keystore.ECDSAP256}); !errors.Is(err, keystore.ErrInvalidURI) {
			t.Errorf("CreateKey(%q): %v", raw, err)
		}
		if _, err := k.Signer(ctx, raw); !errors.Is(err, keystore.ErrInvalidURI) {
			t.Errorf("Signer(%q): %v", raw, err)
		}
		if _, err := k.PublicKey(ctx, raw); !errors.Is(err, keystore.ErrInvalidURI) {
			t.Errorf("PublicKey(%q): %v", raw, err)
		}
	}
}

func TestNotFound(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	ctx := context.Background()
	for _, f := range []string{filepath.Join(t.TempDir(), "absent.key"), "/nonexistent-sigil-dir/agent.key"} {
		uri := "tpmkey:file=" + f
		if _, err := k.Signer(ctx, uri); !errors.Is(err, keystore.ErrNotFound) || !strings.Contains(err.Error(), f) {
			t.Errorf("Signer(%s): %v, want ErrNotFound naming the file", uri, err)
		}
		if _, err := k.PublicKey(ctx, uri); !errors.Is(err, keystore.ErrNotFound) {
			t.Errorf("PublicKey(%s): %v, want ErrNotFound", uri, err)
		}
	}
}

// Key files this package must refuse, each with a message naming what is
// wrong, and none of them sent to the TPM.
func TestMalformedBlobs(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	ctx := context.Background()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.key")
	createKey(t, k, "tpmkey:file="+good, keystore.ECDSAP256)
	bound := filepath.Join(dir, "bound.key")
	createKey(t, k, "tpmkey:file="+bound+";pcrs=16", keystore.ECDSAP256)

	parse := func(path string) tssKey {
		b, _ := os.ReadFile(path)
		blk, _ := pem.Decode(b)
		var key tssKey
		if _, err := asn1.Unmarshal(blk.Bytes, &key); err != nil {
			t.Fatal(err)
		}
		return key
	}
	enc := func(key tssKey) []byte {
		der, err := asn1.Marshal(key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: der})
	}
	goodPEM, _ := os.ReadFile(good)
	mutate := func(f func(*tssKey)) []byte {
		key := parse(good)
		f(&key)
		return enc(key)
	}
	mutateBound := func(f func(*tssKey)) []byte {
		key := parse(bound)
		f(&key)
		return enc(key)
	}
	cases := map[string]struct {
		data []byte
		want string
	}{
		"empty":           {nil, "no PEM block"},
		"not PEM":         {[]byte("hello"), "no PEM block"},
		"EC PRIVATE KEY":  {pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte{1}}), `PEM type "EC PRIVATE KEY"`},
		"garbage DER":     {pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: []byte{0x30, 3, 1, 2, 3}}), "malformed TPMKey"},
		"trailing data":   {append(slices.Clone(goodPEM), "more"...), "data after the key"},
		"two keys":        {append(slices.Clone(goodPEM), goodPEM...), "data after the key"},
		"importable type": {mutate(func(k *tssKey) { k.Type = asn1.ObjectIdentifier{2, 23, 133, 10, 1, 4} }), "key type 2.23.133.10.1.4"},
		"sealed type":     {mutate(func(k *tssKey) { k.Type = asn1.ObjectIdentifier{2, 23, 133, 10, 1, 5} }), "want 2.23.133.10.1.3"},
		"other parent":    {mutate(func(k *tssKey) { k.Parent = 0x81000001 }), "parent 0x81000001"},
		"needs password":  {mutate(func(k *tssKey) { k.EmptyAuth = false }), "emptyAuth is false"},
		"emptyAuth not a BOOLEAN": {func() []byte {
			der := pemBytes(t, goodPEM)
			i := bytes.Index(der, []byte{0xa0, 3, asn1.TagBoolean, 1, 0xff})
			der[i+2] = asn1.TagInteger
			return pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: der})
		}(), "emptyAuth: not a BOOLEAN"},
		"secret field": {mutate(func(k *tssKey) {
			// encoding/asn1 writes a RawValue as is, so spell out [2] EXPLICIT.
			k.Secret = asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, IsCompound: true, Bytes: []byte{asn1.TagOctetString, 1, 1}}
		}), "importable key"},
		"RSA parent":      {mutate(func(k *tssKey) { k.RSAParent = true }), "RSA SRK"},
		"bad pubkey":      {mutate(func(k *tssKey) { k.Pubkey = k.Pubkey[:10] }), "pubkey is not a TPM2B_PUBLIC"},
		"pubkey trailer":  {mutate(func(k *tssKey) { k.Pubkey = append(k.Pubkey, 0) }), "pubkey is not a TPM2B_PUBLIC"},
		"bad privkey":     {mutate(func(k *tssKey) { k.Privkey = []byte{0} }), "privkey is not a TPM2B_PRIVATE"},
		"PolicyAuthValue": {mutate(func(k *tssKey) { k.Policy = []tssPolicy{{CommandCode: 0x16B}} }), "policy command 0x16b"},
		"policy missing":  {mutateBound(func(k *tssKey) { k.Policy = nil }), "does not match its recorded policy"},
		"policy added":    {mutate(func(k *tssKey) { k.Policy = parse(bound).Policy }), "does not match its recorded policy"},
		"PCR digest lies": {mutateBound(func(k *tssKey) { k.Policy[0].CommandPolicy[5] ^= 1 }), "does not match its recorded policy"},
		"two policies":    {mutateBound(func(k *tssKey) { k.Policy = append(k.Policy, k.Policy[0]) }), "2 policy commands"},
		"sha1 bank": {mutateBound(func(k *tssKey) {
			cp := k.Policy[0].CommandPolicy
			// ... || count(4) hash(2) sizeofSelect(1) pcrSelect(3)
			cp[len(cp)-5] = byte(tpm2.TPMAlgSHA1)
		}), "not exactly the sha256 bank"},
	}
	for name, c := range cases {
		f := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".key")
		writeFile(t, f, c.data, 0o600)
		_, err := k.Signer(ctx, "tpmkey:file="+f)
		if !errors.Is(err, errBlob) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), f) {
			t.Errorf("%s: %v; want %q and the file name", name, err, c.want)
		}
	}

	huge := filepath.Join(dir, "huge.key")
	writeFile(t, huge, bytes.Repeat([]byte{'A'}, maxBlobSize+1), 0o600)
	if _, err := k.Signer(ctx, "tpmkey:file="+huge); !errors.Is(err, errBlob) || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("huge file: %v", err)
	}
	// The good blobs still work, so the cases above failed for their own reason.
	if err := signVerify(t, mustSigner(t, k, "tpmkey:file="+good), crypto.SHA256, "good"); err != nil {
		t.Fatal(err)
	}
	if err := signVerify(t, mustSigner(t, k, "tpmkey:file="+bound), crypto.SHA256, "bound"); err != nil {
		t.Fatal(err)
	}
}

// Keys made by tpm2-tools under our SRK and encoded by tpm2_encodeobject
// load and sign here, and our encoder writes byte-identical DER for them:
// the format is the one other TPM software reads, not a look-alike.
func TestTSS2InteropWithTPM2Tools(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	ctx := context.Background()
	dir := t.TempDir()
	srk := fmt.Sprintf("0x%x", uint32(k.srk.Handle))
	pubF, privF, pemF := filepath.Join(dir, "k.pub"), filepath.Join(dir, "k.priv"), filepath.Join(dir, "k.pem")
	if _, err := tp.Tool(ctx, "tpm2_create", "-C", srk, "-G", "ecc256:null",
		"-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign", "-u", pubF, "-r", privF); err != nil {
		t.Fatal(err)
	}
	encode := func(args ...string) ([]byte, *keyBlob, error) {
		if err := os.Remove(pemF); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, nil, err
		}
		args = append([]string{"-C", srk, "-u", pubF, "-r", privF, "-o", pemF}, args...)
		if _, err := tp.Tool(ctx, "tpm2_encodeobject", args...); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(pemF)
		kb, err := decodeBlob(b)
		return b, kb, err
	}
	theirs, kb, err := encode()
	if err != nil && strings.Contains(err.Error(), "emptyAuth is false") {
		// tpm2-tools before 5.8 writes emptyAuth inverted: FALSE unless
		// -p ("the key needs a password") is given (tpm2-tools #3458).
		t.Log("tpm2_encodeobject wrote emptyAuth=FALSE for a key without a password; retrying with -p")
		theirs, kb, err = encode("-p")
	}
	if err != nil {
		t.Fatalf("tpm2_encodeobject output:\n%s\n%v", theirs, err)
	}
	ours, err := encodeBlob(kb.pub, kb.priv, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Byte for byte the same DER, except that tpm2-tools writes BOOLEAN
	// TRUE as 0x01 (BER) where DER, and we, write 0xff.
	oursDER, theirsDER := pemBytes(t, ours), pemBytes(t, theirs)
	if i := bytes.Index(theirsDER, []byte{0xa0, 3, asn1.TagBoolean, 1, 1}); i > 0 {
		theirsDER[i+4] = 0xff
	}
	if !bytes.Equal(oursDER, theirsDER) {
		t.Errorf("our encoding differs from tpm2_encodeobject's:\nours:   %x\ntheirs: %x", oursDER, theirsDER)
	}
	if err := signVerify(t, mustSigner(t, k, "tpmkey:file="+pemF), crypto.SHA256, "interop"); err != nil {
		t.Fatal(err)
	}
}

func pemBytes(t *testing.T, b []byte) []byte {
	t.Helper()
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("not PEM:\n%s", b)
	}
	return blk.Bytes
}

// swtpm has three transient slots, shared with every other client: more
// keys than slots are evicted and reloaded, and nothing leaks.
func TestEviction(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	dir := t.TempDir()
	var signers []crypto.Signer
	for i := range 5 {
		uri := fmt.Sprintf("tpmkey:file=%s/k%d.key", dir, i)
		createKey(t, k, uri, keystore.ECDSAP256)
		signers = append(signers, mustSigner(t, k, uri))
	}
	for round := range 2 {
		for i, s := range signers {
			if err := signVerify(t, s, crypto.SHA256, fmt.Sprint(round, i)); err != nil {
				t.Fatalf("round %d key %d: %v", round, i, err)
			}
		}
	}
	if h := handles(t, tp, "handles-transient"); len(h) != 3 {
		t.Fatalf("transient objects %v, want the SRK and 2 keys", h)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if h := handles(t, tp, "handles-transient"); len(h) != 0 {
		t.Fatalf("transient objects left after Close: %v", h)
	}
}

// A client that died without flushing (here tpm2-tools, which leaves its
// objects loaded on a TPM without a resource manager) fills swtpm's slots;
// Open clears them instead of failing with TPM_RC_OBJECT_MEMORY.
func TestOpenFlushesLeftovers(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	ctx := context.Background()
	for i := range 3 {
		ctxFile := filepath.Join(t.TempDir(), fmt.Sprint(i, ".ctx"))
		if _, err := tp.Tool(ctx, "tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc256", "-c", ctxFile); err != nil {
			t.Fatal(err)
		}
	}
	if h := handles(t, tp, "handles-transient"); len(h) != 3 {
		t.Fatalf("setup: transient objects %v, want 3 leftovers", h)
	}
	k := openTPM(t, tp)
	uri := "tpmkey:file=" + filepath.Join(t.TempDir(), "agent.key")
	createKey(t, k, uri, keystore.ECDSAP256)
	if err := signVerify(t, mustSigner(t, k, uri), crypto.SHA256, "after leftovers"); err != nil {
		t.Fatal(err)
	}
}

// Eight goroutines share one TPM, over three keys (one PCR-bound) when
// only two fit: commands, policy sessions and evictions never interleave.
func TestConcurrentSign(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	dir := t.TempDir()
	uris := []string{
		"tpmkey:file=" + dir + "/a.key",
		"tpmkey:file=" + dir + "/b.key",
		"tpmkey:file=" + dir + "/c.key;pcrs=16",
	}
	var signers []crypto.Signer
	for _, u := range uris {
		createKey(t, k, u, keystore.ECDSAP256)
		signers = append(signers, mustSigner(t, k, strings.Split(u, ";")[0]))
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 10 {
				s := signers[(g+i)%len(signers)]
				h := []crypto.Hash{crypto.SHA256, crypto.SHA384}[i%2]
				d := digest(h, fmt.Sprint(g, i))
				sig, err := s.Sign(rand.Reader, d, h)
				if err != nil {
					errs <- fmt.Errorf("goroutine %d sign %d: %w", g, i, err)
					return
				}
				if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d, sig) {
					errs <- fmt.Errorf("goroutine %d sign %d: signature does not verify", g, i)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if h := handles(t, tp, "handles-transient"); len(h) > 3 {
		t.Errorf("transient objects %v, want at most the SRK and 2 keys", h)
	}
	if s := handles(t, tp, "handles-loaded-session"); len(s) != 0 {
		t.Errorf("policy sessions left loaded: %v", s)
	}
}

// A Signer keeps signing with the key it was made for, even after its file
// is replaced by another key (rotation) or removed.
func TestSignerSurvivesFileReplacement(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	k := openTPM(t, tp)
	dir := t.TempDir()
	uri := "tpmkey:file=" + filepath.Join(dir, "agent.key")
	createKey(t, k, uri, keystore.ECDSAP256)
	old := mustSigner(t, k, uri)

	if err := os.Rename(filepath.Join(dir, "agent.key"), filepath.Join(dir, "agent.key.old")); err != nil {
		t.Fatal(err)
	}
	createKey(t, k, uri, keystore.ECDSAP256)
	fresh := mustSigner(t, k, uri)
	if old.Public().(*ecdsa.PublicKey).Equal(fresh.Public()) {
		t.Fatal("two CreateKey calls made the same key")
	}
	for _, s := range []crypto.Signer{old, fresh, old} {
		if err := signVerify(t, s, crypto.SHA256, "rotation"); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Remove(filepath.Join(dir, "agent.key")); err != nil {
		t.Fatal(err)
	}
	// Push both out of the TPM so the next signatures reload from memory.
	for i := range 2 {
		u := fmt.Sprintf("tpmkey:file=%s/filler%d.key", dir, i)
		createKey(t, k, u, keystore.ECDSAP256)
		mustSigner(t, k, u)
	}
	if err := signVerify(t, fresh, crypto.SHA256, "file removed"); err != nil {
		t.Fatal(err)
	}
}

// The transport resends exactly the answers that mean "not executed, try
// again" (TPM 2.0 Part 2, 6.6): checked on response headers as a TPM
// sends them.
func TestRetryableResponses(t *testing.T) {
	t.Parallel()
	rsp := func(rc uint32) []byte {
		return []byte{0x80, 0x01, 0, 0, 0, 10, byte(rc >> 24), byte(rc >> 16), byte(rc >> 8), byte(rc)}
	}
	for rc, want := range map[uint32]bool{
		0x922: true,  // TPM_RC_RETRY
		0x908: true,  // TPM_RC_YIELDED
		0x90A: true,  // TPM_RC_TESTING
		0x000: false, // success
		0x921: false, // TPM_RC_LOCKOUT: waiting will not help soon enough
		0x928: false, // TPM_RC_PCR_CHANGED: the policy session must be redone
		0x99D: false, // TPM_RC_POLICY_FAIL (session 1)
		0x902: false, // TPM_RC_OBJECT_MEMORY
	} {
		got, ok := responseCode(rsp(rc))
		if !ok || uint32(got) != rc || retryable(got) != want {
			t.Errorf("rc 0x%x: parsed 0x%x, retryable %v; want retryable %v", rc, uint32(got), retryable(got), want)
		}
	}
	if _, ok := responseCode([]byte{0x80, 0x01, 0, 0}); ok {
		t.Error("parsed a truncated header")
	}
}

// A TPM that restarts or dies under an open TPM: the handles are gone, so
// every operation says the device is unavailable (reopen it) instead of
// blaming the key.
func TestTPMGoneUnderneath(t *testing.T) {
	t.Parallel()
	tp := testenv.NewTPM(t)
	ctx := context.Background()
	k := openTPM(t, tp)
	dir := t.TempDir()
	uri := "tpmkey:file=" + filepath.Join(dir, "agent.key")
	createKey(t, k, uri, keystore.ECDSAP256)
	s := mustSigner(t, k, uri)

	tp.Stop(t)
	if err := signVerify(t, s, crypto.SHA256, "stopped"); !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), tp.Socket) {
		t.Fatalf("Sign with swtpm stopped: %v, want ErrUnavailable naming the socket", err)
	}
	tp.Start(t)
	if err := signVerify(t, s, crypto.SHA256, "restarted"); !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), "restarted") {
		t.Fatalf("Sign after swtpm restarted: %v, want ErrUnavailable", err)
	}
	_, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: "tpmkey:file=" + filepath.Join(dir, "new.key"), Algorithm: keystore.ECDSAP256})
	if !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("CreateKey after swtpm restarted: %v, want ErrUnavailable", err)
	}
	_ = k.Close() // its TPM restarted: Close only lets go of a dead connection
	if err := signVerify(t, mustSigner(t, openTPM(t, tp), uri), crypto.SHA256, "reopened"); err != nil {
		t.Fatal(err)
	}
}
