// Package tpm is the TPM backend of keystore: P-256 signing keys created
// inside a TPM 2.0 under its storage root key, kept on disk only as
// TPM-wrapped blobs that no other TPM can load, optionally bound to PCR
// values, and used through crypto.Signer.
//
// Blobs are stored in the "TSS2 PRIVATE KEY" PEM format of the OpenSSL and
// kernel TPM key tooling (loadable key, parent = the owner hierarchy's
// standard ECC SRK), with PolicyPCR recorded in the policy field.
//
// Devices: /dev/tpmrm0 (the kernel resource manager) on hosts, or an swtpm
// Unix socket in tests. Every command is serialized, and TPM_RC_RETRY,
// TPM_RC_YIELDED and TPM_RC_TESTING answers are retried, as a TPM may give
// them at any time (swtpm does on its first signature).
package tpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/sigil-appliance/sigil/keystore"
)

// Config names the TPM.
type Config struct {
	// Path is a TPM character device (/dev/tpmrm0) or an swtpm command
	// socket.
	Path string
	// MaxLoadedKeys bounds keys kept loaded besides the SRK (default 2:
	// swtpm and some TPMs have only three transient slots).
	MaxLoadedKeys int
}

// TPM is an open TPM and implements keystore.Manager.
type TPM struct {
	cfg Config
	tpm transport.TPMCloser

	// mu serializes whole operations (a policy session, PolicyPCR and the
	// signature are one unit) and guards the loaded-key cache.
	mu      sync.Mutex
	srk     tpm2.NamedHandle
	srkPub  tpm2.TPMTPublic
	loaded  map[string]*loadedKey
	useTick uint64
	closed  bool
}

var _ keystore.Manager = (*TPM)(nil)

type loadedKey struct {
	handle tpm2.NamedHandle
	pub    *ecdsa.PublicKey
	pcrs   []uint
	used   uint64
}

// Open connects to the TPM, flushes transient objects a crashed earlier
// client may have left, and creates the storage root key.
func Open(ctx context.Context, cfg Config) (*TPM, error) {
	if cfg.MaxLoadedKeys <= 0 {
		cfg.MaxLoadedKeys = 2
	}
	st, err := os.Stat(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM %s: %v", keystore.ErrUnavailable, cfg.Path, err)
	}
	var dev transport.TPMCloser
	switch {
	case st.Mode()&os.ModeSocket != 0:
		dev, err = linuxudstpm.Open(cfg.Path)
	case st.Mode()&os.ModeCharDevice != 0:
		dev, err = linuxtpm.Open(cfg.Path)
	default:
		return nil, fmt.Errorf("%w: %s is neither a TPM device nor a socket", keystore.ErrUnavailable, cfg.Path)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: open TPM %s: %v", keystore.ErrUnavailable, cfg.Path, err)
	}
	t := &TPM{cfg: cfg, tpm: &retrying{inner: dev}, loaded: map[string]*loadedKey{}}
	if err := t.flushTransient(); err != nil {
		dev.Close()
		return nil, fmt.Errorf("%w: TPM %s does not answer: %v", keystore.ErrUnavailable, cfg.Path, err)
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(t.tpm)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("%w: create storage root key: %v", keystore.ErrUnavailable, err)
	}
	t.srk = tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		t.Close()
		return nil, err
	}
	t.srkPub = *pub
	return t, nil
}

// Transport exposes the serialized, retrying transport for other TPM
// operations of this package's callers (attestation).
func (t *TPM) Transport() transport.TPM { return t.tpm }

// SRK is the loaded storage root key.
func (t *TPM) SRK() tpm2.NamedHandle { return t.srk }

func (t *TPM) flushTransient() error {
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: 0x80000000, PropertyCount: 64}.Execute(t.tpm)
	if err != nil {
		return err
	}
	hs, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		return err
	}
	for _, h := range hs.Handle {
		tpm2.FlushContext{FlushHandle: h}.Execute(t.tpm)
	}
	return nil
}

