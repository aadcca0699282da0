package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/google/go-tpm/tpm2"

	"github.com/sigil-appliance/sigil/keystore"
)

type loadedKey struct {
	handle tpm2.NamedHandle
	used   uint64 // useTick at last use, for LRU eviction
}

func curveFor(alg keystore.Algorithm) (tpm2.TPMECCCurve, error) {
	switch alg {
	case keystore.ECDSAP256:
		return tpm2.TPMECCNistP256, nil
	case keystore.ECDSAP384:
		return tpm2.TPMECCNistP384, nil
	}
	return 0, fmt.Errorf("%w: %q (the TPM backend makes %s and %s keys)",
		keystore.ErrUnsupportedAlgorithm, alg, keystore.ECDSAP256, keystore.ECDSAP384)
}

func curveOf(c tpm2.TPMECCCurve) (keystore.Algorithm, error) {
	switch c {
	case tpm2.TPMECCNistP256:
		return keystore.ECDSAP256, nil
	case tpm2.TPMECCNistP384:
		return keystore.ECDSAP384, nil
	}
	return "", fmt.Errorf("%w: TPM curve 0x%x", keystore.ErrUnsupportedAlgorithm, int(c))
}

// signingTemplate is a key that signs any digest the caller hashed (not
// restricted, so it is no attestation key), cannot leave this TPM or be
// re-parented (fixedTPM, fixedParent) and was generated inside it
// (sensitiveDataOrigin). noDA because it has no password to guess, and a
// host that loses power without TPM2_Shutdown would otherwise count toward
// dictionary-attack lockout and lock the agent out of its own key. With a
// policy, userWithAuth is off so the empty password cannot bypass it.
func signingTemplate(curve tpm2.TPMECCCurve, policy []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        len(policy) == 0,
			SignEncrypt:         true,
			NoDA:                true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			CurveID: curve,
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// CreateKey makes a signing key under the SRK and writes its blob to the
// URI's file (mode 0600, never over an existing file: ErrAlreadyExists).
// With pcrs in the URI, the key is bound to those PCRs' current values.
func (t *TPM) CreateKey(ctx context.Context, req keystore.CreateKeyRequest) (crypto.PublicKey, error) {
	u, err := ParseKeyURI(req.URI)
	if err != nil {
		return nil, err
	}
	curve, err := curveFor(req.Algorithm)
	if err != nil {
		return nil, err
	}
	// Fail before the TPM work; O_EXCL below is what actually guarantees
	// no existing key is replaced.
	if _, err := os.Lstat(u.File); err == nil {
		return nil, fmt.Errorf("%w: %s", keystore.ErrAlreadyExists, u.File)
	}
	blob, kb, err := t.createBlob(ctx, curve, u.PCRs)
	if err != nil {
		return nil, fmt.Errorf("create TPM key %s: %w", u.File, err)
	}
	if err := writeNewFile(u.File, blob); err != nil {
		return nil, err
	}
	return kb.ecPub, nil
}

func (t *TPM) createBlob(ctx context.Context, curve tpm2.TPMECCCurve, pcrs []uint) ([]byte, *keyBlob, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.checkOpen(); err != nil {
		return nil, nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	// TPM2_Create uses a transient slot while it runs.
	t.evictLRU(t.capacity() - 1)
	var policy, pcrDigest []byte
	if len(pcrs) > 0 {
		var err error
		if policy, pcrDigest, err = t.pcrPolicy(pcrs); err != nil {
			return nil, nil, err
		}
	}
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: t.srk.Handle, Name: t.srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     tpm2.New2B(signingTemplate(curve, policy)),
	}.Execute(t.tpm)
	if err != nil {
		return nil, nil, t.opError("TPM2_Create", err)
	}
	blob, err := encodeBlob(rsp.OutPublic, rsp.OutPrivate, pcrs, pcrDigest)
	if err != nil {
		return nil, nil, err
	}
	// Never write a file we would refuse to read back.
	kb, err := decodeBlob(blob)
	if err != nil {
		return nil, nil, fmt.Errorf("new blob does not parse: %w", err)
	}
	return blob, kb, nil
}

// pcrPolicy returns the PolicyPCR digest for the current values of pcrs,
// as the TPM computes it in a trial session, and the PCR composite digest
// the blob records. The two are cross-checked so the file never records
// values other than those the key was bound to (a PCR extended between
// the read and the trial would otherwise go unnoticed).
func (t *TPM) pcrPolicy(pcrs []uint) (policy, pcrDigest []byte, err error) {
	values, err := t.readPCRs(pcrs)
	if err != nil {
		return nil, nil, err
	}
	h := sha256.New()
	for _, v := range values {
		h.Write(v)
	}
	pcrDigest = h.Sum(nil)

	sess, closeSess, err := tpm2.PolicySession(t.tpm, tpm2.TPMAlgSHA256, 16, tpm2.Trial())
	if err != nil {
		return nil, nil, t.opError("start trial session", err)
	}
	// A trial session holds a slot; a flush fails only when the TPM stopped
	// answering, which the next command reports.
	defer func() { _ = closeSess() }()
	if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: pcrSelection(pcrs)}).Execute(t.tpm); err != nil {
		return nil, nil, t.opError(fmt.Sprintf("trial PolicyPCR(%v)", pcrs), err)
	}
	pd, err := tpm2.PolicyGetDigest{PolicySession: sess.Handle()}.Execute(t.tpm)
	if err != nil {
		return nil, nil, t.opError("PolicyGetDigest", err)
	}
	if !bytes.Equal(pd.PolicyDigest.Buffer, policyPCRDigest(pcrs, pcrDigest)) {
		return nil, nil, fmt.Errorf("PCRs %v changed while the key was being bound to them; try again", pcrs)
	}
	return pd.PolicyDigest.Buffer, pcrDigest, nil
}

