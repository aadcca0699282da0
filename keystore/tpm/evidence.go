package tpm

import (
	"context"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/sigil-appliance/sigil/keystore"
)

// The TCG EK Credential Profile's places for EKs: the persistent keys
// platforms (and swtpm_setup) provision and the NV indexes holding their
// certificates. Without a persistent key, the RSA and P-256 EKs can be
// recreated from their (low-range) templates; the P-384 one must be
// persistent.
type ekSpec struct {
	kind       string
	persistent tpm2.TPMHandle
	certIndex  tpm2.TPMHandle
	template   *tpm2.TPMTPublic
}

var ekSpecs = []ekSpec{
	{"rsa", 0x81010001, 0x01c00002, &tpm2.RSAEKTemplate},
	{"ecc-p384", 0x81010016, 0x01c00016, nil},
	{"ecc-p256", 0x81010002, 0x01c0000a, &tpm2.ECCEKTemplate},
}

const maxNVChunk = 512

// EK is the TPM's endorsement key as evidence: its public area and, when
// the manufacturer provisioned one, its certificate.
type EK struct {
	Public []byte // TPM2B_PUBLIC
	Cert   []byte // DER; nil without a certificate
	Kind   string // rsa, ecc-p384 or ecc-p256
}

// EndorsementKey reads the chosen EK (see Config.EK) and its certificate.
func (t *TPM) EndorsementKey(ctx context.Context) (*EK, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	spec, _, flush, rp, err := t.openEKLocked()
	if err != nil {
		return nil, err
	}
	defer flush()
	ek := &EK{Public: tpm2.Marshal(rp.OutPublic), Kind: spec.kind}
	ek.Cert, err = t.nvReadLocked(spec.certIndex)
	if err != nil && !errors.Is(err, errNoIndex) {
		return nil, err
	}
	return ek, nil
}

// openEKLocked makes the chosen EK usable and reads its public area; the
// caller runs flush when done. Called with mu held.
func (t *TPM) openEKLocked() (ekSpec, tpm2.NamedHandle, func(), *tpm2.ReadPublicResponse, error) {
	if err := t.checkOpen(); err != nil {
		return ekSpec{}, tpm2.NamedHandle{}, nil, nil, err
	}
	spec, err := t.ekSpecLocked()
	if err != nil {
		return ekSpec{}, tpm2.NamedHandle{}, nil, nil, err
	}
	h, flush, err := t.ekLocked(spec)
	if err != nil {
		return ekSpec{}, tpm2.NamedHandle{}, nil, nil, err
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: h.Handle}.Execute(t.tpm)
	if err != nil {
		flush()
		return ekSpec{}, tpm2.NamedHandle{}, nil, nil, t.opError("TPM2_ReadPublic EK", err)
	}
	return spec, h, flush, rp, nil
}

// ekSpecLocked picks the configured EK, or the first with a certificate.
func (t *TPM) ekSpecLocked() (ekSpec, error) {
	for _, s := range ekSpecs {
		if s.kind == t.ekKind {
			return s, nil
		}
	}
	for _, s := range ekSpecs {
		if _, err := (tpm2.NVReadPublic{NVIndex: s.certIndex}).Execute(t.tpm); err == nil {
			return s, nil
		}
	}
	return ekSpecs[0], nil
}

var errNoIndex = errors.New("NV index not defined")

// ekLocked returns the EK's handle: the persistent key if provisioned,
// else one created from the TCG template (same seed, same key), flushed by
// the returned function.
func (t *TPM) ekLocked(spec ekSpec) (tpm2.NamedHandle, func(), error) {
	if rp, err := (tpm2.ReadPublic{ObjectHandle: spec.persistent}).Execute(t.tpm); err == nil {
		return tpm2.NamedHandle{Handle: spec.persistent, Name: rp.Name}, func() {}, nil
	}
	if spec.template == nil {
		return tpm2.NamedHandle{}, nil, fmt.Errorf("%w: no persistent %s EK at 0x%x", keystore.ErrNotFound, spec.kind, uint32(spec.persistent))
	}
	t.evictLRU(t.capacity() - 1)
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(*spec.template)}.Execute(t.tpm)
	if err != nil {
		return tpm2.NamedHandle{}, nil, t.opError("create EK", err)
	}
	return tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, func() {
		// A flush fails only when the handle or the TPM is gone: either
		// way there is nothing left to free.
		_, _ = tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(t.tpm)
	}, nil
}

func (t *TPM) nvReadLocked(index tpm2.TPMHandle) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(t.tpm)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCHandle) {
			return nil, errNoIndex
		}
		return nil, t.opError("TPM2_NV_ReadPublic", err)
	}
	contents, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	var out []byte
	for off := uint16(0); off < contents.DataSize; {
		n := min(maxNVChunk, contents.DataSize-off)
		rd, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: index, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: pub.NVName},
			Size:       n, Offset: off,
		}.Execute(t.tpm)
		if err != nil {
			return nil, t.opError("TPM2_NV_Read", err)
		}
		out = append(out, rd.Data.Buffer...)
		off += n
	}
	return trimDER(out), nil
}

// trimDER cuts NV padding after the DER certificate.
func trimDER(b []byte) []byte {
	var v asn1.RawValue
	if _, err := asn1.Unmarshal(b, &v); err != nil {
		return b
	}
	return v.FullBytes
}

