package node

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// Root CRLs revoke node issuing CAs. The state machine stores them (each
// replica checks the root's signature) and the node's CA consults the
// stored set on every handshake and every request it authenticates
// (Node.Start wires ca.Authority.SetRevocationCheck to
// state.FSM.CARevoked), so a certificate minted by a revoked CA (admin,
// agent, node or workload) is refused from the moment the CRL commits.
// Agents get the CRLs in their sync stream (agentSvc.Sync).

// rootCRLCheck is what the node's CA consults on every handshake: the
// replicated root CRLs, and those an earlier run of this node kept beside
// its state (checked here against the configured roots), which cover the
// time after a restart before raft has replayed the log.
func (n *Node) rootCRLCheck() ca.RevocationCheck {
	carried := map[string]struct{}{}
	for i, der := range n.fsm.CarriedRootCRLs() {
		crl, err := x509.ParseRevocationList(der)
		ok := err == nil && slices.ContainsFunc(n.auth.Roots(), func(r *x509.Certificate) bool {
			return bytes.Equal(crl.RawIssuer, r.RawSubject) && crl.CheckSignatureFrom(r) == nil
		})
		if !ok {
			n.log.Error("a root CRL kept by an earlier run does not verify against the configured roots; ignored", "index", i, "err", err)
			continue
		}
		for _, e := range crl.RevokedCertificateEntries {
			carried[string(crl.RawIssuer)+"\x00"+e.SerialNumber.Text(16)] = struct{}{}
		}
	}
	if len(carried) > 0 {
		n.log.Info("root CRLs from the previous run in force until raft replays the log", "revoked", len(carried))
	}
	return func(c *x509.Certificate) bool {
		if n.fsm.CARevoked(c) {
			return true
		}
		if len(carried) == 0 {
			return false
		}
		_, ok := carried[string(c.RawIssuer)+"\x00"+c.SerialNumber.Text(16)]
		return ok
	}
}

// watchRootCRLs drops every raft connection each time the replica's
// revoked set grows. Raft verifies a peer at the TLS handshake only (its
// config calls Classify), so a node whose CA a CRL just revoked would keep
// the connections it opened before, and with them its forwarded writes,
// its votes and its log entries, for as long as it keeps them busy. After
// the reset every peer handshakes again and the revoked one is refused.
// The state machine refuses, in log order, the commands of a node whose
// recorded CA is revoked (state.FSM's checkOriginCA), which covers what
// was in flight meanwhile; the node stays in the raft configuration until
// an admin removes it (ClusterRemove), but no member talks to it.
//
// What peers send is cut at once; this node's own outbound streams (its log
// entries as leader) stay for crlResetGrace, so that a revoked follower
// running honest code learns that the CRL committed, applies it, stops
// signing with its CA and hands the CRL to its agents, which then leave it.
//
// It also re-shows this node's CA when the one the state recorded for it
// is revoked but is not the one it signs with now (its CA was rotated
// before the old one was revoked): until then the state refuses its
// commands.
func (n *Node) watchRootCRLs(ctx context.Context) {
	tick := time.NewTicker(30 * time.Second)
	defer tick.Stop()
	var tried uint64 // the record last re-shown, so a refusal is not retried
	// The next channel is taken before acting on the last one: a CRL that
	// commits while this loop works wakes the next round instead of being
	// missed.
	grown := n.fsm.RootCRLsGrown()
	for {
		select {
		case <-ctx.Done():
			return
		case <-grown:
			grown = n.fsm.RootCRLsGrown()
			closed := n.raft.ResetConnections(crlResetGrace)
			n.log.Warn("root CRLs revoke more certificates: raft connections dropped, every peer is verified again at its next handshake; remove revoked nodes from the cluster",
				"connections_closed", closed, "outbound_closed_after", crlResetGrace.String())
		case <-tick.C:
		}
		rec, revoked, ok := n.fsm.NodeCARevoked(n.cfg.NodeID)
		own := n.auth.Issuing()
		if !ok || !revoked || rec.Index == tried || n.auth.Revoked() || !n.raftReady() ||
			bytes.Equal(rec.Issuer, own.RawIssuer) && rec.Serial == own.SerialNumber.Text(16) {
			continue
		}
		tried = rec.Index
		n.log.Warn("the issuing CA the state recorded for this node is revoked, but this node signs with another: publishing a JWT key with the current CA so that its commands are accepted again",
			"recorded_serial", rec.Serial, "current_serial", own.SerialNumber.Text(16))
		if kid, err := n.jwt.Rotate(ctx); err != nil {
			n.log.Error("re-showing this node's issuing CA failed: its commands stay refused", "err", err)
		} else {
			n.log.Info("this node's issuing CA shown again", "kid", kid)
		}
	}
}

// crlResetGrace: the leader sends its commit index at least every commit
// timeout (50ms), so a follower learns the CRL's commit well within it.
const crlResetGrace = time.Second

// RootCRLAdd adds a CRL the root ceremony signed. The node only decodes
// and parses it to give a clear error early; the state machine is the
// authority on the signature, the number and what it may replace.
func (a *admin) RootCRLAdd(ctx context.Context, r *api.RootCRLRequest) (*api.RootCRLResult, error) {
	c := callerFrom(ctx)
	der, err := crlDER(r.CRL)
	if err != nil {
		a.log.Warn("admin request refused", "request", "root crl add", "actor", c.Actor, "reason", err.Error())
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	res, err := write[state.RootCRLResult](ctx, a, state.CmdRootCRLAdd, state.RootCRLAdd{DER: der})
	if err != nil {
		return nil, err
	}
	a.log.Warn("root CRL added: the certificates it lists are refused from now on", "actor", c.Actor,
		"root", res.CRL.Root, "number", res.CRL.Number, "revoked", strings.Join(res.CRL.Revoked, ","),
		"withdrawn_jwt_keys", strings.Join(res.WithdrawnJWTKeys, ","))
	return &api.RootCRLResult{CRL: apiRootCRL(res.CRL), WithdrawnJWTKeys: res.WithdrawnJWTKeys}, nil
}

// crlDER accepts a CRL as PEM ("X509 CRL") or DER.
func crlDER(b []byte) ([]byte, error) {
	if len(b) == 0 {
		return nil, errors.New("no CRL given")
	}
	if len(b) > state.MaxRootCRLDER*2 {
		return nil, fmt.Errorf("CRL of %d bytes; at most %d (DER)", len(b), state.MaxRootCRLDER)
	}
	der := b
	if t := bytes.TrimSpace(b); bytes.HasPrefix(t, []byte("-----BEGIN")) {
		blk, rest := pem.Decode(t)
		if blk == nil || blk.Type != "X509 CRL" {
			return nil, errors.New(`PEM input holds no "X509 CRL" block first`)
		}
		if len(bytes.TrimSpace(rest)) > 0 {
			return nil, errors.New("PEM input holds more than one block: give one CRL")
		}
		der = blk.Bytes
	}
	if _, err := x509.ParseRevocationList(der); err != nil {
		return nil, fmt.Errorf("not an X.509 CRL: %v", err)
	}
	return der, nil
}

func apiRootCRL(c state.RootCRL) api.RootCRL {
	return api.RootCRL{Root: c.Root, Number: c.Number, ThisUpdate: c.ThisUpdate, NextUpdate: c.NextUpdate,
		AddedAt: c.AddedAt, Revoked: append([]string(nil), c.Revoked...)}
}