// readPCRs returns the sha256 values of pcrs in order. TPM2_PCR_Read
// returns at most 8 digests per call and says which ones it returned.
func (t *TPM) readPCRs(pcrs []uint) ([][]byte, error) {
	values := make([][]byte, 0, len(pcrs))
	for len(values) < len(pcrs) {
		want := pcrs[len(values):]
		rsp, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection(want)}.Execute(t.tpm)
		if err != nil {
			return nil, t.opError(fmt.Sprintf("read PCRs %v", want), err)
		}
		got := rsp.PCRValues.Digests
		if len(got) == 0 || len(got) > len(want) {
			return nil, fmt.Errorf("read PCRs %v: TPM returned %d values (is the sha256 bank active?)", want, len(got))
		}
		for _, d := range got {
			values = append(values, d.Buffer)
		}
	}
	return values, nil
}

func writeNewFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%w: %s", keystore.ErrAlreadyExists, path)
		}
		return fmt.Errorf("write TPM key blob: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		// The blob is the only copy of the key: it must survive a crash
		// right after CreateKey returns.
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path) // a partial blob is no key: the write error is the one to report
		return fmt.Errorf("write TPM key blob %s: %w", path, err)
	}
	// And the directory entry, or the synced file may not be found after a
	// crash: a key that may vanish is not handed out.
	if err := syncDir(filepath.Dir(path)); err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("write TPM key blob %s: %w", path, err)
	}
	return nil
}

// syncDir makes a directory's entries durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// readBlob reads and parses a key file. A missing file is ErrNotFound.
func readBlob(path string) (*keyBlob, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: TPM key blob %s does not exist", keystore.ErrNotFound, path)
		}
		return nil, fmt.Errorf("read TPM key blob: %w", err)
	}
	defer func() { _ = f.Close() }() // read-only
	b, err := io.ReadAll(io.LimitReader(f, maxBlobSize+1))
	if err != nil {
		return nil, fmt.Errorf("read TPM key blob %s: %w", path, err)
	}
	if len(b) > maxBlobSize {
		return nil, fmt.Errorf("%s: %w: larger than %d bytes", path, errBlob, maxBlobSize)
	}
	kb, err := decodeBlob(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return kb, nil
}

// PublicKey returns the public key (*ecdsa.PublicKey) of a blob's key,
// after the TPM has accepted the blob: a blob from another TPM fails with
// keystore.ErrWrongDevice rather than hand out a key we cannot use.
func (t *TPM) PublicKey(ctx context.Context, uri string) (crypto.PublicKey, error) {
	kb, _, err := t.open(ctx, uri)
	if err != nil {
		return nil, err
	}
	return kb.ecPub, nil
}

// Signer returns a crypto.Signer whose signatures the TPM makes. It keeps
// the blob it read, so it signs with that key even if the file is later
// replaced or removed.
func (t *TPM) Signer(ctx context.Context, uri string) (crypto.Signer, error) {
	kb, file, err := t.open(ctx, uri)
	if err != nil {
		return nil, err
	}
	return &signer{t: t, file: file, kb: kb}, nil
}

// open reads a URI's blob and loads it.
func (t *TPM) open(ctx context.Context, uri string) (*keyBlob, string, error) {
	u, err := ParseKeyURI(uri)
	if err != nil {
		return nil, "", err
	}
	kb, err := readBlob(u.File)
	if err != nil {
		return nil, "", err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, "", err
	}
	if _, err := t.loadLocked(kb, u.File); err != nil {
		return nil, "", err
	}
	return kb, u.File, nil
}

// loadLocked returns the handle of a loaded key, loading it under the SRK
// (after evicting the least recently used key if the slots are full).
// Called with mu held; file is for messages.
func (t *TPM) loadLocked(kb *keyBlob, file string) (*loadedKey, error) {
	if err := t.checkOpen(); err != nil {
		return nil, err
	}
	t.useTick++
	if k, ok := t.loaded[kb.id]; ok {
		k.used = t.useTick
		return k, nil
	}
	t.evictLRU(t.capacity() - 1)
	rsp, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: t.srk.Handle, Name: t.srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    kb.priv,
		InPublic:     kb.pub,
	}.Execute(t.tpm)
	if err != nil {
		// The private part is encrypted and HMACed with a key derived
		// from the parent's seed, which never leaves the TPM that made
		// it: under any other TPM's SRK the integrity check fails.
		if errors.Is(err, tpm2.TPMRCIntegrity) || errors.Is(err, tpm2.TPMRCBinding) {
			return nil, fmt.Errorf("%w: %s was not made by the TPM at %s (or was altered): %v", keystore.ErrWrongDevice, file, t.path, err)
		}
		return nil, t.opError("TPM2_Load "+file, err)
	}
	k := &loadedKey{handle: tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, used: t.useTick}
	t.loaded[kb.id] = k
	return k, nil
}

// evictLRU flushes least recently used keys until at most keep are
// loaded. Called with mu held.
func (t *TPM) evictLRU(keep int) {
	for len(t.loaded) > max(keep, 0) {
		var lru [32]byte
		var oldest *loadedKey
		for id, k := range t.loaded {
			if oldest == nil || k.used < oldest.used {
				lru, oldest = id, k
			}
		}
		// If the flush fails the handle is gone or the TPM is; either
		// way it is no longer ours to track.
		_, _ = tpm2.FlushContext{FlushHandle: oldest.handle.Handle}.Execute(t.tpm)
		delete(t.loaded, lru)
	}
}
