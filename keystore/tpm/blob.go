package tpm

import (
	"encoding/asn1"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// The TSS2 PRIVATE KEY format (draft-bottomley-tpm2-keys):
//
//	TPMKey ::= SEQUENCE {
//	  type       OBJECT IDENTIFIER,        -- 2.23.133.10.1.3, loadable key
//	  emptyAuth  [0] EXPLICIT BOOLEAN OPTIONAL,
//	  policy     [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
//	  parent     INTEGER,                  -- 0x40000001: the owner SRK
//	  pubkey     OCTET STRING,             -- TPM2B_PUBLIC
//	  privkey    OCTET STRING }            -- TPM2B_PRIVATE
//	TPMPolicy ::= SEQUENCE {
//	  commandCode   [0] EXPLICIT INTEGER,
//	  commandPolicy [1] EXPLICIT OCTET STRING }
//
// For TPM2_PolicyPCR the command policy is TPM2B_DIGEST(pcr digest) ||
// TPML_PCR_SELECTION.
const pemType = "TSS2 PRIVATE KEY"

var oidLoadableKey = asn1.ObjectIdentifier{2, 23, 133, 10, 1, 3}

const ownerParent = 0x40000001

type tssKey struct {
	Type      asn1.ObjectIdentifier
	EmptyAuth bool        `asn1:"explicit,tag:0,optional"`
	Policy    []tssPolicy `asn1:"explicit,tag:1,optional"`
	Parent    int64
	Pubkey    []byte
	Privkey   []byte
}

type tssPolicy struct {
	CommandCode   int64  `asn1:"explicit,tag:0"`
	CommandPolicy []byte `asn1:"explicit,tag:1"`
}

var errBlob = errors.New("not a Sigil TPM key blob")

func encodeBlob(pub tpm2.TPM2BPublic, priv tpm2.TPM2BPrivate, pcrs []uint, pcrDigest []byte) ([]byte, error) {
	k := tssKey{Type: oidLoadableKey, EmptyAuth: true, Parent: ownerParent,
		Pubkey: tpm2.Marshal(pub), Privkey: tpm2.Marshal(priv)}
	if len(pcrs) > 0 {
		cp := append(tpm2.Marshal(tpm2.TPM2BDigest{Buffer: pcrDigest}), tpm2.Marshal(pcrSelection(pcrs))...)
		k.Policy = []tssPolicy{{CommandCode: int64(tpm2.TPMCCPolicyPCR), CommandPolicy: cp}}
	}
	der, err := asn1.Marshal(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: der}), nil
}

// decodeBlob accepts only what encodeBlob writes: a loadable key under the
// owner SRK whose only policy, if any, is PolicyPCR on the sha256 bank.
func decodeBlob(b []byte) (tpm2.TPM2BPublic, tpm2.TPM2BPrivate, []uint, error) {
	var zpub tpm2.TPM2BPublic
	var zpriv tpm2.TPM2BPrivate
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != pemType {
		return zpub, zpriv, nil, fmt.Errorf("%w: no %s PEM block", errBlob, pemType)
	}
	var k tssKey
	rest, err := asn1.Unmarshal(blk.Bytes, &k)
	if err != nil || len(rest) != 0 {
		return zpub, zpriv, nil, fmt.Errorf("%w: malformed key structure", errBlob)
	}
	if !k.Type.Equal(oidLoadableKey) || k.Parent != ownerParent {
		return zpub, zpriv, nil, fmt.Errorf("%w: type %v under parent 0x%x (want a loadable key under the owner SRK)", errBlob, k.Type, k.Parent)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](k.Pubkey)
	if err != nil {
		return zpub, zpriv, nil, fmt.Errorf("%w: public part: %v", errBlob, err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](k.Privkey)
	if err != nil {
		return zpub, zpriv, nil, fmt.Errorf("%w: private part: %v", errBlob, err)
	}
	var pcrs []uint
	for _, p := range k.Policy {
		if p.CommandCode != int64(tpm2.TPMCCPolicyPCR) || len(p.CommandPolicy) < 2 {
			return zpub, zpriv, nil, fmt.Errorf("%w: unsupported policy command 0x%x", errBlob, p.CommandCode)
		}
		dlen := int(binary.BigEndian.Uint16(p.CommandPolicy))
		if len(p.CommandPolicy) < 2+dlen {
			return zpub, zpriv, nil, fmt.Errorf("%w: truncated PolicyPCR", errBlob)
		}
		sel, err := tpm2.Unmarshal[tpm2.TPMLPCRSelection](p.CommandPolicy[2+dlen:])
		if err != nil || len(sel.PCRSelections) != 1 || sel.PCRSelections[0].Hash != tpm2.TPMAlgSHA256 {
			return zpub, zpriv, nil, fmt.Errorf("%w: PolicyPCR selection", errBlob)
		}
		for byteIdx, bits := range sel.PCRSelections[0].PCRSelect {
			for bit := 0; bit < 8; bit++ {
				if bits&(1<<bit) != 0 {
					pcrs = append(pcrs, uint(byteIdx*8+bit))
				}
			}
		}
	}
	return *pub, *priv, pcrs, nil
}
