package state

import (
	"bytes"
	"crypto/x509"
	"time"

	bolt "go.etcd.io/bbolt"
)

// A node's issuing CA is renewed while it runs (issue #18): the root
// ceremony signs a new certificate for the node's existing HSM key, an
// admin gives it to that node (NodeIssuingCertInstall), and the node
// commits CmdNodeCAInstall before it signs with it. The command makes the
// new certificate the node's recorded CA (NodeCA, which checkOriginCA
// consults and the expiry metric reads), and its audit record names the
// admin who asked, the node, and the old and new serials.
//
// The command is an admin's (the admin's standing is checked at commit, as
// for every admin command) proposed by the node the certificate is for,
// or the node's own when it shows, after a start, a CA the state does not
// record for it (a certificate replaced while it was stopped, or a node
// that has not shown one yet). Either way the certificate must name the
// raft origin, so an admin on one node cannot change another node's
// record, and a node records only a CA the root signed for its own name.

// CmdNodeCAInstall records a renewed issuing CA of the proposing node.
const CmdNodeCAInstall = "node.issuing-ca.install"

// NodeCAInstallVersion is the first command version with CmdNodeCAInstall;
// nodes of earlier versions do not know it. Version 7 is another branch's.
const NodeCAInstallVersion = 8

// NodeCAInstall is CmdNodeCAInstall's payload: the new issuing CA
// certificate (DER) and the serial (hex) of the one it replaces, as the
// node signed with it until now.
type NodeCAInstall struct {
	Cert     []byte `json:"cert"`
	Previous string `json:"previous"`
}

func init() {
	register(CmdNodeCAInstall, byAdminOrNode, applyNodeCAInstall)
}

// applyNodeCAInstall checks the certificate as the node did (the state
// machine is the authority for every replica): the proposing node's CA,
// a chain to a bundle root at the command's time, not revoked.
func applyNodeCAInstall(t *txn, p *NodeCAInstall) (any, []AuditEvent, error) {
	if t.c.Version < NodeCAInstallVersion {
		return nil, nil, refuse("%s needs command version %d or later (this command is version %d)", t.c.Type, NodeCAInstallVersion, t.c.Version)
	}
	if len(p.Cert) == 0 || len(p.Cert) > maxCACertDER {
		return nil, nil, refuse("issuing CA certificate of %d bytes; want 1 to %d", len(p.Cert), maxCACertDER)
	}
	if p.Previous != "" && !serialRE.MatchString(p.Previous) {
		return nil, nil, refuse("previous serial %q is not a hex serial", truncate(p.Previous, 80))
	}
	ca, err := x509.ParseCertificate(p.Cert)
	if err != nil {
		return nil, nil, refuse("issuing CA certificate: %v", err)
	}
	if !ca.IsCA || ca.Subject.CommonName != t.origin {
		return nil, nil, refuse("the certificate (subject %q) is not an issuing CA of node %s, which proposed it", truncate(ca.Subject.CommonName, 64), t.origin)
	}
	roots, err := t.roots()
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	if _, err := ca.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: t.c.Time, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, nil, refuse("node %s's new issuing CA is not a valid chain to a root of the trust bundle at %s: %v",
			t.origin, t.c.Time.UTC().Format(time.RFC3339), err)
	}
	set, err := t.revokedSet()
	if err != nil {
		return nil, nil, err
	}
	if _, revoked := set[revokedKey(ca.RawIssuer, ca.SerialNumber)]; revoked {
		return nil, nil, refuse("node %s's new issuing CA (serial %x) is revoked by the root's CRL", t.origin, ca.SerialNumber)
	}
	serial := ca.SerialNumber.Text(16)
	prev, err := t.nodeCA(t.origin)
	if err != nil {
		return nil, nil, err
	}
	if prev != nil && bytes.Equal(prev.Issuer, ca.RawIssuer) && prev.Serial == serial && !prev.NotAfter.IsZero() {
		// Already recorded (a node showing its CA again from a replica
		// that lagged): nothing changes, nothing is audited.
		return nil, nil, nil
	}
	if err := t.noteNodeCA(t.origin, ca); err != nil {
		return nil, nil, err
	}
	if kind, _ := t.f.actorKind(t.c.Actor); prev == nil && kind == "node" {
		// A node showing its CA for the first time registers what it
		// started with, as its first JWT key or checkpoint would: no
		// change to audit. Every install, and every change of a node's
		// recorded CA, is audited.
		return nil, nil, nil
	}
	return nil, []AuditEvent{{Action: CmdNodeCAInstall, Target: t.origin, Detail: map[string]string{
		"node": t.origin, "serial": serial, "previous_serial": p.Previous,
		"not_after": ca.NotAfter.UTC().Format(time.RFC3339)}}}, nil
}

// NodeCAs returns the issuing CA the state records for each node (sorted
// by node): what the expiry metric and cluster status report.
func (f *FSM) NodeCAs() []NodeCA {
	var recs []NodeCA
	if err := f.view(func(tx *bolt.Tx) error {
		var err error
		recs, err = readNodeCAs(tx)
		return err
	}); err != nil {
		return nil
	}
	return recs
}
