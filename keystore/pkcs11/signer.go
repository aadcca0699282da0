package pkcs11

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/asn1"
	"fmt"
	"io"
	"math/big"
	"sync"

	"github.com/miekg/pkcs11"
)

// signer signs with a private key that stays in the token. The object handle
// is cached per login generation: handles may change after a token reset.
type signer struct {
	tok *token
	uri *URI
	pub crypto.PublicKey

	mu     sync.Mutex
	handle pkcs11.ObjectHandle
	gen    uint64
	valid  bool
}

func (s *signer) Public() crypto.PublicKey { return s.pub }

// Sign signs digest inside the token. For ECDSA the signature is ASN.1 DER
// (as crypto/ecdsa produces); for RSA, opts chooses PKCS#1 v1.5 or PSS.
func (s *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.SignContext(context.Background(), digest, opts)
}

// SignContext is Sign with a context that bounds the wait for a session.
func (s *signer) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	mech, data, err := s.mechanism(digest, opts)
	if err != nil {
		return nil, err
	}
	var sig []byte
	err = s.tok.do(ctx, func(sh pkcs11.SessionHandle) error {
		h, err := s.keyHandle(sh)
		if err != nil {
			return err
		}
		if err := s.tok.mod.ctx.SignInit(sh, []*pkcs11.Mechanism{mech}, h); err != nil {
			s.forget()
			return err
		}
		sig, err = s.tok.mod.ctx.Sign(sh, data)
		if err != nil {
			s.forget()
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pkcs11 sign with %q on token %q: %w", s.uri.Object, s.tok.label, err)
	}
	if _, ok := s.pub.(*ecdsa.PublicKey); ok {
		return rawToASN1(sig)
	}
	return sig, nil
}

func (s *signer) keyHandle(sh pkcs11.SessionHandle) (pkcs11.ObjectHandle, error) {
	s.tok.mu.Lock()
	gen := s.tok.gen
	s.tok.mu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.valid && s.gen == gen {
		return s.handle, nil
	}
	h, err := findKey(s.tok, sh, s.uri, pkcs11.CKO_PRIVATE_KEY)
	if err != nil {
		return 0, err
	}
	s.handle, s.gen, s.valid = h, gen, true
	return h, nil
}

func (s *signer) forget() {
	s.mu.Lock()
	s.valid = false
	s.mu.Unlock()
}

var digestInfoPrefix = map[crypto.Hash][]byte{
	crypto.SHA256: {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20},
	crypto.SHA384: {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30},
	crypto.SHA512: {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40},
}

var pssHash = map[crypto.Hash][2]uint{
	crypto.SHA256: {pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256},
	crypto.SHA384: {pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384},
	crypto.SHA512: {pkcs11.CKM_SHA512, pkcs11.CKG_MGF1_SHA512},
}

func (s *signer) mechanism(digest []byte, opts crypto.SignerOpts) (*pkcs11.Mechanism, []byte, error) {
	h := opts.HashFunc()
	if h == 0 || !h.Available() && digestInfoPrefix[h] == nil {
		return nil, nil, fmt.Errorf("pkcs11: sign needs a hashed digest (SHA-256, SHA-384 or SHA-512), got hash %v", h)
	}
	if len(digest) != h.Size() {
		return nil, nil, fmt.Errorf("pkcs11: digest is %d bytes, %v needs %d", len(digest), h, h.Size())
	}
	switch pub := s.pub.(type) {
	case *ecdsa.PublicKey:
		return pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil), digest, nil
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			p, ok := pssHash[h]
			if !ok {
				return nil, nil, fmt.Errorf("pkcs11: RSA-PSS with %v is not supported", h)
			}
			salt := pss.SaltLength
			switch salt {
			case rsa.PSSSaltLengthAuto:
				salt = (pub.N.BitLen()-1+7)/8 - 2 - h.Size()
			case rsa.PSSSaltLengthEqualsHash:
				salt = h.Size()
			}
			return pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, pkcs11.NewPSSParams(p[0], p[1], uint(salt))), digest, nil
		}
		prefix, ok := digestInfoPrefix[h]
		if !ok {
			return nil, nil, fmt.Errorf("pkcs11: RSA PKCS#1 v1.5 with %v is not supported", h)
		}
		return pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil), append(append([]byte{}, prefix...), digest...), nil
	}
	return nil, nil, fmt.Errorf("pkcs11: unsupported public key type %T", s.pub)
}

// rawToASN1 turns CKM_ECDSA's r||s into the DER SEQUENCE crypto.Signer
// callers expect.
func rawToASN1(raw []byte) ([]byte, error) {
	if len(raw) == 0 || len(raw)%2 != 0 {
		return nil, fmt.Errorf("pkcs11: ECDSA signature of odd length %d", len(raw))
	}
	return asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(raw[:len(raw)/2]),
		new(big.Int).SetBytes(raw[len(raw)/2:]),
	})
}
