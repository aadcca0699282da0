package tpm

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// Blobs use the "TSS2 PRIVATE KEY" PEM format (draft-bottomley-tpm2-keys),
// which tpm2-tools (tpm2_encodeobject), the OpenSSL TPM2 provider and the
// kernel's trusted keys also read and write:
//
//	TPMKey ::= SEQUENCE {
//	  type        OBJECT IDENTIFIER,         -- 2.23.133.10.1.3, loadable key
//	  emptyAuth   [0] EXPLICIT BOOLEAN OPTIONAL,
//	  policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
//	  secret      [2] EXPLICIT OCTET STRING OPTIONAL,   -- importable keys
//	  authPolicy  [3] EXPLICIT SEQUENCE OF ... OPTIONAL,
//	  description [4] EXPLICIT UTF8String OPTIONAL,
//	  rsaParent   [5] EXPLICIT BOOLEAN OPTIONAL,
//	  parent      INTEGER,                   -- 0x40000001: the owner SRK
//	  pubkey      OCTET STRING,              -- TPM2B_PUBLIC
//	  privkey     OCTET STRING }             -- TPM2B_PRIVATE
//	TPMPolicy ::= SEQUENCE {
//	  commandCode   [0] EXPLICIT INTEGER,
//	  commandPolicy [1] EXPLICIT OCTET STRING }
//
// For TPM2_PolicyPCR the command policy is the command's parameters:
// TPM2B_DIGEST (the PCR composite digest) || TPML_PCR_SELECTION.
//
// The format has no version field: the type OID is the version. The parser
// accepts only what this package can use (see decodeBlob) and says which
// part it refused, rather than load something it would misuse.
const pemType = "TSS2 PRIVATE KEY"

var oidLoadableKey = asn1.ObjectIdentifier{2, 23, 133, 10, 1, 3}

// ownerParent is TPM_RH_OWNER: in this format it means "the standard
// storage root key of the owner hierarchy", which Open recreates.
const ownerParent = 0x40000001

// maxBlobSize bounds how much of a key file we read: real blobs are under
// 2 KiB, so anything much larger is not a key.
const maxBlobSize = 64 << 10

// tssKey is what encodeBlob writes (DER).
type tssKey struct {
	Type        asn1.ObjectIdentifier
	EmptyAuth   bool          `asn1:"explicit,tag:0,optional"`
	Policy      []tssPolicy   `asn1:"explicit,tag:1,optional"`
	Secret      asn1.RawValue `asn1:"explicit,tag:2,optional"`
	AuthPolicy  asn1.RawValue `asn1:"explicit,tag:3,optional"`
	Description string        `asn1:"explicit,tag:4,optional,utf8"`
	RSAParent   bool          `asn1:"explicit,tag:5,optional"`
	Parent      int64
	Pubkey      []byte
	Privkey     []byte
}

// tssKeyIn is what decodeBlob reads. It differs from tssKey only in taking
// emptyAuth raw: tpm2-tools writes TRUE as 0x01, which BER allows and the
// other TPM key tools accept, but encoding/asn1 (DER only) rejects.
type tssKeyIn struct {
	Type        asn1.ObjectIdentifier
	EmptyAuth   asn1.RawValue `asn1:"explicit,tag:0,optional"`
	Policy      []tssPolicy   `asn1:"explicit,tag:1,optional"`
	Secret      asn1.RawValue `asn1:"explicit,tag:2,optional"`
	AuthPolicy  asn1.RawValue `asn1:"explicit,tag:3,optional"`
	Description string        `asn1:"explicit,tag:4,optional,utf8"`
	RSAParent   bool          `asn1:"explicit,tag:5,optional"`
	Parent      int64
	Pubkey      []byte
	Privkey     []byte
}

type tssPolicy struct {
	CommandCode   int64  `asn1:"explicit,tag:0"`
	CommandPolicy []byte `asn1:"explicit,tag:1"`
}

// errBlob marks a key file this package cannot use.
var errBlob = errors.New("not a usable TSS2 TPM key")

// keyBlob is a parsed key file.
type keyBlob struct {
	pub       tpm2.TPM2BPublic
	priv      tpm2.TPM2BPrivate
	pcrs      []uint // PolicyPCR selection (sha256 bank); nil: no policy
	pcrDigest []byte // PCR composite digest recorded at creation
	ecPub     *ecdsa.PublicKey
	// id identifies the key by content: the loaded-key cache is keyed by
	// it, so a file replaced on disk is a different key, never a stale
	// handle signing under someone else's public key.
	id [sha256.Size]byte
}