// AK is an attestation key: restricted (it signs only TPM-made structures,
// never a digest chosen by the caller), fixedTPM, fixedParent,
// sensitiveDataOrigin. It lives for one attestation and holds a transient
// slot until Close.
type AK struct {
	t      *TPM
	handle tpm2.NamedHandle
	// Public is the AK's TPM2B_PUBLIC, for the verifier.
	Public []byte
}

func akTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			UserWithAuth: true, Restricted: true, SignEncrypt: true, NoDA: true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			CurveID: tpm2.TPMECCNistP256,
			Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// NewAK creates and loads a fresh attestation key under the SRK.
func (t *TPM) NewAK(ctx context.Context) (*AK, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.checkOpen(); err != nil {
		return nil, err
	}
	// The AK's slot is taken from the key cache until Close.
	t.reserved++
	t.evictLRU(t.capacity() - 1)
	tmpl := akTemplate()
	rsp, err := tpm2.CreateLoaded{
		ParentHandle: tpm2.AuthHandle{Handle: t.srk.Handle, Name: t.srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     tpm2.New2BTemplate(&tmpl),
	}.Execute(t.tpm)
	if err != nil {
		t.reserved--
		return nil, t.opError("create AK", err)
	}
	return &AK{t: t, handle: tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, Public: tpm2.Marshal(rsp.OutPublic)}, nil
}

// Close unloads the AK.
func (ak *AK) Close() error {
	t := ak.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if ak.handle.Handle == 0 {
		return nil
	}
	// As in evictLRU: a failed flush means the handle or the TPM is gone.
	_, _ = tpm2.FlushContext{FlushHandle: ak.handle.Handle}.Execute(t.tpm)
	ak.handle.Handle = 0
	t.reserved--
	return nil
}

func (ak *AK) auth() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: ak.handle.Handle, Name: ak.handle.Name, Auth: tpm2.PasswordAuth(nil)}
}

// Certification is TPM2_Certify's evidence: the AK's signature over a
// TPMS_ATTEST naming the certified key, and that key's public area.
type Certification struct {
	Attest    []byte // TPMS_ATTEST as signed
	Signature []byte // TPMT_SIGNATURE
	Public    []byte // the certified key's TPM2B_PUBLIC
}

// Certify has the AK certify the key at keyURI (one of this TPM's blobs),
// binding the verifier's nonce.
func (ak *AK) Certify(ctx context.Context, keyURI string, nonce []byte) (*Certification, error) {
	u, err := ParseKeyURI(keyURI)
	if err != nil {
		return nil, err
	}
	kb, err := readBlob(u.File)
	if err != nil {
		return nil, err
	}
	t := ak.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.checkOpen(); err != nil {
		return nil, err
	}
	if ak.handle.Handle == 0 {
		return nil, errors.New("tpm: AK is closed")
	}
	k, err := t.loadLocked(kb, u.File)
	if err != nil {
		return nil, err
	}
	t.signatures.Add(1)
	rsp, err := tpm2.Certify{
		ObjectHandle:   tpm2.AuthHandle{Handle: k.handle.Handle, Name: k.handle.Name, Auth: tpm2.PasswordAuth(nil)},
		SignHandle:     ak.auth(),
		QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
	}.Execute(t.tpm)
	if err != nil {
		return nil, t.opError("TPM2_Certify", err)
	}
	return &Certification{Attest: rsp.CertifyInfo.Bytes(), Signature: tpm2.Marshal(rsp.Signature), Public: tpm2.Marshal(kb.pub)}, nil
}

// ActivateCredential recovers a secret the verifier encrypted to this
// TPM's EK for this AK's name: only the TPM holding both can.
func (ak *AK) ActivateCredential(ctx context.Context, idObject, encSecret []byte) ([]byte, error) {
	t := ak.t
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ek, flush, rp, err := t.openEKLocked()
	if err != nil {
		return nil, err
	}
	defer flush()
	pub, err := rp.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	// Low-range EK templates (RSA, P-256) allow use only through
	// PolicySecret(TPM_RH_ENDORSEMENT); the high-range P-384 template sets
	// userWithAuth, so its empty password works.
	var sess tpm2.Session = tpm2.PasswordAuth(nil)
	if !pub.ObjectAttributes.UserWithAuth {
		sess = tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tp transport.TPM, h tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
			_, err := tpm2.PolicySecret{
				AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
				PolicySession: h, NonceTPM: nonceTPM,
			}.Execute(tp)
			return err
		})
	}
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: ak.auth(),
		KeyHandle:      tpm2.AuthHandle{Handle: ek.Handle, Name: ek.Name, Auth: sess},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: idObject},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: encSecret},
	}.Execute(t.tpm)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM2_ActivateCredential: %v", keystore.ErrWrongDevice, err)
	}
	return rsp.CertInfo.Buffer, nil
}

// Quote has the AK sign the current values of the selected sha256 PCRs
// with the verifier's nonce.
func (ak *AK) Quote(ctx context.Context, nonce []byte, pcrs []uint) (attest, sig []byte, err error) {
	t := ak.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.checkOpen(); err != nil {
		return nil, nil, err
	}
	t.signatures.Add(1)
	rsp, err := tpm2.Quote{
		SignHandle:     ak.auth(),
		QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect:      pcrSelection(pcrs),
	}.Execute(t.tpm)
	if err != nil {
		return nil, nil, t.opError("TPM2_Quote", err)
	}
	return rsp.Quoted.Bytes(), tpm2.Marshal(rsp.Signature), nil
}
