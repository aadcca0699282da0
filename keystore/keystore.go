// Package keystore owns Sigil's contract with keys that never leave their
// hardware: CA keys in a PKCS#11 HSM (keystore/pkcs11) and agent keys in a
// TPM (keystore/tpm). Keys are addressed by URI, created inside the device,
// and used only through crypto.Signer; no backend ever returns private key
// material.
//
// This package imports only the standard library.
package keystore

import (
	"context"
	"crypto"
	"errors"
	"fmt"
)

// Algorithm names a key type a backend can create.
type Algorithm string

const (
	ECDSAP256 Algorithm = "ecdsa-p256"
	ECDSAP384 Algorithm = "ecdsa-p384"
	RSA3072   Algorithm = "rsa-3072"
	// RSA2048 is for JWT signing keys only (RS256, which some cloud token
	// services require); ParseAlgorithm does not offer it, so a ceremony
	// never makes a CA key this small.
	RSA2048 Algorithm = "rsa-2048"
)

// ParseAlgorithm accepts the canonical names and the curve names operators
// type ("P-256", "P-384").
func ParseAlgorithm(s string) (Algorithm, error) {
	switch s {
	case string(ECDSAP256), "P-256", "p256":
		return ECDSAP256, nil
	case string(ECDSAP384), "P-384", "p384":
		return ECDSAP384, nil
	case string(RSA3072), "RSA-3072":
		return RSA3072, nil
	}
	return "", fmt.Errorf("%w: %q (want %s, %s or %s)", ErrUnsupportedAlgorithm, s, ECDSAP256, ECDSAP384, RSA3072)
}

// CreateKeyRequest asks a backend to generate a key inside its device.
type CreateKeyRequest struct {
	// URI addresses the new key in the backend's URI scheme
	// (pkcs11: for HSMs, tpmkey: for TPM-wrapped blobs).
	URI       string
	Algorithm Algorithm
}

// Manager is what every key backend offers. Implementations must be safe for
// concurrent use.
type Manager interface {
	// CreateKey generates a key in the device and returns its public half.
	// It fails with ErrAlreadyExists rather than replace an existing key.
	CreateKey(ctx context.Context, req CreateKeyRequest) (crypto.PublicKey, error)
	// PublicKey returns the public half of an existing key.
	PublicKey(ctx context.Context, uri string) (crypto.PublicKey, error)
	// Signer returns a crypto.Signer whose Sign runs inside the device.
	Signer(ctx context.Context, uri string) (crypto.Signer, error)
	// Close releases sessions and device handles.
	Close() error
}

// Errors every backend reports, wrapped with details about which input was
// wrong. Test with errors.Is.
var (
	ErrInvalidURI           = errors.New("keystore: invalid key URI")
	ErrNotFound             = errors.New("keystore: key not found")
	ErrAlreadyExists        = errors.New("keystore: key already exists")
	ErrTokenNotFound        = errors.New("keystore: token not found")
	ErrWrongPIN             = errors.New("keystore: wrong PIN")
	ErrPINLocked            = errors.New("keystore: PIN locked")
	ErrPINSource            = errors.New("keystore: cannot read PIN source")
	ErrUnsupportedAlgorithm = errors.New("keystore: unsupported algorithm")
	ErrUnavailable          = errors.New("keystore: device unavailable")
	// ErrWrongDevice: a wrapped key blob that this device did not create
	// (for example a TPM key file copied from another host).
	ErrWrongDevice = errors.New("keystore: key belongs to another device")
	// ErrPolicy: the device refused to use the key because its policy (for
	// example a PCR policy) is not satisfied.
	ErrPolicy = errors.New("keystore: key policy not satisfied")
)
