package tpmverify

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/tpm"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func readCerts(t *testing.T, paths ...string) []*x509.Certificate {
	var out []*x509.Certificate
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		blk, _ := pem.Decode(b)
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

// host is an agent's side: its TPM, an agent key in it, and an AK.
type host struct {
	sw  *testenv.TPM
	tpm *tpm.TPM
	key string // agent key URI
	ak  *tpm.AK
	ek  *tpm.EK
	cas []*x509.Certificate
}

func newHost(t *testing.T) *host {
	sw := testenv.NewTPM(t)
	ctx := context.Background()
	k, err := tpm.Open(ctx, tpm.Config{Path: sw.Socket})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Error(err)
		}
	})
	h := &host{sw: sw, tpm: k, key: "tpmkey:file=" + filepath.Join(t.TempDir(), "agent.key"), cas: readCerts(t, sw.EKCARoot, sw.EKCAIssuer)}
	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: h.key, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	if h.ek, err = k.EndorsementKey(ctx); err != nil {
		t.Fatal(err)
	}
	if h.ak, err = k.NewAK(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.ak.Close(); err != nil {
			t.Error(err)
		}
	})
	return h
}

func mustRefuse(t *testing.T, err error, want string) {
	t.Helper()
	if !errors.Is(err, ErrEvidence) || !strings.Contains(err.Error(), want) {
		t.Fatalf("got %v, want a refusal saying %q", err, want)
	}
}

// The whole join evidence on a real swtpm: EK certificate from the local
// CA, AK checks, certify of the agent key with the nonce, and credential
// activation that only this TPM can do.
func TestJoinEvidence(t *testing.T) {
	h := newHost(t)
	ctx := context.Background()
	ek, err := VerifyEK(h.ek.Public, h.ek.Cert, h.cas, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ek.Method != "ek-cert" || len(ek.Hash) != 64 {
		t.Fatalf("EK %+v", ek)
	}
	ak, err := CheckAK(h.ak.Public)
	if err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, 32)
	rand.Read(nonce)
	c, err := h.ak.Certify(ctx, h.key, nonce)
	if err != nil {
		t.Fatal(err)
	}
	agentKey, err := VerifyCertify(ak, Certification{Attest: c.Attest, Signature: c.Signature, Public: c.Public}, nonce)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := h.tpm.PublicKey(ctx, h.key)
	if !agentKey.Equal(pub) {
		t.Fatal("certified key is not the agent key")
	}
	cred, err := MakeCredential(ek, ak)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := h.ak.ActivateCredential(ctx, cred.IDObject, cred.EncSecret)
	if err != nil {
		t.Fatal(err)
	}
	if err := cred.Check(secret); err != nil {
		t.Fatal(err)
	}

	// The allowlist path, without a certificate.
	if e, err := VerifyEK(h.ek.Public, nil, nil, []string{ek.Hash}); err != nil || e.Method != "ek-allowlist" {
		t.Fatalf("allowlisted EK: %v", err)
	}
}

