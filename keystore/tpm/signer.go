package tpm

import (
	"crypto"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/google/go-tpm/tpm2"

	"github.com/sigil-appliance/sigil/keystore"
)

// policyAttempts bounds how often a PCR-bound signature is restarted when
// some PCR (any PCR: the TPM keeps one update counter for all of them) was
// extended between PolicyPCR and the signature. On a host with IMA, PCR 10
// changes all the time.
const policyAttempts = 3

type signer struct {
	t    *TPM
	file string // for messages
	kb   *keyBlob
}

func (s *signer) Public() crypto.PublicKey { return s.kb.ecPub }

func hashAlg(h crypto.Hash) (tpm2.TPMIAlgHash, bool) {
	switch h {
	case crypto.SHA256:
		return tpm2.TPMAlgSHA256, true
	case crypto.SHA384:
		return tpm2.TPMAlgSHA384, true
	case crypto.SHA512:
		return tpm2.TPMAlgSHA512, true
	}
	return 0, false
}

// Sign signs digest, which the caller hashed with opts.HashFunc(), with
// ECDSA in the TPM and returns an ASN.1 DER signature. rand is not used:
// the TPM draws the nonce from its own generator.
func (s *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	h := opts.HashFunc()
	alg, ok := hashAlg(h)
	if !ok {
		return nil, fmt.Errorf("TPM key %s: cannot sign for hash %v: want SHA-256, SHA-384 or SHA-512", s.file, h)
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("TPM key %s: digest is %d bytes, but %v digests are %d", s.file, len(digest), h, h.Size())
	}
	t := s.t
	t.mu.Lock()
	defer t.mu.Unlock()
	k, err := t.loadLocked(s.kb, s.file)
	if err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		rsp, err := t.signLocked(k, s.kb.pcrs, digest, alg)
		if err == nil {
			return encodeSignature(rsp)
		}
		switch {
		case errors.Is(err, tpm2.TPMRCPCRChanged) && attempt < policyAttempts:
			continue
		case errors.Is(err, tpm2.TPMRCPolicyFail), errors.Is(err, tpm2.TPMRCPCRChanged):
			return nil, fmt.Errorf("%w: TPM key %s is bound to the values PCRs %v had when it was created, and they have changed: %v",
				keystore.ErrPolicy, s.file, s.kb.pcrs, err)
		}
		return nil, t.opError("TPM2_Sign with "+s.file, err)
	}
}

// signLocked runs TPM2_Sign, in a PolicyPCR session for a PCR-bound key.
// Called with mu held.
func (t *TPM) signLocked(k *loadedKey, pcrs []uint, digest []byte, alg tpm2.TPMIAlgHash) (*tpm2.SignResponse, error) {
	t.signatures.Add(1)
	var auth tpm2.Session = tpm2.PasswordAuth(nil)
	if len(pcrs) > 0 {
		sess, closeSess, err := tpm2.PolicySession(t.tpm, tpm2.TPMAlgSHA256, 16)
		if err != nil {
			return nil, fmt.Errorf("start policy session: %w", err)
		}
		// Sessions take slots too (swtpm has 64, other TPMs as few as 3).
		// A flush fails only when the TPM stopped answering, which the next
		// command reports; the signature made here is good either way.
		defer func() { _ = closeSess() }()
		// An empty pcrDigest makes the TPM use the current values; the
		// signature then fails unless they hash to the key's policy.
		if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: pcrSelection(pcrs)}).Execute(t.tpm); err != nil {
			return nil, fmt.Errorf("PolicyPCR(%v): %w", pcrs, err)
		}
		auth = sess
	}
	return tpm2.Sign{
		KeyHandle: tpm2.AuthHandle{Handle: k.handle.Handle, Name: k.handle.Name, Auth: auth},
		Digest:    tpm2.TPM2BDigest{Buffer: digest},
		InScheme: tpm2.TPMTSigScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: alg}),
		},
		// A null ticket: the key is not restricted, so the TPM need not
		// have hashed the data itself.
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(t.tpm)
}

// encodeSignature turns the TPM's r and s into the ASN.1 form that
// crypto.Signer users (x509, ecdsa.VerifyASN1) expect.
func encodeSignature(rsp *tpm2.SignResponse) ([]byte, error) {
	sig, err := rsp.Signature.Signature.ECDSA()
	if err != nil {
		return nil, fmt.Errorf("TPM returned a non-ECDSA signature: %w", err)
	}
	return asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(sig.SignatureR.Buffer),
		new(big.Int).SetBytes(sig.SignatureS.Buffer),
	})
}

var _ crypto.Signer = (*signer)(nil)
