package cache

import (
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// federated parses the foreign bundles of an update (SyncUpdate.Federated:
// trust domain name -> SPIFFE bundle document) for the trust domain own.
// A bundle that cannot be used is dropped, never the update: one bad
// document from a node, or from a foreign bundle endpoint behind it, must
// not keep entries, our bundle and the other foreign bundles from the
// agent. What a dropped bundle replaces stays: prev's bundle of that trust
// domain, if it had one (a trust domain the update no longer names is
// gone). Each bad document is logged once, not on every update.
func (c *Cache) federated(own spiffeid.TrustDomain, docs map[string][]byte, prev map[spiffeid.TrustDomain]*spiffebundle.Bundle) map[spiffeid.TrustDomain]*spiffebundle.Bundle {
	if len(docs) == 0 {
		return nil
	}
	out := make(map[spiffeid.TrustDomain]*spiffebundle.Bundle, len(docs))
	for name, doc := range docs {
		td, b, err := parseFederated(own, name, doc)
		if err == nil {
			out[td] = b
			continue
		}
		if old := prev[td]; !td.IsZero() && old != nil && td != own {
			out[td] = old
		}
		c.logFederatedSkipped(name, doc, err)
	}
	return out
}

// parseFederated checks one foreign bundle: a trust domain name that is
// not ours, a document go-spiffe parses for it, and X.509 authorities
// that, when they name a trust domain (a SPIFFE ID URI SAN, as CAs of
// SPIFFE implementations carry), name that one. A bundle for our own
// trust domain would let whoever fed it mint our identities; one whose
// CAs name another trust domain is some other trust domain's bundle
// filed under this name.
func parseFederated(own spiffeid.TrustDomain, name string, doc []byte) (spiffeid.TrustDomain, *spiffebundle.Bundle, error) {
	td, err := spiffeid.TrustDomainFromString(name)
	if err != nil {
		return spiffeid.TrustDomain{}, nil, fmt.Errorf("trust domain name: %w", err)
	}
	if td == own {
		return td, nil, errors.New("a federated bundle for our own trust domain is refused")
	}
	b, err := spiffebundle.Parse(td, doc)
	if err != nil {
		return td, nil, err
	}
	for _, ca := range b.X509Authorities() {
		for _, u := range ca.URIs {
			id, err := spiffeid.FromURI(u)
			if err != nil {
				continue // not a SPIFFE ID: says nothing about the trust domain
			}
			if id.TrustDomain() != td {
				return td, nil, fmt.Errorf("X.509 authority %q names trust domain %s", ca.Subject, id.TrustDomain())
			}
		}
	}
	return td, b, nil
}

func (c *Cache) logFederatedSkipped(name string, doc []byte, err error) {
	h := sha256.New()
	h.Write([]byte(name))
	h.Write([]byte{0})
	h.Write(doc)
	var key [32]byte
	h.Sum(key[:0])
	c.fedMu.Lock()
	seen := c.fedSkipped[key]
	if len(c.fedSkipped) >= 1024 { // bounded: a changing bad document is logged again, rarely
		clear(c.fedSkipped)
	}
	c.fedSkipped[key] = true
	c.fedMu.Unlock()
	if !seen {
		c.log.Warn("federated bundle dropped", "trust_domain", name, "err", err)
	}
}

// FederatedFor returns the foreign bundles entries federate with, by
// trust domain: those the agent has a bundle for (a trust domain named by
// an entry but not in the appliance's view has none to give). nil when
// none of entries federate.
func (s *Snapshot) FederatedFor(entries []api.Entry) map[spiffeid.TrustDomain]*spiffebundle.Bundle {
	var out map[spiffeid.TrustDomain]*spiffebundle.Bundle
	for _, e := range entries {
		for _, name := range e.FederatesWith {
			td, err := spiffeid.TrustDomainFromString(name)
			if err != nil {
				continue
			}
			if b := s.Federated[td]; b != nil {
				if out == nil {
					out = map[spiffeid.TrustDomain]*spiffebundle.Bundle{}
				}
				out[td] = b
			}
		}
	}
	return out
}
