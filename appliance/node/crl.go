package node

import (
	"math/big"
	"sync"
	"time"
)

// crlCache holds this node's last CRL; it is signed again only when the
// bundle sequence (which every revocation bumps) changes, or it ages.
type crlCache struct {
	mu      sync.Mutex
	seq     uint64
	der     []byte
	expires time.Time
}

// crl returns a CRL of the revoked serials this node issued, signed by its
// issuing CA in the HSM.
func (n *Node) crl() ([]byte, error) {
	b := n.fsm.Bundle()
	n.crls.mu.Lock()
	defer n.crls.mu.Unlock()
	if n.crls.der != nil && n.crls.seq == b.Sequence && time.Now().Before(n.crls.expires) {
		return n.crls.der, nil
	}
	var serials []*big.Int
	for _, r := range b.Revoked {
		if r.Node != n.cfg.NodeID {
			continue
		}
		s, ok := new(big.Int).SetString(r.Serial, 16)
		if ok {
			serials = append(serials, s)
		}
	}
	der, err := n.auth.CRL(b.Sequence, serials, 24*time.Hour)
	if err != nil {
		return nil, err
	}
	n.crls.seq, n.crls.der, n.crls.expires = b.Sequence, der, time.Now().Add(time.Hour)
	return der, nil
}