// Close flushes loaded keys and the SRK and closes the device.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	for _, k := range t.loaded {
		tpm2.FlushContext{FlushHandle: k.handle.Handle}.Execute(t.tpm)
	}
	if t.srk.Handle != 0 {
		tpm2.FlushContext{FlushHandle: t.srk.Handle}.Execute(t.tpm)
	}
	return t.tpm.Close()
}

// KeyURI is the address of a TPM key blob.
type KeyURI struct {
	File string
	PCRs []uint // sha256 bank; only used at creation
}

// ParseKeyURI parses tpmkey:file=/abs/path[;pcrs=0,7].
func ParseKeyURI(raw string) (*KeyURI, error) {
	bad := func(format string, a ...any) (*KeyURI, error) {
		return nil, fmt.Errorf("%w: %s", keystore.ErrInvalidURI, fmt.Sprintf(format, a...))
	}
	rest, ok := strings.CutPrefix(raw, "tpmkey:")
	if !ok {
		return bad("%q does not start with tpmkey:", raw)
	}
	u := &KeyURI{}
	for _, part := range strings.Split(rest, ";") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return bad("attribute %q has no '='", part)
		}
		switch k {
		case "file":
			if !strings.HasPrefix(v, "/") {
				return bad("file %q is not an absolute path", v)
			}
			u.File = v
		case "pcrs":
			for _, p := range strings.Split(v, ",") {
				n, err := strconv.ParseUint(p, 10, 8)
				if err != nil || n > 23 {
					return bad("pcr %q: want 0-23", p)
				}
				u.PCRs = append(u.PCRs, uint(n))
			}
			sort.Slice(u.PCRs, func(i, j int) bool { return u.PCRs[i] < u.PCRs[j] })
		default:
			return bad("unknown attribute %q", k)
		}
	}
	if u.File == "" {
		return bad("no file attribute")
	}
	return u, nil
}

func pcrSelection(pcrs []uint) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...),
	}}}
}

// signingTemplate is a P-256 key that signs anything the caller hashes
// (not restricted), cannot leave this TPM (fixedTPM, fixedParent) and was
// generated inside it (sensitiveDataOrigin).
func signingTemplate(policy []byte) tpm2.TPMTPublic {
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
			CurveID: tpm2.TPMECCNistP256,
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// CreateKey makes a P-256 signing key under the SRK and writes its blob
// (0600, never over an existing file). With pcrs in the URI the key is
// bound to the current values of those PCRs.
func (t *TPM) CreateKey(ctx context.Context, req keystore.CreateKeyRequest) (crypto.PublicKey, error) {
	u, err := ParseKeyURI(req.URI)
	if err != nil {
		return nil, err
	}
	if req.Algorithm != keystore.ECDSAP256 {
		return nil, fmt.Errorf("%w: %q (the TPM backend makes %s keys)", keystore.ErrUnsupportedAlgorithm, req.Algorithm, keystore.ECDSAP256)
	}
	if _, err := os.Lstat(u.File); err == nil {
		return nil, fmt.Errorf("%w: %s exists", keystore.ErrAlreadyExists, u.File)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, fmt.Errorf("%w: TPM closed", keystore.ErrUnavailable)
	}
	// Create needs a free transient slot for the duration of the command.
	t.evictLRU(t.cfg.MaxLoadedKeys - 1)
	var policy, pcrDigest []byte
	if len(u.PCRs) > 0 {
		if policy, pcrDigest, err = t.pcrPolicy(u.PCRs); err != nil {
			return nil, err
		}
	}
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: t.srk.Handle, Name: t.srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     tpm2.New2B(signingTemplate(policy)),
	}.Execute(t.tpm)
	if err != nil {
		return nil, fmt.Errorf("TPM create key: %w", err)
	}
	pub, err := publicKey(rsp.OutPublic)
	if err != nil {
		return nil, err
	}
	blob, err := encodeBlob(rsp.OutPublic, rsp.OutPrivate, u.PCRs, pcrDigest)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(u.File, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("%w: %s exists", keystore.ErrAlreadyExists, u.File)
		}
		return nil, err
	}
	if _, err := f.Write(blob); err != nil {
		f.Close()
		os.Remove(u.File)
		return nil, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(u.File)
		return nil, err
	}
	return pub, f.Close()
}