func encodeBlob(pub tpm2.TPM2BPublic, priv tpm2.TPM2BPrivate, pcrs []uint, pcrDigest []byte) ([]byte, error) {
	k := tssKey{Type: oidLoadableKey, EmptyAuth: true, Parent: ownerParent,
		Pubkey: tpm2.Marshal(pub), Privkey: tpm2.Marshal(priv)}
	if len(pcrs) > 0 {
		cp := append(tpm2.Marshal(tpm2.TPM2BDigest{Buffer: pcrDigest}), tpm2.Marshal(pcrSelection(pcrs))...)
		k.Policy = []tssPolicy{{CommandCode: int64(tpm2.TPMCCPolicyPCR), CommandPolicy: cp}}
	}
	der, err := asn1.Marshal(k)
	if err != nil {
		return nil, fmt.Errorf("encode TSS2 key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: der}), nil
}

// decodeBlob accepts a loadable ECDSA signing key under the owner SRK with
// an empty auth value and either no policy or a single PolicyPCR on the
// sha256 bank whose digest matches the key's authPolicy. Errors wrap
// errBlob and name the part that was refused.
func decodeBlob(b []byte) (*keyBlob, error) {
	bad := func(format string, a ...any) (*keyBlob, error) {
		return nil, fmt.Errorf("%w: %s", errBlob, fmt.Sprintf(format, a...))
	}
	blk, rest := pem.Decode(b)
	if blk == nil {
		return bad("no PEM block")
	}
	if blk.Type != pemType {
		return bad("PEM type %q, want %q", blk.Type, pemType)
	}
	if len(blk.Headers) != 0 || len(bytes.TrimSpace(rest)) != 0 {
		return bad("PEM headers or data after the key")
	}
	var k tssKeyIn
	if tail, err := asn1.Unmarshal(blk.Bytes, &k); err != nil {
		return bad("malformed TPMKey structure: %v", err)
	} else if len(tail) != 0 {
		return bad("%d bytes after the TPMKey structure", len(tail))
	}
	emptyAuth, err := berBool(k.EmptyAuth)
	if err != nil {
		return bad("emptyAuth: %v", err)
	}
	switch {
	case !k.Type.Equal(oidLoadableKey):
		return bad("key type %v, want %v (loadable key)", k.Type, oidLoadableKey)
	case k.Parent != ownerParent:
		return bad("parent 0x%x, want 0x%x (the owner hierarchy's SRK)", k.Parent, ownerParent)
	case !emptyAuth:
		// Trying the empty password anyway could count toward the TPM's
		// dictionary-attack lockout for a key without noDA.
		return bad("emptyAuth is false: the key has a password, which this backend cannot supply")
	case len(k.Secret.FullBytes) != 0:
		return bad("importable key (secret field); only loadable keys are supported")
	case len(k.AuthPolicy.FullBytes) != 0:
		return bad("signed authPolicy is not supported")
	case k.RSAParent:
		return bad("key's parent is an RSA SRK; this backend uses the ECC SRK")
	case len(k.Policy) > 1:
		return bad("%d policy commands; only a single PolicyPCR is supported", len(k.Policy))
	}
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](k.Pubkey)
	if err != nil || len(tpm2.Marshal(*pub)) != len(k.Pubkey) {
		return bad("pubkey is not a TPM2B_PUBLIC (%v)", err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](k.Privkey)
	if err != nil || len(tpm2.Marshal(*priv)) != len(k.Privkey) {
		return bad("privkey is not a TPM2B_PRIVATE (%v)", err)
	}
	kb := &keyBlob{pub: *pub, priv: *priv, id: sha256.Sum256(b)}
	for _, p := range k.Policy {
		if p.CommandCode != int64(tpm2.TPMCCPolicyPCR) {
			return bad("policy command 0x%x; only PolicyPCR (0x%x) is supported", p.CommandCode, int(tpm2.TPMCCPolicyPCR))
		}
		if kb.pcrs, kb.pcrDigest, err = parsePolicyPCR(p.CommandPolicy); err != nil {
			return bad("PolicyPCR: %v", err)
		}
	}
	pt, err := pub.Contents()
	if err != nil {
		return bad("public area: %v", err)
	}
	if kb.ecPub, err = checkSigningKey(pt); err != nil {
		return bad("%v", err)
	}
	// The recorded policy must be the one the TPM will enforce, or the
	// file lies about what the key is bound to.
	want := []byte(nil)
	if kb.pcrs != nil {
		want = policyPCRDigest(kb.pcrs, kb.pcrDigest)
	}
	if !bytes.Equal(pt.AuthPolicy.Buffer, want) {
		return bad("key's authPolicy %x does not match its recorded policy %x", pt.AuthPolicy.Buffer, want)
	}
	if pt.ObjectAttributes.UserWithAuth != (kb.pcrs == nil) {
		return bad("userWithAuth=%v contradicts the recorded policy", pt.ObjectAttributes.UserWithAuth)
	}
	return kb, nil
}

// berBool reads an optional [n] EXPLICIT BOOLEAN in BER; absent means
// false (for emptyAuth the draft says: then the key needs a password).
// encoding/asn1 hands a RawValue field the explicit wrapper itself.
func berBool(wrapped asn1.RawValue) (bool, error) {
	if len(wrapped.FullBytes) == 0 {
		return false, nil
	}
	var rv asn1.RawValue
	if rest, err := asn1.Unmarshal(wrapped.Bytes, &rv); err != nil || len(rest) != 0 ||
		rv.Class != asn1.ClassUniversal || rv.Tag != asn1.TagBoolean || rv.IsCompound || len(rv.Bytes) != 1 {
		return false, errors.New("not a BOOLEAN")
	}
	return rv.Bytes[0] != 0, nil
}

// parsePolicyPCR splits PolicyPCR's parameters: TPM2B_DIGEST ||
// TPML_PCR_SELECTION with one sha256 bank.
func parsePolicyPCR(cp []byte) ([]uint, []byte, error) {
	if len(cp) < 2 {
		return nil, nil, errors.New("truncated")
	}
	dlen := int(binary.BigEndian.Uint16(cp))
	if dlen != sha256.Size || len(cp) < 2+dlen {
		return nil, nil, fmt.Errorf("PCR digest of %d bytes, want %d", dlen, sha256.Size)
	}
	digest := cp[2 : 2+dlen]
	selBytes := cp[2+dlen:]
	sel, err := tpm2.Unmarshal[tpm2.TPMLPCRSelection](selBytes)
	if err != nil || len(tpm2.Marshal(*sel)) != len(selBytes) {
		return nil, nil, fmt.Errorf("PCR selection is not a TPML_PCR_SELECTION (%v)", err)
	}
	if len(sel.PCRSelections) != 1 || sel.PCRSelections[0].Hash != tpm2.TPMAlgSHA256 {
		return nil, nil, errors.New("selection is not exactly the sha256 bank")
	}
	var pcrs []uint
	for i, bits := range sel.PCRSelections[0].PCRSelect {
		for bit := range 8 {
			if bits&(1<<bit) != 0 {
				pcrs = append(pcrs, uint(i*8+bit))
			}
		}
	}
	if len(pcrs) == 0 || pcrs[len(pcrs)-1] > maxPCR {
		return nil, nil, fmt.Errorf("selects PCRs %v, want 1 or more of 0-%d", pcrs, maxPCR)
	}
	return pcrs, append([]byte(nil), digest...), nil
}

// checkSigningKey accepts the public area of a key this package could
// have made: an ECDSA-capable, non-restricted signing key that never
// leaves its TPM.
func checkSigningKey(pt *tpm2.TPMTPublic) (*ecdsa.PublicKey, error) {
	if pt.Type != tpm2.TPMAlgECC {
		return nil, fmt.Errorf("key type 0x%x, want ECC", int(pt.Type))
	}
	if pt.NameAlg != tpm2.TPMAlgSHA256 {
		return nil, fmt.Errorf("name algorithm 0x%x, want SHA-256", int(pt.NameAlg))
	}
	a := pt.ObjectAttributes
	if !a.SignEncrypt || a.Decrypt || a.Restricted || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
		return nil, errors.New("attributes are not those of a TPM-bound, non-restricted signing key " +
			"(want sign, fixedTPM, fixedParent, sensitiveDataOrigin; no decrypt, no restricted)")
	}
	parms, err := pt.Parameters.ECCDetail()
	if err != nil {
		return nil, fmt.Errorf("ECC parameters: %v", err)
	}
	if parms.Scheme.Scheme != tpm2.TPMAlgNull {
		// Sign picks ECDSA and the hash per call; a fixed scheme would
		// refuse every other hash.
		return nil, fmt.Errorf("key has signing scheme 0x%x; want null (chosen at sign time)", int(parms.Scheme.Scheme))
	}
	if _, err := curveOf(parms.CurveID); err != nil {
		return nil, err
	}
	point, err := pt.Unique.ECC()
	if err != nil {
		return nil, fmt.Errorf("ECC point: %v", err)
	}
	pub, err := tpm2.ECDSAPub(parms, point)
	if err != nil {
		return nil, fmt.Errorf("public key: %v", err)
	}
	return pub, nil
}

func pcrSelection(pcrs []uint) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...),
	}}}
}

// policyPCRDigest is the policy digest a fresh SHA-256 session has after
// TPM2_PolicyPCR(pcrs) with these PCR values (TPM 2.0 Part 3, 23.7):
// H(0…0 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest).
func policyPCRDigest(pcrs []uint, pcrDigest []byte) []byte {
	h := sha256.New()
	h.Write(make([]byte, sha256.Size))
	h.Write(binary.BigEndian.AppendUint32(nil, uint32(tpm2.TPMCCPolicyPCR)))
	h.Write(tpm2.Marshal(pcrSelection(pcrs)))
	h.Write(pcrDigest)
	return h.Sum(nil)
}
