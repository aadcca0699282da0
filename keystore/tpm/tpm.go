// Package tpm is the TPM 2.0 backend of keystore. It owns the agent's
// TPM-resident signing keys: ECDSA P-256 (or P-384) keys created inside the
// TPM under the owner hierarchy's storage root key, kept on disk only as
// TPM-wrapped blobs that no other TPM can load, optionally bound to PCR
// values, and used through crypto.Signer. A private key exists outside
// the TPM only encrypted under that TPM's SRK.
//
// Keys are addressed as tpmkey:file=/abs/path[;pcrs=0,7,16] (see KeyURI).
// Blobs are "TSS2 PRIVATE KEY" PEM files (draft-bottomley-tpm2-keys,
// loadable key, parent 0x40000001 = the standard ECC SRK), the format
// tpm2-tools' tpm2_encodeobject writes (the tests load its output) and the
// OpenSSL TPM2 provider reads, with a PCR binding recorded as a PolicyPCR
// policy entry; see blob.go.
//
// Devices: /dev/tpmrm0 (the kernel resource manager) on hosts, or an swtpm
// command socket in tests and demos. A TPM without a resource manager
// (swtpm) has three transient object slots shared by every client, so this
// package flushes what a crashed client left behind when it opens a socket,
// keeps at most Config.MaxLoadedKeys keys loaded besides the SRK, and
// flushes everything it loaded on Close. Commands are serialized, and the
// TPM's "not now" answers (TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING)
// are resent a bounded number of times.
package tpm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	"github.com/sigil-appliance/sigil/keystore"
)

// Config names the TPM.
type Config struct {
	// Path is a TPM character device (/dev/tpmrm0) or an swtpm command
	// socket.
	Path string
	// MaxLoadedKeys bounds how many keys stay loaded besides the SRK
	// (default 2, because swtpm and some TPMs have only three transient
	// slots). Keys beyond it are flushed least recently used first and
	// reloaded from their blob when next used.
	MaxLoadedKeys int
	// EK chooses the endorsement key used for attestation: "rsa",
	// "ecc-p384" or "ecc-p256"; empty picks the first one with a
	// certificate in NV (RSA, then P-384, then P-256), else RSA.
	EK string
}

// Socket timeouts: swtpm answers in milliseconds, so these only keep a
// dead or wedged emulator from hanging callers.
const (
	socketDialTimeout = 5 * time.Second
	socketCmdTimeout  = 60 * time.Second
)

// TPM is an open TPM. It implements keystore.Manager and is safe for
// concurrent use.
type TPM struct {
	path string
	tpm  *retrying

	// mu serializes whole operations (a policy session, PolicyPCR and the
	// signature must run as one unit, and slot accounting must match the
	// TPM) and guards everything below.
	mu      sync.Mutex
	maxKeys int
	// reserved slots are held by attestation keys (see NewAK).
	reserved int
	ekKind   string
	// signatures counts TPM signing operations (Sign, Certify, Quote).
	signatures atomic.Int64
	srk        tpm2.NamedHandle
	loaded     map[[32]byte]*loadedKey // by keyBlob.id
	useTick    uint64
	closed     bool
}

var _ keystore.Manager = (*TPM)(nil)

