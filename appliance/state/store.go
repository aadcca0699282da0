package state

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Buckets. Primary buckets are in snapshots; index buckets are derived and
// rebuilt on restore, so a snapshot cannot carry an index that lies.
var (
	bMeta    = []byte("meta")
	bEntries = []byte("entries")
	bAgents  = []byte("agents")
	bTokens  = []byte("tokens")
	bJWTKeys = []byte("jwt_keys")
	bRevoked = []byte("revocations")
	bSVIDs   = []byte("svids")
	bAudit   = []byte("audit")

	bEntriesByParent = []byte("idx_entries_by_parent")
	bEntriesBySPIFFE = []byte("idx_entries_by_spiffe_id")
	bEntriesByReg    = []byte("idx_entries_by_registration")
	bSVIDsByExpiry   = []byte("idx_svids_by_expiry")
	bTokensByExpiry  = []byte("idx_tokens_by_expiry")
	// Job identity's buckets are in jobs.go, federation's in federation.go.
)

// Meta keys.
var (
	keyIndex          = []byte("index")
	keyPolicy         = []byte("policy")
	keyRoots          = []byte("roots")
	keyBundleSequence = []byte("bundle_sequence")
	keyAuditHead      = []byte("audit_head")
	keyCheckpoint     = []byte("last_checkpoint")
	keyVersionFloor   = []byte("command_version_floor")
)

var allBuckets = [][]byte{bMeta, bEntries, bAgents, bTokens, bJWTKeys, bRevoked, bSVIDs, bAudit,
	bEntriesByParent, bEntriesBySPIFFE, bEntriesByReg, bSVIDsByExpiry, bTokensByExpiry,
	bJoinRules, bJobTokens, bJobTokensByExpiry, bJobAgentsByExpiry, bFederations}

func createBuckets(tx *bolt.Tx) error {
	for _, b := range allBuckets {
		if _, err := tx.CreateBucketIfNotExists(b); err != nil {
			return err
		}
	}
	// The audit log only grows at its end: full pages.
	tx.Bucket(bAudit).FillPercent = 1.0
	return nil
}

func u64Key(v uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	return b[:]
}

func putU64(b *bolt.Bucket, k []byte, v uint64) error { return b.Put(k, u64Key(v)) }

func getU64(b *bolt.Bucket, k []byte) uint64 {
	v := b.Get(k)
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

func putJSON(b *bolt.Bucket, k []byte, v any) error {
	enc, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(k, enc)
}

// getJSON decodes a stored value strictly; found is false when absent.
func getJSON(b *bolt.Bucket, k []byte, v any) (found bool, err error) {
	raw := b.Get(k)
	if raw == nil {
		return false, nil
	}
	return true, decodeStrict(raw, v)
}

func decodeStrict(raw []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data after value")
	}
	return nil
}

// indexKey joins an index value and an ID; NUL cannot occur in either.
func indexKey(value, id string) []byte {
	k := make([]byte, 0, len(value)+1+len(id))
	k = append(k, value...)
	k = append(k, 0)
	return append(k, id...)
}

// idsWithPrefix lists the IDs under one index value.
func idsWithPrefix(b *bolt.Bucket, value string) []string {
	prefix := indexKey(value, "")
	var ids []string
	c := b.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		ids = append(ids, string(k[len(prefix):]))
	}
	return ids
}

// loadCaches reads the bundle, policy, audit head and checkpoint into
// memory.
func (f *FSM) loadCaches() error {
	var b Bundle
	var p JoinPolicy
	err := f.view(func(tx *bolt.Tx) error {
		var err error
		if b, err = readBundle(tx, f.td.Name()); err != nil {
			return err
		}
		if _, err := getJSON(tx.Bucket(bMeta), keyPolicy, &p); err != nil {
			return fmt.Errorf("policy: %w", err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// Revocations are in force before the bundle shows them (crl.go).
	if err := f.loadRootCRLs(); err != nil {
		return err
	}
	f.bundle.Store(&b)
	f.policy.Store(&p)
	f.loadHead()
	return nil
}

func (f *FSM) loadHead() {
	var h AuditHead
	var cp uint64
	err := f.view(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bMeta)
		cp = getU64(meta, keyCheckpoint)
		_, err := getJSON(meta, keyAuditHead, &h)
		return err
	})
	if err != nil {
		f.log.Error("audit head", "err", err)
		return
	}
	f.head.Store(&h)
	f.checkpoint.Store(cp)
}

func readBundle(tx *bolt.Tx, td string) (Bundle, error) {
	meta := tx.Bucket(bMeta)
	b := Bundle{TrustDomain: td, Sequence: getU64(meta, keyBundleSequence)}
	if _, err := getJSON(meta, keyRoots, &b.Roots); err != nil {
		return b, fmt.Errorf("roots: %w", err)
	}
	err := tx.Bucket(bJWTKeys).ForEach(func(k, v []byte) error {
		var j JWTKey
		if err := decodeStrict(v, &j); err != nil {
			return fmt.Errorf("jwt key %q: %w", k, err)
		}
		b.JWTKeys = append(b.JWTKeys, j)
		return nil
	})
	if err != nil {
		return b, err
	}
	err = tx.Bucket(bRevoked).ForEach(func(k, v []byte) error {
		var r Revocation
		if err := decodeStrict(v, &r); err != nil {
			return fmt.Errorf("revocation %q: %w", k, err)
		}
		b.Revoked = append(b.Revoked, r)
		return nil
	})
	if err == nil {
		b.RootCRLs, err = readRootCRLDER(tx)
	}
	return b, err
}
