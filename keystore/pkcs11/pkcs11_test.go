package pkcs11

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/sigil-appliance/sigil/keystore"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

func newStore(t *testing.T) *KeyStore {
	ks := New(Options{})
	t.Cleanup(func() {
		if err := ks.Close(); err != nil {
			t.Error(err)
		}
	})
	return ks
}

func writeFile(t *testing.T, path string, b []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, b, mode); err != nil {
		t.Fatal(err)
	}
}

func TestCreateSignVerify(t *testing.T) {
	tok := testenv.ProcessHSM(t).NewToken(t, "sign")
	ks := newStore(t)
	ctx := context.Background()
	msg := sha256.Sum256([]byte("sigil"))

	for _, alg := range []keystore.Algorithm{keystore.ECDSAP256, keystore.ECDSAP384, keystore.RSA3072, keystore.RSA2048} {
		t.Run(string(alg), func(t *testing.T) {
			uri := tok.KeyURI("key-" + string(alg))
			pub, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: alg})
			if err != nil {
				t.Fatal(err)
			}
			s, err := ks.Signer(ctx, uri)
			if err != nil {
				t.Fatal(err)
			}
			if !pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(s.Public()) {
				t.Fatal("signer's public key differs from the created one")
			}
			again, err := ks.PublicKey(ctx, uri)
			if err != nil || !again.(interface{ Equal(crypto.PublicKey) bool }).Equal(pub) {
				t.Fatalf("PublicKey = %v, %v", again, err)
			}
			sig, err := s.Sign(rand.Reader, msg[:], crypto.SHA256)
			if err != nil {
				t.Fatal(err)
			}
			switch p := pub.(type) {
			case *ecdsa.PublicKey:
				if !ecdsa.VerifyASN1(p, msg[:], sig) {
					t.Fatal("ECDSA signature does not verify")
				}
				bad := append([]byte{}, msg[:]...)
				bad[0] ^= 1
				if ecdsa.VerifyASN1(p, bad, sig) {
					t.Fatal("signature verifies for another digest")
				}
			case *rsa.PublicKey:
				if want := map[keystore.Algorithm]int{keystore.RSA2048: 2048, keystore.RSA3072: 3072}[alg]; p.N.BitLen() != want {
					t.Fatalf("%s key has %d bits", alg, p.N.BitLen())
				}
				if err := rsa.VerifyPKCS1v15(p, crypto.SHA256, msg[:], sig); err != nil {
					t.Fatal(err)
				}
				d384 := sha512.Sum384([]byte("sigil"))
				pss := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA384}
				sig, err := s.Sign(rand.Reader, d384[:], pss)
				if err != nil {
					t.Fatal(err)
				}
				if err := rsa.VerifyPSS(p, crypto.SHA384, d384[:], sig, pss); err != nil {
					t.Fatal(err)
				}
			}
			// The signer works where the standard library expects one.
			tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "t"},
				NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, s)
			if err != nil {
				t.Fatal(err)
			}
			cert, _ := x509.ParseCertificate(der)
			if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Sign(rand.Reader, msg[:10], crypto.SHA256); err == nil {
				t.Fatal("signed a digest of the wrong length")
			}
		})
	}
}

// The HSM, not our word, must say the key cannot leave it.
func TestPrivateKeyIsSensitiveAndNeverExtractable(t *testing.T) {
	tok := testenv.ProcessHSM(t).NewToken(t, "extract")
	ks := newStore(t)
	ctx := context.Background()
	uri := tok.KeyURI("ca")
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	priv, ok := tok.PrivateKeys(t)["ca"]
	if !ok {
		t.Fatal("pkcs11-tool lists no private key labelled ca")
	}
	if priv["Usage"] != "sign" {
		t.Errorf("private key usage is %q, want sign only", priv["Usage"])
	}
	if priv["Access"] != testenv.NonExtractable {
		t.Errorf("private key access is %q, want %s", priv["Access"], testenv.NonExtractable)
	}

	// Reading the private value through PKCS#11 is refused by the token.
	u, _ := ParseURI(uri)
	tk, _ := ks.token(ctx, u)
	err := tk.do(ctx, func(s pkcs11.SessionHandle) error {
		h, err := findKey(tk, s, u, pkcs11.CKO_PRIVATE_KEY)
		if err != nil {
			return err
		}
		_, err = tk.mod.ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
		return err
	})
	if !isRV(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		t.Fatalf("reading CKA_VALUE: got %v, want CKR_ATTRIBUTE_SENSITIVE", err)
	}
}