// Open connects to the TPM and creates the storage root key. On an swtpm
// socket it first flushes transient objects a crashed earlier client may
// have left loaded. Errors wrap keystore.ErrUnavailable.
func Open(ctx context.Context, cfg Config) (*TPM, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if cfg.Path == "" {
		return nil, fmt.Errorf("%w: no TPM path configured", keystore.ErrUnavailable)
	}
	if cfg.MaxLoadedKeys <= 0 {
		cfg.MaxLoadedKeys = 2
	}
	st, err := os.Stat(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM %s: %v", keystore.ErrUnavailable, cfg.Path, err)
	}
	var dev transport.TPMCloser
	isSocket := st.Mode()&os.ModeSocket != 0
	switch {
	case isSocket:
		dev = &udsTransport{path: cfg.Path, dialTimeout: socketDialTimeout, cmdTimeout: socketCmdTimeout}
	case st.Mode()&os.ModeCharDevice != 0:
		if dev, err = linuxtpm.Open(cfg.Path); err != nil {
			return nil, fmt.Errorf("%w: open TPM %s: %v", keystore.ErrUnavailable, cfg.Path, err)
		}
	default:
		return nil, fmt.Errorf("%w: %s is neither a TPM character device nor a socket (mode %v)", keystore.ErrUnavailable, cfg.Path, st.Mode())
	}
	switch cfg.EK {
	case "", "rsa", "ecc-p384", "ecc-p256":
	default:
		_ = dev.Close() // never used: the configuration error is what matters
		return nil, fmt.Errorf("%w: EK %q: want rsa, ecc-p384 or ecc-p256", keystore.ErrInvalidURI, cfg.EK)
	}
	t := &TPM{path: cfg.Path, tpm: &retrying{inner: dev}, maxKeys: cfg.MaxLoadedKeys, loaded: map[[32]byte]*loadedKey{}, ekKind: cfg.EK}
	fail := func(format string, a ...any) (*TPM, error) {
		_ = t.tpm.Close() // the TPM is given up: the reason is returned
		return nil, fmt.Errorf("%w: TPM %s: %s", keystore.ErrUnavailable, cfg.Path, fmt.Sprintf(format, a...))
	}
	// Only a raw socket: behind /dev/tpmrm0 the kernel gives us our own
	// empty handle space, and on a raw /dev/tpm0 the objects belong to
	// whoever else is using it.
	if isSocket {
		if err := t.flushTransient(); err != nil {
			return fail("does not answer: %v", err)
		}
	}
	if err := ctx.Err(); err != nil {
		_ = t.tpm.Close() // given up: the caller's cancellation is the reason
		return nil, err
	}
	// ECCSRKTemplate has a fixed unique field, so the TPM derives the same
	// SRK from its owner seed every time: blobs made before a reboot load
	// after it.
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(t.tpm)
	if err != nil {
		return fail("create storage root key (the owner hierarchy must have an empty password): %v", err)
	}
	t.srk = tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}
	return t, nil
}

// flushTransient flushes every loaded transient object.
func (t *TPM) flushTransient() error {
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapHandles,
		Property:      uint32(tpm2.TPMHTTransient) << 24,
		PropertyCount: 64,
	}.Execute(t.tpm)
	if err != nil {
		return err
	}
	hs, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		return err
	}
	for _, h := range hs.Handle {
		if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(t.tpm); err != nil {
			return fmt.Errorf("flush leftover object 0x%x: %w", uint32(h), err)
		}
	}
	return nil
}

// Close flushes the loaded keys and the SRK. Later calls return
// keystore.ErrUnavailable.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	// Best effort: a TPM that no longer answers has lost them anyway.
	for id, k := range t.loaded {
		_, _ = tpm2.FlushContext{FlushHandle: k.handle.Handle}.Execute(t.tpm)
		delete(t.loaded, id)
	}
	_, _ = tpm2.FlushContext{FlushHandle: t.srk.Handle}.Execute(t.tpm)
	return t.tpm.Close()
}

// opError classifies an error from a TPM command. Errors the TPM did not
// answer with (the socket or device failed), and a TPM that no longer
// knows our handles (it restarted under us, so the SRK and loaded keys are
// gone), wrap keystore.ErrUnavailable: the caller's remedy is to open the
// TPM again, not to change its input.
func (t *TPM) opError(op string, err error) error {
	var rc tpm2.TPMRC
	switch {
	case !errors.As(err, &rc):
		return fmt.Errorf("%w: TPM %s: %s: %v", keystore.ErrUnavailable, t.path, op, err)
	case errors.Is(err, tpm2.TPMRCReferenceH0):
		return fmt.Errorf("%w: TPM %s no longer holds the objects this process loaded (was it restarted?); close and open it again: %s: %v",
			keystore.ErrUnavailable, t.path, op, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// Stats counts what this TPM handle has done, for benchmarks and metrics.
type Stats struct {
	Commands   int64 // TPM commands sent
	Signatures int64 // signing operations: TPM2_Sign, TPM2_Certify, TPM2_Quote
}

// Stats returns the counts so far.
func (t *TPM) Stats() Stats {
	return Stats{Commands: t.tpm.commands.Load(), Signatures: t.signatures.Load()}
}

// capacity is how many cached keys may be loaded now. Called with mu held.
func (t *TPM) capacity() int { return t.maxKeys - t.reserved }

// checkOpen is called with mu held.
func (t *TPM) checkOpen() error {
	if t.closed {
		return fmt.Errorf("%w: TPM %s is closed", keystore.ErrUnavailable, t.path)
	}
	return nil
}