// pcrPolicy computes PolicyPCR's digest for the current PCR values with a
// trial session, and the PCR composite digest recorded in the blob.
func (t *TPM) pcrPolicy(pcrs []uint) (policy, pcrDigest []byte, err error) {
	sel := pcrSelection(pcrs)
	sess, closeSess, err := tpm2.PolicySession(t.tpm, tpm2.TPMAlgSHA256, 16, tpm2.Trial())
	if err != nil {
		return nil, nil, fmt.Errorf("TPM trial session: %w", err)
	}
	defer closeSess()
	if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: sel}).Execute(t.tpm); err != nil {
		return nil, nil, fmt.Errorf("TPM PolicyPCR: %w", err)
	}
	pd, err := tpm2.PolicyGetDigest{PolicySession: sess.Handle()}.Execute(t.tpm)
	if err != nil {
		return nil, nil, err
	}
	h := sha256.New()
	for _, p := range pcrs {
		rd, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection([]uint{p})}.Execute(t.tpm)
		if err != nil || len(rd.PCRValues.Digests) != 1 {
			return nil, nil, fmt.Errorf("TPM PCR %d read: %v", p, err)
		}
		h.Write(rd.PCRValues.Digests[0].Buffer)
	}
	return pd.PolicyDigest.Buffer, h.Sum(nil), nil
}

// PublicKey returns the public key of a blob's key.
func (t *TPM) PublicKey(ctx context.Context, uri string) (crypto.PublicKey, error) {
	k, err := t.load(uri)
	if err != nil {
		return nil, err
	}
	return k.pub, nil
}

// Signer returns a crypto.Signer whose signatures the TPM makes.
func (t *TPM) Signer(ctx context.Context, uri string) (crypto.Signer, error) {
	k, err := t.load(uri)
	if err != nil {
		return nil, err
	}
	u, _ := ParseKeyURI(uri)
	return &signer{t: t, file: u.File, pub: k.pub}, nil
}

// load returns the loaded key for a blob, loading it under the SRK (and
// evicting the least recently used key) if needed.
func (t *TPM) load(uri string) (*loadedKey, error) {
	u, err := ParseKeyURI(uri)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.loadLocked(u.File)
}

func (t *TPM) loadLocked(file string) (*loadedKey, error) {
	if t.closed {
		return nil, fmt.Errorf("%w: TPM closed", keystore.ErrUnavailable)
	}
	t.useTick++
	if k, ok := t.loaded[file]; ok {
		k.used = t.useTick
		return k, nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", keystore.ErrNotFound, file)
		}
		return nil, err
	}
	pub2b, priv2b, pcrs, err := decodeBlob(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	pub, err := publicKey(pub2b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	t.evictLRU(t.cfg.MaxLoadedKeys - 1)
	rsp, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: t.srk.Handle, Name: t.srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    priv2b,
		InPublic:     pub2b,
	}.Execute(t.tpm)
	if err != nil {
		// Under another TPM's SRK the blob's integrity check fails: the
		// wrapping key is derived from a seed that never left its TPM.
		if errors.Is(err, tpm2.TPMRCIntegrity) || errors.Is(err, tpm2.TPMRCBinding) || errors.Is(err, tpm2.TPMRCSize) || errors.Is(err, tpm2.TPMRCValue) {
			return nil, fmt.Errorf("%w: %s was not made by this TPM (%v)", keystore.ErrWrongDevice, file, err)
		}
		return nil, fmt.Errorf("TPM load %s: %w", file, err)
	}
	k := &loadedKey{handle: tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, pub: pub, pcrs: pcrs, used: t.useTick}
	t.loaded[file] = k
	return k, nil
}

// evictLRU flushes least recently used keys until at most keep are loaded.
func (t *TPM) evictLRU(keep int) {
	for len(t.loaded) > max(keep, 0) {
		var lru string
		for f, k := range t.loaded {
			if lru == "" || k.used < t.loaded[lru].used {
				lru = f
			}
		}
		tpm2.FlushContext{FlushHandle: t.loaded[lru].handle.Handle}.Execute(t.tpm)
		delete(t.loaded, lru)
	}
}