func TestCreateRefusesExistingLabelOrID(t *testing.T) {
	tok := testenv.ProcessHSM(t).NewToken(t, "exists")
	ks := newStore(t)
	ctx := context.Background()
	uri := tok.KeyURI("issuing")
	first, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	_, err = ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP384})
	if !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Fatalf("second create: %v, want ErrAlreadyExists", err)
	}
	still, err := ks.PublicKey(ctx, uri)
	if err != nil || !still.(*ecdsa.PublicKey).Equal(first) {
		t.Fatalf("existing key changed: %v", err)
	}

	withID := strings.Replace(tok.KeyURI("a"), "object=a", "object=a;id=%07", 1)
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: withID, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	sameID := strings.Replace(tok.KeyURI("b"), "object=b", "object=b;id=%07", 1)
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: sameID, Algorithm: keystore.ECDSAP256}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Fatalf("create with a taken id: %v, want ErrAlreadyExists", err)
	}
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: tok.KeyURI("c"), Algorithm: "ed448"}); !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
		t.Fatalf("create ed448: %v", err)
	}
	if n := len(tok.PrivateKeys(t)); n != 2 {
		t.Fatalf("token holds %d private keys, want 2", n)
	}
}

func TestBadInputErrors(t *testing.T) {
	hsm := testenv.ProcessHSM(t)
	tok := hsm.NewToken(t, "errors")
	// A token nobody in this process has logged in to: PKCS#11 keeps one
	// login per process and token, so a wrong PIN is only detectable there.
	// SoftHSM lists only tokens that existed when the module was
	// initialized, so it is made before the store is used.
	fresh := hsm.NewToken(t, "errors-fresh")
	ks := newStore(t)
	ctx := context.Background()
	good := tok.KeyURI("k")
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: good, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	wrongPIN := filepath.Join(dir, "wrong.pin")
	writeFile(t, wrongPIN, []byte("not-the-pin\n"), 0o600)
	openPIN := filepath.Join(dir, "open.pin")
	writeFile(t, openPIN, []byte(tok.PIN(t)), 0o644)

	for _, tc := range []struct {
		name string
		uri  string
		want error
	}{
		{"unknown token", strings.Replace(good, "token=errors", "token=no-such-token", 1), keystore.ErrTokenNotFound},
		{"wrong PIN", strings.Replace(fresh.KeyURI("k"), fresh.PINFile, wrongPIN, 1), keystore.ErrWrongPIN},
		{"world-readable PIN file", strings.Replace(fresh.KeyURI("k"), fresh.PINFile, openPIN, 1), keystore.ErrPINSource},
		{"missing PIN file", strings.Replace(fresh.KeyURI("k"), fresh.PINFile, filepath.Join(dir, "nope"), 1), keystore.ErrPINSource},
		{"unset PIN variable", strings.Replace(fresh.KeyURI("k"), "file:"+fresh.PINFile, "env:SIGIL_TEST_UNSET_PIN", 1), keystore.ErrPINSource},
		{"missing object", tok.KeyURI("absent"), keystore.ErrNotFound},
		{"malformed URI", "pkcs11:token=errors;object=k", keystore.ErrInvalidURI},
		{"no object", strings.Replace(good, "object=k", "", 1), keystore.ErrInvalidURI},
		{"missing module", strings.Replace(good, hsm.Module, "/nonexistent/libpkcs11.so", 1), keystore.ErrUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ks.Signer(ctx, tc.uri)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Signer: %v, want %v", err, tc.want)
			}
			if strings.Contains(err.Error(), tok.PIN(t)) || strings.Contains(err.Error(), fresh.PIN(t)) {
				t.Fatalf("error leaks a PIN: %v", err)
			}
			t.Logf("%v", err)
		})
	}
	// "Token not found" says where the module looked: a node started
	// without the SOFTHSM2_CONF its tokens were made under sees none.
	_, err := ks.Signer(ctx, strings.Replace(good, "token=errors", "token=no-such-token", 1))
	for _, want := range []string{"token=no-such-token", hsm.Module, "SOFTHSM2_CONF=" + hsm.Conf, "token directory " + hsm.Dir, `"errors"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("token not found: %v, want it to name %s", err, want)
		}
	}

	// A read-only store finds and uses keys but creates none.
	ro := New(Options{ReadOnly: true})
	t.Cleanup(func() { _ = ro.Close() }) // the test is over
	s, err := ro.Signer(ctx, good)
	if err != nil {
		t.Fatalf("read-only signer: %v", err)
	}
	digest := sha256.Sum256([]byte("read-only"))
	if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		t.Fatalf("read-only sign: %v", err)
	}
	if _, err := ro.CreateKey(ctx, keystore.CreateKeyRequest{URI: tok.KeyURI("k2"), Algorithm: keystore.ECDSAP256}); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("read-only store created a key: %v", err)
	}

	// The right PIN from the environment works.
	t.Setenv("SIGIL_TEST_PIN", fresh.PIN(t))
	envURI := strings.Replace(fresh.KeyURI("k"), "file:"+fresh.PINFile, "env:SIGIL_TEST_PIN", 1)
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: envURI, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatalf("PIN from environment: %v", err)
	}
}

// After the token drops every session (as on a token reset or HSM
// failover), signers log in again by themselves.
func TestReloginAfterSessionsLost(t *testing.T) {
	tok := testenv.ProcessHSM(t).NewToken(t, "relogin")
	var logBuf testenv.LogBuffer
	ks := New(Options{Logger: slog.New(slog.NewTextHandler(&logBuf, nil))})
	t.Cleanup(func() {
		if err := ks.Close(); err != nil {
			t.Error(err)
		}
	})
	ctx := context.Background()
	uri := tok.KeyURI("k")
	pub, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	s, err := ks.Signer(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	for round := 0; round < 3; round++ {
		u, _ := ParseURI(uri)
		tk, _ := ks.token(ctx, u)
		if err := tk.mod.ctx.CloseAllSessions(tk.slot); err != nil {
			t.Fatal(err)
		}
		sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("round %d: sign after reset: %v", round, err)
		}
		if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d[:], sig) {
			t.Fatal("signature after re-login does not verify")
		}
	}
	if !strings.Contains(logBuf.String(), "logged in again") {
		t.Fatalf("recovery was not logged: %s", logBuf.String())
	}
	if strings.Contains(logBuf.String(), tok.PIN(t)) {
		t.Fatal("log contains the PIN")
	}
}

func TestConcurrentSigners(t *testing.T) {
	tok := testenv.ProcessHSM(t).NewToken(t, "concurrent")
	ks := New(Options{SessionsPerToken: 4})
	t.Cleanup(func() {
		if err := ks.Close(); err != nil {
			t.Error(err)
		}
	})
	ctx := context.Background()
	uri := tok.KeyURI("k")
	pub, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	s, _ := ks.Signer(ctx, uri)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				d := sha256.Sum256([]byte(fmt.Sprint(g, i)))
				sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
				if err != nil {
					errs <- err
					return
				}
				if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d[:], sig) {
					errs <- fmt.Errorf("goroutine %d: bad signature", g)
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
	u, _ := ParseURI(uri)
	tk, _ := ks.token(ctx, u)
	tk.mu.Lock()
	open := tk.open
	tk.mu.Unlock()
	if open < 2 || open > 4 {
		t.Fatalf("%d sessions open, want 2..4 (the pool bound)", open)
	}
}

func TestPINProvider(t *testing.T) {
	tok := testenv.ProcessHSM(t).NewToken(t, "provider")
	ctx := context.Background()
	noSource := strings.Replace(tok.KeyURI("k"), "&pin-source=file:"+tok.PINFile, "", 1)
	if _, err := newStore(t).CreateKey(ctx, keystore.CreateKeyRequest{URI: noSource, Algorithm: keystore.ECDSAP256}); !errors.Is(err, keystore.ErrPINSource) {
		t.Fatalf("no pin-source, no provider: %v, want ErrPINSource", err)
	}
	var asked []string
	ks := New(Options{PIN: func(_ context.Context, token string) ([]byte, error) {
		asked = append(asked, token)
		return []byte(tok.PIN(t)), nil
	}})
	t.Cleanup(func() {
		if err := ks.Close(); err != nil {
			t.Error(err)
		}
	})
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: noSource, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	if len(asked) != 1 || asked[0] != "provider" {
		t.Fatalf("provider asked for %v", asked)
	}
}