func TestJoinEvidenceRefused(t *testing.T) {
	h, other := newHost(t), newHost(t)
	ctx := context.Background()

	// Unknown EK: certificate from another manufacturer CA, not allowlisted.
	mustRefuse(t, func() error { _, err := VerifyEK(h.ek.Public, h.ek.Cert, other.cas, nil); return err }(), "does not chain")
	mustRefuse(t, func() error { _, err := VerifyEK(h.ek.Public, nil, h.cas, nil); return err }(), "no EK certificate")
	// A genuine certificate presented for another TPM's EK.
	mustRefuse(t, func() error { _, err := VerifyEK(other.ek.Public, h.ek.Cert, h.cas, nil); return err }(), "certifies another key")

	// An "AK" that is not restricted (the agent key itself).
	c, err := h.ak.Certify(ctx, h.key, []byte("n"))
	if err != nil {
		t.Fatal(err)
	}
	mustRefuse(t, func() error { _, err := CheckAK(c.Public); return err }(), "not a restricted signing key")

	ak, _ := CheckAK(h.ak.Public)
	good := Certification{Attest: c.Attest, Signature: c.Signature, Public: c.Public}
	// Wrong nonce (a replay of an old certification).
	mustRefuse(t, func() error { _, err := VerifyCertify(ak, good, []byte("other")); return err }(), "another nonce")
	// Certify of a key that is not the presented agent key.
	otherKey := "tpmkey:file=" + filepath.Join(t.TempDir(), "second.key")
	if _, err := h.tpm.CreateKey(ctx, keystore.CreateKeyRequest{URI: otherKey, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	c2, _ := h.ak.Certify(ctx, otherKey, []byte("n"))
	swapped := good
	swapped.Public = c2.Public
	mustRefuse(t, func() error { _, err := VerifyCertify(ak, swapped, []byte("n")); return err }(), "certified another key")
	// A certification signed by another TPM's AK.
	otherAK, _ := CheckAK(other.ak.Public)
	mustRefuse(t, func() error { _, err := VerifyCertify(otherAK, good, []byte("n")); return err }(), "does not verify")
	// Tampered attestation.
	bad := good
	bad.Attest = append([]byte(nil), good.Attest...)
	bad.Attest[len(bad.Attest)-1] ^= 1
	mustRefuse(t, func() error { _, err := VerifyCertify(ak, bad, []byte("n")); return err }(), "does not verify")

	// Credential activation: a credential made for this AK with another
	// TPM's EK cannot be activated here, and a wrong secret is refused.
	otherEK, _ := VerifyEK(other.ek.Public, other.ek.Cert, other.cas, nil)
	cred, _ := MakeCredential(otherEK, ak)
	if _, err := h.ak.ActivateCredential(ctx, cred.IDObject, cred.EncSecret); !errors.Is(err, keystore.ErrWrongDevice) {
		t.Fatalf("activation with another TPM's EK: %v", err)
	}
	ek, _ := VerifyEK(h.ek.Public, h.ek.Cert, h.cas, nil)
	otherAKName, _ := CheckAK(other.ak.Public)
	cred2, _ := MakeCredential(ek, otherAKName)
	if _, err := h.ak.ActivateCredential(ctx, cred2.IDObject, cred2.EncSecret); err == nil {
		t.Fatal("activated a credential bound to another AK's name")
	}
	cred3, _ := MakeCredential(ek, ak)
	mustRefuse(t, cred3.Check([]byte("not the secret")), "wrong secret")
}

func TestQuoteAgainstPCRPolicy(t *testing.T) {
	h := newHost(t)
	ctx := context.Background()
	ak, _ := CheckAK(h.ak.Public)
	zero := make([]byte, 32)
	policy := map[uint][]byte{16: zero, 23: zero}
	nonce := []byte("quote-nonce")
	attest, sig, err := h.ak.Quote(ctx, nonce, []uint{16, 23})
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyQuote(ak, attest, sig, nonce, policy); err != nil {
		t.Fatal(err)
	}
	mustRefuse(t, VerifyQuote(ak, attest, sig, []byte("other"), policy), "another nonce")
	if _, err := h.sw.Tool(ctx, "tpm2_pcrextend", "23:sha256="+strings.Repeat("ab", 32)); err != nil {
		t.Fatal(err)
	}
	attest, sig, _ = h.ak.Quote(ctx, nonce, []uint{16, 23})
	mustRefuse(t, VerifyQuote(ak, attest, sig, nonce, policy), "do not match the policy")
	// The policy's expected digest, recomputed, is what the TPM reports.
	ext := sha256.Sum256(append(zero, bytesOf(0xab, 32)...))
	policy[23] = ext[:]
	if err := VerifyQuote(ak, attest, sig, nonce, policy); err != nil {
		t.Fatalf("quote with the extended value in the policy: %v", err)
	}
}

func bytesOf(b byte, n int) []byte {
	out := make([]byte, n)
	for i := range out {
		out[i] = b
	}
	return out
}

// The same evidence with the TPM's ECC P-384 EK (TCG high-range template,
// certificate at 0x01c00016), which swtpm provisions next to the RSA EK.
func TestJoinEvidenceECCP384EK(t *testing.T) {
	sw := testenv.NewTPM(t)
	ctx := context.Background()
	k, err := tpm.Open(ctx, tpm.Config{Path: sw.Socket, EK: "ecc-p384"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Error(err)
		}
	})
	key := "tpmkey:file=" + filepath.Join(t.TempDir(), "agent.key")
	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: key, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	ekEv, err := k.EndorsementKey(ctx)
	if err != nil || ekEv.Kind != "ecc-p384" || len(ekEv.Cert) == 0 {
		t.Fatalf("P-384 EK: %+v %v", ekEv, err)
	}
	ek, err := VerifyEK(ekEv.Public, ekEv.Cert, readCerts(t, sw.EKCARoot, sw.EKCAIssuer), nil)
	if err != nil {
		t.Fatal(err)
	}
	akh, err := k.NewAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := akh.Close(); err != nil {
			t.Error(err)
		}
	})
	ak, err := CheckAK(akh.Public)
	if err != nil {
		t.Fatal(err)
	}
	cred, err := MakeCredential(ek, ak)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := akh.ActivateCredential(ctx, cred.IDObject, cred.EncSecret)
	if err != nil {
		t.Fatal(err)
	}
	if err := cred.Check(secret); err != nil {
		t.Fatal(err)
	}
	// The RSA EK of the same TPM is a different identity.
	k2, err := tpm.Open(ctx, tpm.Config{Path: sw.Socket, EK: "rsa"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := k2.Close(); err != nil {
			t.Error(err)
		}
	})
	rsaEv, _ := k2.EndorsementKey(ctx)
	if rsaEv.Kind != "rsa" {
		t.Fatalf("rsa EK kind %s", rsaEv.Kind)
	}
}
