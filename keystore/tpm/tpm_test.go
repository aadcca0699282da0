package tpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/sigil-appliance/sigil/keystore"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func open(t *testing.T, tp *testenv.TPM) *TPM {
	t.Helper()
	k, err := Open(context.Background(), Config{Path: tp.Socket})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k
}

func mustSign(t *testing.T, s crypto.Signer, msg string) {
	t.Helper()
	d := sha256.Sum256([]byte(msg))
	sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Fatal("TPM signature does not verify")
	}
}

func TestCreateSignRestart(t *testing.T) {
	tp := testenv.NewTPM(t)
	ctx := context.Background()
	k := open(t, tp)
	file := filepath.Join(t.TempDir(), "agent.key")
	uri := "tpmkey:file=" + file
	pub, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(file)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("blob mode %v, want 0600", st.Mode().Perm())
	}
	b, _ := os.ReadFile(file)
	if !strings.HasPrefix(string(b), "-----BEGIN TSS2 PRIVATE KEY-----") {
		t.Fatalf("blob is not a TSS2 PEM key:\n%s", b)
	}
	s, err := k.Signer(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Public().(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("signer key differs")
	}
	mustSign(t, s, "one")
	d384 := sha512.Sum384([]byte("x"))
	sig, err := s.Sign(rand.Reader, d384[:], crypto.SHA384)
	if err != nil || !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d384[:], sig) {
		t.Fatalf("SHA-384 signature: %v", err)
	}
	if _, err := s.Sign(rand.Reader, d384[:10], crypto.SHA384); err == nil {
		t.Fatal("signed a short digest")
	}

	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Fatalf("create over an existing blob: %v", err)
	}
	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri + "2", Algorithm: keystore.RSA3072}); !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
		t.Fatalf("RSA: %v", err)
	}

	// Reboot: the TPM restarts (its first signature answers TPM_RC_RETRY,
	// which must be retried) and the same blob signs with the same key.
	k.Close()
	tp.Stop(t)
	tp.Start(t)
	k2 := open(t, tp)
	s2, err := k2.Signer(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	if !s2.Public().(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("key changed across restart")
	}
	mustSign(t, s2, "after restart")
	t.Logf("TPM answers retried since restart: %d", k2.tpm.(*retrying).retries)

	// More keys than transient slots: the cache evicts and reloads.
	var signers []crypto.Signer
	for i := 0; i < 4; i++ {
		u := fmt.Sprintf("tpmkey:file=%s/k%d", t.TempDir(), i)
		if _, err := k2.CreateKey(ctx, keystore.CreateKeyRequest{URI: u, Algorithm: keystore.ECDSAP256}); err != nil {
			t.Fatal(err)
		}
		s, err := k2.Signer(ctx, u)
		if err != nil {
			t.Fatal(err)
		}
		signers = append(signers, s)
	}
	for round := 0; round < 2; round++ {
		for _, s := range signers {
			mustSign(t, s, "evict")
		}
	}

	// Concurrent signers share the TPM safely.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 5; i++ {
				d := sha256.Sum256([]byte(fmt.Sprint(g, i)))
				sig, err := s2.Sign(rand.Reader, d[:], crypto.SHA256)
				if err != nil || !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d[:], sig) {
					errs <- fmt.Errorf("goroutine %d: %v", g, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// A copied blob is useless on another TPM: the SRK there is different.
func TestBlobFromAnotherTPM(t *testing.T) {
	a, b := testenv.NewTPM(t), testenv.NewTPM(t)
	ctx := context.Background()
	ka, kb := open(t, a), open(t, b)
	file := filepath.Join(t.TempDir(), "agent.key")
	if _, err := ka.CreateKey(ctx, keystore.CreateKeyRequest{URI: "tpmkey:file=" + file, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	stolen := filepath.Join(t.TempDir(), "copied.key")
	data, _ := os.ReadFile(file)
	os.WriteFile(stolen, data, 0o600)
	_, err := kb.Signer(ctx, "tpmkey:file="+stolen)
	if !errors.Is(err, keystore.ErrWrongDevice) {
		t.Fatalf("blob on another TPM: %v, want ErrWrongDevice", err)
	}
	t.Log(err)
	// The two TPMs' storage roots differ (so do their EKs, by manufacture).
	if ka.srk.Name.Buffer == nil || string(ka.srk.Name.Buffer) == string(kb.srk.Name.Buffer) {
		t.Fatal("two swtpm instances share a storage root key")
	}
}

func TestPCRBoundKey(t *testing.T) {
	tp := testenv.NewTPM(t)
	ctx := context.Background()
	k := open(t, tp)
	uri := "tpmkey:file=" + filepath.Join(t.TempDir(), "sealed.key") + ";pcrs=16,23"
	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	plain := strings.Split(uri, ";")[0]
	s, err := k.Signer(ctx, plain)
	if err != nil {
		t.Fatal(err)
	}
	mustSign(t, s, "PCRs as they were")
	if _, err := tp.Tool(ctx, "tpm2_pcrextend", "23:sha256="+strings.Repeat("ab", 32)); err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("PCRs changed"))
	if _, err := s.Sign(rand.Reader, d[:], crypto.SHA256); !errors.Is(err, keystore.ErrPolicy) {
		t.Fatalf("sign after PCR 23 changed: %v, want ErrPolicy", err)
	}
	// The blob records its policy: reopened, it is still bound.
	k.Close()
	k2 := open(t, tp)
	s2, err := k2.Signer(ctx, plain)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Sign(rand.Reader, d[:], crypto.SHA256); !errors.Is(err, keystore.ErrPolicy) {
		t.Fatalf("reopened PCR-bound key: %v, want ErrPolicy", err)
	}
}

func TestBadInput(t *testing.T) {
	ctx := context.Background()
	if _, err := Open(ctx, Config{Path: filepath.Join(t.TempDir(), "no.sock")}); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("missing socket: %v", err)
	}
	notTPM := filepath.Join(t.TempDir(), "file")
	os.WriteFile(notTPM, nil, 0o600)
	if _, err := Open(ctx, Config{Path: notTPM}); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("regular file as TPM: %v", err)
	}
	tp := testenv.NewTPM(t)
	k := open(t, tp)
	for _, u := range []string{"pkcs11:token=x", "tpmkey:", "tpmkey:file=relative", "tpmkey:file=/x;pcrs=24", "tpmkey:file=/x;colour=red", "tpmkey:file"} {
		if _, err := k.Signer(ctx, u); !errors.Is(err, keystore.ErrInvalidURI) {
			t.Errorf("Signer(%q) = %v, want ErrInvalidURI", u, err)
		}
	}
	if _, err := k.Signer(ctx, "tpmkey:file="+filepath.Join(t.TempDir(), "absent")); !errors.Is(err, keystore.ErrNotFound) {
		t.Fatalf("missing blob: %v", err)
	}
	junk := filepath.Join(t.TempDir(), "junk.key")
	os.WriteFile(junk, []byte("-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n"), 0o600)
	if _, err := k.Signer(ctx, "tpmkey:file="+junk); err == nil || !strings.Contains(err.Error(), "not a Sigil TPM key blob") {
		t.Fatalf("junk blob: %v", err)
	}
}

// scripted answers TPM commands with canned response codes.
type scripted struct {
	codes []uint32
	sent  int
}

func (s *scripted) Send([]byte) ([]byte, error) {
	rc := s.codes[min(s.sent, len(s.codes)-1)]
	s.sent++
	rsp := []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(rsp[6:], rc)
	return rsp, nil
}
func (s *scripted) Close() error { return nil }

func TestRetryingTransport(t *testing.T) {
	// RETRY, YIELDED and TESTING are retried; the final answer is passed on.
	s := &scripted{codes: []uint32{0x922, 0x908, 0x90A, 0}}
	r := &retrying{inner: s}
	rsp, err := r.Send([]byte{0})
	if err != nil || binary.BigEndian.Uint32(rsp[6:]) != 0 || s.sent != 4 || r.retries != 3 {
		t.Fatalf("sent %d, retries %d, rc %x, err %v", s.sent, r.retries, rsp[6:], err)
	}
	// Real errors are not retried.
	s = &scripted{codes: []uint32{0x99D}}
	r = &retrying{inner: s}
	if rsp, _ := r.Send([]byte{0}); s.sent != 1 || binary.BigEndian.Uint32(rsp[6:]) != 0x99D {
		t.Fatalf("policy failure retried (%d sends)", s.sent)
	}
	// A TPM that never stops saying RETRY is given up on.
	s = &scripted{codes: []uint32{0x922}}
	r = &retrying{inner: s}
	r.Send([]byte{0})
	if s.sent != 51 {
		t.Fatalf("endless RETRY: %d sends, want 51", s.sent)
	}
}

func TestMain(m *testing.M) { os.Exit(m.Run()) }
