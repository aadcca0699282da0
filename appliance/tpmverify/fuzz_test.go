package tpmverify

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// softAK is an AK-shaped TPM public area around a software key, so the
// fuzzers can sign what they generate and reach the parsers behind the
// signature check. It is test input, not a stand-in for a TPM: the join
// tests use swtpm.
func softAK(t testing.TB, restricted bool) (*ecdsa.PrivateKey, []byte) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			UserWithAuth: true, Restricted: restricted, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
				&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
			Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
		}),
	}
	return k, tpm2.Marshal(tpm2.New2B(pub))
}

func sign(t testing.TB, k *ecdsa.PrivateKey, b []byte) []byte {
	d := sha256.Sum256(b)
	r, s, err := ecdsa.Sign(rand.Reader, k, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return tpm2.Marshal(tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgECDSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA,
		&tpm2.TPMSSignatureECC{Hash: tpm2.TPMAlgSHA256,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: r.Bytes()}, SignatureS: tpm2.TPM2BECCParameter{Buffer: s.Bytes()}})})
}

// FuzzCheckAK: any public area a joining host sends as its AK is parsed
// and judged, never a panic; an accepted one is restricted and TPM-bound.
func FuzzCheckAK(f *testing.F) {
	_, ak := softAK(f, true)
	_, key := softAK(f, false)
	f.Add(ak)
	f.Add(key)
	f.Add([]byte{0, 2, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := CheckAK(b)
		if err != nil {
			return
		}
		pub, _, err := parsePublic(b)
		if err != nil || !pub.ObjectAttributes.Restricted || !pub.ObjectAttributes.FixedTPM || a.Key == nil {
			t.Fatal("accepted an AK that is not a restricted TPM-bound key")
		}
	})
}

// FuzzVerifyEK: EK public areas and certificates from a joining host,
// with no trusted CA and an allowlist that matches none of them.
func FuzzVerifyEK(f *testing.F) {
	_, pub := softAK(f, false)
	f.Add(pub, []byte{})
	f.Add(pub, []byte{0x30, 0x82, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, public, cert []byte) {
		if ek, err := VerifyEK(public, cert, nil, []string{"00"}); err == nil {
			t.Fatalf("EK accepted with no CA and no allowlist match: %+v", ek)
		}
	})
}

// FuzzVerifyCertify: AK-signed attestation structures and certified
// public areas of any shape. Whatever is accepted must be a certification
// of exactly the presented key with our nonce.
func FuzzVerifyCertify(f *testing.F) {
	k, akPub := softAK(f, true)
	ak, err := CheckAK(akPub)
	if err != nil {
		f.Fatal(err)
	}
	_, agentPub := softAK(f, false)
	p2b, _ := tpm2.Unmarshal[tpm2.TPM2BPublic](agentPub)
	agent, _ := p2b.Contents()
	name, _ := tpm2.ObjectName(agent)
	nonce := []byte("0123456789abcdef")
	good := tpm2.Marshal(tpm2.TPMSAttest{
		Magic: tpm2.TPMGeneratedValue, Type: tpm2.TPMSTAttestCertify,
		ExtraData: tpm2.TPM2BData{Buffer: nonce},
		Attested:  tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify, &tpm2.TPMSCertifyInfo{Name: *name}),
	})
	if _, err := VerifyCertify(ak, Certification{Attest: good, Signature: sign(f, k, good), Public: agentPub}, nonce); err != nil {
		f.Fatalf("seed certification refused: %v", err)
	}
	f.Add(good, agentPub)
	f.Add(good, akPub)
	f.Add(good[:len(good)-3], agentPub)
	f.Fuzz(func(t *testing.T, attest, public []byte) {
		key, err := VerifyCertify(ak, Certification{Attest: attest, Signature: sign(t, k, attest), Public: public}, nonce)
		if err != nil {
			return
		}
		pub, pk, err := parsePublic(public)
		if err != nil || pub.ObjectAttributes.Restricted || !pub.ObjectAttributes.FixedTPM || !key.Equal(pk) {
			t.Fatal("accepted a certification of a key that is not the presented TPM-bound signing key")
		}
	})
}

// FuzzVerifyQuote: AK-signed quote structures against a one-PCR policy.
func FuzzVerifyQuote(f *testing.F) {
	k, akPub := softAK(f, true)
	ak, _ := CheckAK(akPub)
	nonce := []byte("nonce")
	f.Add(tpm2.Marshal(tpm2.TPMSAttest{Magic: tpm2.TPMGeneratedValue, Type: tpm2.TPMSTAttestQuote,
		ExtraData: tpm2.TPM2BData{Buffer: nonce},
		Attested:  tpm2.NewTPMUAttest(tpm2.TPMSTAttestQuote, &tpm2.TPMSQuoteInfo{})}))
	f.Fuzz(func(t *testing.T, attest []byte) {
		// Refusing is fine; the test is that nothing panics.
		_ = VerifyQuote(ak, attest, sign(t, k, attest), nonce, map[uint][]byte{7: make([]byte, 32)})
	})
}
