package state

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
)

// CmdAuditCheckpoint commits a node's signature over the audit chain head.
const CmdAuditCheckpoint = "audit.checkpoint"

// AuditCheckpoint is the leader's signature, made with its HSM-held issuing
// key, over the chain head (Seq, Hash). Cert is that node's issuing CA
// certificate (DER), so a checkpoint can be verified against the root long
// after the node's certificate changed.
type AuditCheckpoint struct {
	Seq       uint64 `json:"seq"`
	Hash      string `json:"hash"`
	Node      string `json:"node"`
	Cert      []byte `json:"cert"`
	Signature []byte `json:"signature"`
}

// checkpointContext separates checkpoint digests from anything else the
// issuing key signs (certificates and CRLs hash a DER structure, never
// this prefix).
const checkpointContext = "sigil audit checkpoint v1\x00"

// CheckpointDigest is the SHA-256 that a checkpoint signature covers: the
// trust domain, the sequence number and the record hash of the head.
func CheckpointDigest(trustDomain string, seq uint64, hash string) []byte {
	h := sha256.New()
	h.Write([]byte(checkpointContext))
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(trustDomain)))
	h.Write(n[:])
	h.Write([]byte(trustDomain))
	binary.BigEndian.PutUint64(n[:], seq)
	h.Write(n[:])
	raw, err := hex.DecodeString(hash)
	if err != nil || len(raw) != sha256.Size {
		// A malformed hash still gets a digest (that no honest checkpoint
		// signed); callers check the format separately.
		raw = []byte(fmt.Sprintf("malformed:%s", hash))
	}
	h.Write(raw)
	return h.Sum(nil)
}