func publicKey(p tpm2.TPM2BPublic) (*ecdsa.PublicKey, error) {
	pub, err := p.Contents()
	if err != nil {
		return nil, err
	}
	if pub.Type != tpm2.TPMAlgECC {
		return nil, fmt.Errorf("%w: TPM key type %v", keystore.ErrUnsupportedAlgorithm, pub.Type)
	}
	parms, err := pub.Parameters.ECCDetail()
	if err != nil {
		return nil, err
	}
	point, err := pub.Unique.ECC()
	if err != nil {
		return nil, err
	}
	return tpm2.ECDSAPub(parms, point)
}

type signer struct {
	t    *TPM
	file string
	pub  *ecdsa.PublicKey
}

func (s *signer) Public() crypto.PublicKey { return s.pub }

// Sign signs a digest in the TPM and returns an ASN.1 ECDSA signature.
func (s *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	var alg tpm2.TPMIAlgHash
	switch opts.HashFunc() {
	case crypto.SHA256:
		alg = tpm2.TPMAlgSHA256
	case crypto.SHA384:
		alg = tpm2.TPMAlgSHA384
	case crypto.SHA512:
		alg = tpm2.TPMAlgSHA512
	default:
		return nil, fmt.Errorf("tpm: unsupported hash %v (SHA-256, SHA-384 or SHA-512)", opts.HashFunc())
	}
	if len(digest) != opts.HashFunc().Size() {
		return nil, fmt.Errorf("tpm: digest is %d bytes, %v needs %d", len(digest), opts.HashFunc(), opts.HashFunc().Size())
	}
	t := s.t
	t.mu.Lock()
	defer t.mu.Unlock()
	k, err := t.loadLocked(s.file)
	if err != nil {
		return nil, err
	}
	var auth tpm2.Session = tpm2.PasswordAuth(nil)
	if len(k.pcrs) > 0 {
		sess, closeSess, err := tpm2.PolicySession(t.tpm, tpm2.TPMAlgSHA256, 16)
		if err != nil {
			return nil, fmt.Errorf("tpm policy session: %w", err)
		}
		defer closeSess()
		if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: pcrSelection(k.pcrs)}).Execute(t.tpm); err != nil {
			return nil, fmt.Errorf("tpm PolicyPCR: %w", err)
		}
		auth = sess
	}
	rsp, err := tpm2.Sign{
		KeyHandle: tpm2.AuthHandle{Handle: k.handle.Handle, Name: k.handle.Name, Auth: auth},
		Digest:    tpm2.TPM2BDigest{Buffer: digest},
		InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA,
			&tpm2.TPMSSchemeHash{HashAlg: alg})},
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck},
	}.Execute(t.tpm)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCPolicyFail) {
			return nil, fmt.Errorf("%w: %s is bound to PCRs %v, whose values changed", keystore.ErrPolicy, s.file, k.pcrs)
		}
		return nil, fmt.Errorf("tpm sign: %w", err)
	}
	sig, err := rsp.Signature.Signature.ECDSA()
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(sig.SignatureR.Buffer), new(big.Int).SetBytes(sig.SignatureS.Buffer),
	})
}

// retrying serializes commands and retries the TPM's "try again" answers.
type retrying struct {
	mu      sync.Mutex
	inner   transport.TPMCloser
	retries int // how many answers were retried, for tests and logs
}

func (r *retrying) Send(cmd []byte) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for attempt := 0; ; attempt++ {
		rsp, err := r.inner.Send(cmd)
		if err != nil || len(rsp) < 10 || attempt >= 50 {
			return rsp, err
		}
		switch tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])) {
		case tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting:
			r.retries++
			time.Sleep(time.Duration(min(attempt+1, 10)) * 5 * time.Millisecond)
			continue
		}
		return rsp, nil
	}
}

func (r *retrying) Close() error { return r.inner.Close() }
