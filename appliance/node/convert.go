package node

import (
	"maps"
	"slices"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// Converters between the persisted state types and the API's types. The
// node serves state values only through the api* functions and turns admin
// requests into commands only through the state* ones, so either side can
// change its types without the other noticing. Slices and maps are copied:
// a response never aliases the state's memory, a command never the
// request's. nil stays nil (JSON null and [] differ on the wire).

// convertAll maps f over s, keeping nil.
func convertAll[T, U any](s []T, f func(T) U) []U {
	if s == nil {
		return nil
	}
	out := make([]U, len(s))
	for i, x := range s {
		out[i] = f(x)
	}
	return out
}

// apiEntry is a stored entry as the API serves it.
func apiEntry(e state.Entry) api.Entry {
	return api.Entry{
		ID:            e.ID,
		SPIFFEID:      e.SPIFFEID,
		ParentID:      e.ParentID,
		Selectors:     convertAll(e.Selectors, func(s state.Selector) api.Selector { return api.Selector{Type: s.Type, Value: s.Value} }),
		X509TTL:       api.Seconds(e.X509TTL),
		JWTTTL:        api.Seconds(e.JWTTTL),
		DNSNames:      slices.Clone(e.DNSNames),
		IPAddresses:   slices.Clone(e.IPAddresses),
		FederatesWith: slices.Clone(e.FederatesWith),
		Hint:          e.Hint,
		CreatedAt:     e.CreatedAt,
		UpdatedAt:     e.UpdatedAt,
		Revision:      e.Revision,

		EffectiveX509TTL: api.Seconds(effective(e.X509TTL, defaultX509TTL) / time.Second),
		EffectiveJWTTTL:  api.Seconds(effective(e.JWTTTL, defaultJWTTTL) / time.Second),
	}
}

// effective is a stored TTL as issuance uses it: 0 means the default.
func effective(s state.Seconds, def time.Duration) time.Duration {
	if s == 0 {
		return def
	}
	return s.Duration()
}

func apiEntries(es []state.Entry) []api.Entry { return convertAll(es, apiEntry) }

// stateEntry is an admin's entry as the state stores it (the FSM sets the
// times and the revision itself).
func stateEntry(e api.Entry) state.Entry {
	return state.Entry{
		ID:            e.ID,
		SPIFFEID:      e.SPIFFEID,
		ParentID:      e.ParentID,
		Selectors:     convertAll(e.Selectors, func(s api.Selector) state.Selector { return state.Selector{Type: s.Type, Value: s.Value} }),
		X509TTL:       state.Seconds(e.X509TTL),
		JWTTTL:        state.Seconds(e.JWTTTL),
		DNSNames:      slices.Clone(e.DNSNames),
		IPAddresses:   slices.Clone(e.IPAddresses),
		FederatesWith: slices.Clone(e.FederatesWith),
		Hint:          e.Hint,
		CreatedAt:     e.CreatedAt,
		UpdatedAt:     e.UpdatedAt,
		Revision:      e.Revision,
	}
}

// apiAgent is a stored agent as the API serves it.
func apiAgent(a state.Agent) api.Agent {
	return api.Agent{
		ID:              a.ID,
		AttestationType: a.AttestationType,
		Facts:           maps.Clone(a.Facts),
		SerialNumber:    a.SerialNumber,
		ExpiresAt:       a.ExpiresAt,
		Banned:          a.Banned,
		JoinedAt:        a.JoinedAt,
		UpdatedAt:       a.UpdatedAt,
		Revision:        a.Revision,
		BundleAck:       a.BundleAck,
		Job:             apiJobRun(a.Job),
	}
}

func apiAgents(as []state.Agent) []api.Agent { return convertAll(as, apiAgent) }

// apiEKCA is a trusted EK CA as the API serves it.
func apiEKCA(c state.EKCA) api.EKCA {
	return api.EKCA{ID: c.ID, Subject: c.Subject, DER: slices.Clone(c.DER)}
}

func apiEKCAs(cs []state.EKCA) []api.EKCA { return convertAll(cs, apiEKCA) }

// statePCRPolicy is an admin's PCR policy as the state stores it; nil (no
// policy) stays nil.
func statePCRPolicy(p *api.PCRPolicy) *state.PCRPolicy {
	if p == nil {
		return nil
	}
	return &state.PCRPolicy{Bank: p.Bank, PCRs: maps.Clone(p.PCRs)}
}

// apiBundle is the stored trust bundle as the API serves it.
func apiBundle(b state.Bundle) api.Bundle {
	return api.Bundle{
		TrustDomain: b.TrustDomain,
		Roots:       convertAll(b.Roots, slices.Clone[[]byte]),
		JWTKeys: convertAll(b.JWTKeys, func(k state.JWTKey) api.JWTKey {
			return api.JWTKey{KID: k.KID, Node: k.Node, PublicKey: slices.Clone(k.PublicKey), NotAfter: k.NotAfter, CA: slices.Clone(k.CA)}
		}),
		Revoked: convertAll(b.Revoked, func(r state.Revocation) api.Revocation {
			return api.Revocation{Serial: r.Serial, Node: r.Node, NotAfter: r.NotAfter, At: r.At}
		}),
		Sequence: b.Sequence,
		RootCRLs: convertAll(b.RootCRLs, slices.Clone[[]byte]),
	}
}
