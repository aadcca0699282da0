package state

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	bolt "go.etcd.io/bbolt"

	"github.com/sigil-appliance/sigil/appliance/selector"
)

// Command types. Adding one is a protocol change: nodes that do not know a
// type refuse it, so upgrade every node before using a new type.
const (
	CmdEntryCreate      = "entry.create"
	CmdEntryUpdate      = "entry.update"
	CmdEntryDelete      = "entry.delete"
	CmdAgentUpsert      = "agent.upsert"
	CmdAgentBan         = "agent.ban"
	CmdAgentUnban       = "agent.unban"
	CmdEKCAAdd          = "policy.ek-ca.add"
	CmdEKCARemove       = "policy.ek-ca.remove"
	CmdEKAllowAdd       = "policy.ek-allow.add"
	CmdEKAllowRemove    = "policy.ek-allow.remove"
	CmdPCRPolicySet     = "policy.pcr.set"
	CmdJoinTokensToggle = "policy.join-tokens"
	CmdTokenCreate      = "token.create"
	CmdTokenUse         = "token.use"
	CmdBundleSetRoots   = "bundle.roots.set"
	CmdStateRestore     = "state.restore"
	CmdJWTKeyAdd        = "bundle.jwt.add"
	CmdJWTKeyRemove     = "bundle.jwt.remove"
	CmdRevoke           = "svid.revoke"
	CmdIssue            = "svid.issue"
	CmdAudit            = "audit.append"
	CmdAuditPrune       = "audit.prune"
)

// Payloads. Their JSON names are the stored command format.
type (
	EntryID struct {
		ID string `json:"id"`
	}
	AgentID struct {
		ID string `json:"id"`
	}
	EKCAAdd struct {
		DER []byte `json:"der"`
	}
	EKCARemove struct {
		ID string `json:"id"`
	}
	EKHash struct {
		Hash string `json:"hash"`
	}
	PCRPolicySet struct {
		Policy *PCRPolicy `json:"policy"` // nil clears
	}
	JoinTokens struct {
		Enabled bool `json:"enabled"`
	}
	TokenCreate struct {
		ID        string    `json:"id"` // hex SHA-256 of the token
		ExpiresAt time.Time `json:"expires_at"`
	}
	TokenUse struct {
		ID    string `json:"id"`
		Agent string `json:"agent"`
	}
	BundleRoots struct {
		Roots [][]byte `json:"roots"`
	}
	AuditAppend struct {
		Events []AuditEvent `json:"events"`
	}
	JWTKeyRemove struct {
		KID string `json:"kid"`
	}
	Revoke struct {
		Serial   string    `json:"serial"`
		Node     string    `json:"node"`
		NotAfter time.Time `json:"not_after"`
	}
	// AuditPrune removes audit records below Before (the first sequence
	// number to keep); each node exports them to a segment file first.
	AuditPrune struct {
		Before uint64 `json:"before"`
	}
	// AgentUpsert records an agent after a join or a renewal: the agent
	// record's fields, and for a renewal (version 3) ExpectSerial, the
	// serial of the certificate it replaces. The renewal is recorded only
	// while the agent's record still holds that serial, so two renewals of
	// one certificate cannot both succeed: the node checks the serial
	// before it signs, and this compares and swaps it at commit.
	AgentUpsert struct {
		Agent
		ExpectSerial string `json:"expect_serial,omitempty"`
	}
)

// MaxEventsPerCommand bounds one audit or issuance command.
const MaxEventsPerCommand = 4096

func init() {
	register(CmdEntryCreate, byAdmin, applyEntryCreate)
	register(CmdEntryUpdate, byAdmin, applyEntryUpdate)
	register(CmdEntryDelete, byAdmin, applyEntryDelete)
	register(CmdAgentUpsert, byNode, applyAgentUpsert)
	register(CmdAgentBan, byAdmin, func(t *txn, p *AgentID) (any, []AuditEvent, error) { return t.setBanned(p.ID, true) })
	register(CmdAgentUnban, byAdmin, func(t *txn, p *AgentID) (any, []AuditEvent, error) { return t.setBanned(p.ID, false) })
	register(CmdEKCAAdd, byAdmin, applyEKCAAdd)
	register(CmdEKCARemove, byAdmin, applyEKCARemove)
	register(CmdEKAllowAdd, byAdmin, applyEKAllowAdd)
	register(CmdEKAllowRemove, byAdmin, applyEKAllowRemove)
	register(CmdPCRPolicySet, byAdmin, applyPCRPolicySet)
	register(CmdJoinTokensToggle, byAdmin, func(t *txn, p *JoinTokens) (any, []AuditEvent, error) {
		pol, err := t.policy()
		if err != nil {
			return nil, nil, err
		}
		pol.JoinTokensDisabled = !p.Enabled
		return nil, []AuditEvent{{Action: t.c.Type, Detail: map[string]string{"enabled": strconv.FormatBool(p.Enabled)}}}, t.putPolicy(pol)
	})
	register(CmdTokenCreate, byAdmin, applyTokenCreate)
	register(CmdTokenUse, byNode, applyTokenUse)
	register(CmdBundleSetRoots, byNode, applyBundleRoots)
	register(CmdStateRestore, byAdmin, applyStateRestore)
	register(CmdJWTKeyAdd, byNode, applyJWTKeyAdd)
	register(CmdJWTKeyRemove, byNode, applyJWTKeyRemove)
	register(CmdRevoke, byAdmin, applyRevoke)
	register(CmdIssue, byNode, applyIssue)
	register(CmdAudit, byAdminOrNode, func(t *txn, p *AuditAppend) (any, []AuditEvent, error) {
		if err := checkEvents(p.Events); err != nil {
			return nil, nil, err
		}
		for _, e := range p.Events {
			if _, isCommand := handlers[e.Action]; isCommand || reservedAction(e.Action) {
				return nil, nil, refuse("audit action %q is recorded only by its own command", e.Action)
			}
		}
		return nil, p.Events, nil
	})
	register(CmdAuditCheckpoint, byNode, applyCheckpoint)
	register(CmdAuditPrune, byNode, applyAuditPrune)
}

// reservedAction: actions that only the FSM itself writes (a plain
// audit.append must not be able to fake a checkpoint or an issuance).
func reservedAction(a string) bool {
	return a == CmdAuditCheckpoint || a == CmdAuditPrune || a == CmdStateRestore ||
		strings.HasSuffix(a, ".issue") && strings.HasPrefix(a, "svid.")
}

func checkEvents(events []AuditEvent) error {
	if len(events) == 0 {
		return refuse("no audit events")
	}
	if len(events) > MaxEventsPerCommand {
		return refuse("%d audit events in one command; at most %d", len(events), MaxEventsPerCommand)
	}
	for _, e := range events {
		if !actionRE.MatchString(e.Action) {
			return refuse("audit action %q: want 1-64 characters of a-z 0-9 . _ -", truncate(e.Action, 80))
		}
	}
	return nil
}

var actionRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

var (
	selectorTypeRE = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,31}$`)
	dnsRE          = regexp.MustCompile(`^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	hexHashRE      = regexp.MustCompile(`^[0-9a-f]{64}$`)
	entryIDRE      = regexp.MustCompile(`^[A-Za-z0-9-]{8,64}$`)
)

// TTL bounds: short enough that revocation is mostly expiry, long enough
// that agents are not renewing constantly.
const (
	MinX509TTL = time.Minute
	MaxX509TTL = 30 * 24 * time.Hour
	MinJWTTTL  = 30 * time.Second
	MaxJWTTTL  = 24 * time.Hour
)

// Bounds that keep every entry and the join policy well inside one
// snapshot frame (and bbolt's key limit for the registration index).
const (
	MaxSelectors   = 32
	MaxDNSNames    = 32
	MaxIPAddresses = 32
	MaxEKCAs       = 64
	MaxEKCADER     = 8 << 10
	MaxEKAllowlist = 10000
)

// maxAgentID bounds an agent's SPIFFE ID (a bucket key and a stream frame
// key).
const maxAgentID = 512

// ValidateEntry checks an entry against the trust domain and its
// selectors against what sigil-agent produces (appliance/selector). The
// admin API runs it before proposing so that operators get the error at
// once; the FSM runs it again because it is the authority.
func ValidateEntry(td spiffeid.TrustDomain, e *Entry) error {
	return validateEntry(td, e, true)
}

// EntryRulesVersion is the first command version whose entries must
// hold selectors the agent produces, and whose entry updates naming a
// revision apply only to that revision. Entries stored before (by version
// 2 and 3 commands, in raft logs, snapshots and restore archives) keep
// loading as they were stored: only the generic form is checked for them.
const EntryRulesVersion = 4

// RenewGraceVersion is the first command version whose renewals may name
// the agent's previous certificate (Agent.PreviousSerial).
const RenewGraceVersion = 5

// IPSANVersion is the first command version whose entries may carry IP
// SANs (Entry.IPAddresses). Nodes of earlier versions refused the field
// as unknown, so a command of an earlier version that has it is refused
// as they refused it: a raft log replays the same on every node.
const IPSANVersion = 6

// RenewGrace is how long after a renewal the certificate it replaced may
// renew again. An agent whose renewal answer was lost retries within
// seconds to a few minutes (its backoff tops out at 30 s); the grace is
// also how long a stolen copy of the replaced certificate and its key
// could renew in the agent's place, which the agent's next renewal then
// exposes (it is refused: its certificate is no longer the current one).
const RenewGrace = 5 * time.Minute

// validateEntry checks an entry; strict adds the selector rules.
func validateEntry(td spiffeid.TrustDomain, e *Entry, strict bool) error {
	if !entryIDRE.MatchString(e.ID) {
		return refuse("entry id %q: want 8-64 characters of A-Z a-z 0-9 -", truncate(e.ID, 64))
	}
	if len(e.SPIFFEID) > 2048 || len(e.ParentID) > 2048 {
		return refuse("spiffe_id and parent_id are at most 2048 bytes (SPIFFE's URI limit)")
	}
	id, err := spiffeid.FromString(e.SPIFFEID)
	if err != nil {
		return refuse("spiffe_id %q: %v", truncate(e.SPIFFEID, 128), err)
	}
	if !id.MemberOf(td) {
		return refuse("spiffe_id %s is not in trust domain %s", id, td)
	}
	if id.Path() == "" {
		return refuse("spiffe_id %s has no path; workload IDs need one", id)
	}
	if strings.HasPrefix(id.Path(), "/sigil/") {
		return refuse("spiffe_id %s: paths under /sigil/ are reserved for the appliance", id)
	}
	parent, err := spiffeid.FromString(e.ParentID)
	if err != nil {
		return refuse("parent_id %q: %v", truncate(e.ParentID, 128), err)
	}
	if !parent.MemberOf(td) {
		return refuse("parent_id %s is not in trust domain %s", parent, td)
	}
	if !strings.HasPrefix(parent.Path(), "/sigil/agent/") && !strings.HasPrefix(parent.Path(), "/sigil/node/") {
		return refuse("parent_id %s: a parent is an agent (spiffe://%s/sigil/agent/...) or a node", parent, td.Name())
	}
	if len(e.Selectors) == 0 {
		return refuse("entry %s has no selectors: it would match every workload", id)
	}
	if len(e.Selectors) > MaxSelectors {
		return refuse("entry %s has %d selectors; at most %d", id, len(e.Selectors), MaxSelectors)
	}
	if len(e.DNSNames) > MaxDNSNames {
		return refuse("entry %s has %d DNS names; at most %d", id, len(e.DNSNames), MaxDNSNames)
	}
	if len(e.IPAddresses) > MaxIPAddresses {
		return refuse("entry %s has %d IP addresses; at most %d", id, len(e.IPAddresses), MaxIPAddresses)
	}
	seen := map[Selector]bool{}
	for _, s := range e.Selectors {
		if !selectorTypeRE.MatchString(s.Type) {
			return refuse("selector type %q: want lowercase letters, digits, _ or -", s.Type)
		}
		if s.Value == "" || len(s.Value) > 256 || strings.ContainsAny(s.Value, "\n\r\x00") {
			return refuse("selector %s: value must be 1-256 characters without newlines", s)
		}
		if seen[s] {
			return refuse("selector %s given twice", s)
		}
		seen[s] = true
	}
	if strict {
		pairs := make([][2]string, len(e.Selectors))
		for i, s := range e.Selectors {
			pairs[i] = [2]string{s.Type, s.Value}
		}
		if err := selector.CheckSet(pairs); err != nil {
			return refuse("%v", err)
		}
	}
	if d := e.X509TTL.Duration(); d != 0 && (d < MinX509TTL || d > MaxX509TTL) {
		return refuse("x509_ttl %v: must be between %v and %v", d, MinX509TTL, MaxX509TTL)
	}
	if d := e.JWTTTL.Duration(); d != 0 && (d < MinJWTTTL || d > MaxJWTTTL) {
		return refuse("jwt_ttl %v: must be between %v and %v", d, MinJWTTTL, MaxJWTTTL)
	}
	for _, n := range e.DNSNames {
		if len(n) > 253 || !dnsRE.MatchString(n) {
			return refuse("dns name %q is not a valid lowercase DNS name", n)
		}
	}
	ips := map[string]bool{}
	for _, s := range e.IPAddresses {
		if err := CheckIPSAN(s); err != nil {
			return refuse("%v", err)
		}
		if ips[s] {
			return refuse("ip address %s given twice", s)
		}
		ips[s] = true
	}
	if len(e.Hint) > 64 {
		return refuse("hint is longer than 64 characters")
	}
	return checkEntryFederatesWith(td, e)
}

// CheckIPSAN checks one IP SAN of an entry: an address a workload can be
// reached at, in its canonical text form, so that one address is stored
// (and compared, and shown) one way. The unspecified address, multicast
// addresses and the IPv4 limited broadcast name no host; a zone (fe80::1%eth0)
// means something on one host only and has no place in a certificate;
// an IPv4-mapped IPv6 address is written as IPv4, which is what x509
// encodes it as.
func CheckIPSAN(s string) error {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return fmt.Errorf("ip address %q: not an IPv4 or IPv6 address", truncate(s, 64))
	case a.Zone() != "":
		return fmt.Errorf("ip address %s: a zone is not allowed in a certificate", s)
	case a.Is4In6():
		return fmt.Errorf("ip address %s: write the IPv4 address (%s)", s, a.Unmap())
	case a.String() != s:
		return fmt.Errorf("ip address %q: write it as %s", s, a)
	case a.IsUnspecified():
		return fmt.Errorf("ip address %s is the unspecified address", s)
	case a.IsMulticast():
		return fmt.Errorf("ip address %s is a multicast address", s)
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("ip address %s is the broadcast address", s)
	}
	return nil
}

// checkIPSANVersion refuses IP SANs in a command of a version before
// IPSANVersion.
func (t *txn) checkIPSANVersion(e *Entry) error {
	if len(e.IPAddresses) > 0 && t.c.Version < IPSANVersion {
		return refuse("entry %s: ip_addresses is a field of version %d commands, not of version %d", truncate(e.ID, 64), IPSANVersion, t.c.Version)
	}
	return nil
}

func compareSelectors(a, b Selector) int { return strings.Compare(a.String(), b.String()) }

func sortSelectors(s []Selector) { slices.SortFunc(s, compareSelectors) }

// registrationKey identifies what an entry registers; two entries may not
// register the same thing.
func registrationKey(e *Entry) string {
	var b strings.Builder
	b.WriteString(e.SPIFFEID + "\x00" + e.ParentID)
	for _, s := range e.Selectors {
		b.WriteString("\x00" + s.String())
	}
	return b.String()
}

// policy reads the join policy in this transaction.
func (t *txn) policy() (JoinPolicy, error) {
	var p JoinPolicy
	_, err := getJSON(t.tx.Bucket(bMeta), keyPolicy, &p)
	return p, err
}

func (t *txn) putPolicy(p JoinPolicy) error {
	t.policyChanged = true
	return putJSON(t.tx.Bucket(bMeta), keyPolicy, p)
}

func (t *txn) entry(id string) (*Entry, error) { return getOne[Entry](t.tx.Bucket(bEntries), id) }

func (t *txn) agent(id string) (*Agent, error) { return getOne[Agent](t.tx.Bucket(bAgents), id) }

// getOne decodes one stored record; nil when it is absent.
func getOne[T any](b *bolt.Bucket, key string) (*T, error) {
	var v T
	found, err := getJSON(b, []byte(key), &v)
	if err != nil || !found {
		return nil, err
	}
	return &v, nil
}

// putEntry stores an entry and its index rows (old is the previous version
// or nil).
func putEntry(tx *bolt.Tx, old, e *Entry) error {
	if old != nil {
		if err := deleteEntryIndexes(tx, old); err != nil {
			return err
		}
	}
	if err := putJSON(tx.Bucket(bEntries), []byte(e.ID), e); err != nil {
		return err
	}
	return putEntryIndexes(tx, e)
}

func putEntryIndexes(tx *bolt.Tx, e *Entry) error {
	if err := tx.Bucket(bEntriesByParent).Put(indexKey(e.ParentID, e.ID), nil); err != nil {
		return err
	}
	if err := tx.Bucket(bEntriesBySPIFFE).Put(indexKey(e.SPIFFEID, e.ID), nil); err != nil {
		return err
	}
	return tx.Bucket(bEntriesByReg).Put([]byte(registrationKey(e)), []byte(e.ID))
}

func deleteEntryIndexes(tx *bolt.Tx, e *Entry) error {
	if err := tx.Bucket(bEntriesByParent).Delete(indexKey(e.ParentID, e.ID)); err != nil {
		return err
	}
	if err := tx.Bucket(bEntriesBySPIFFE).Delete(indexKey(e.SPIFFEID, e.ID)); err != nil {
		return err
	}
	return tx.Bucket(bEntriesByReg).Delete([]byte(registrationKey(e)))
}

// sameEntryExists returns the ID of another entry registering the same
// thing, or "".
func (t *txn) sameEntryExists(e *Entry) string {
	if id := t.tx.Bucket(bEntriesByReg).Get([]byte(registrationKey(e))); id != nil && string(id) != e.ID {
		return string(id)
	}
	return ""
}

func entryAudit(action string, e *Entry) AuditEvent {
	sel := make([]string, len(e.Selectors))
	for i, s := range e.Selectors {
		sel[i] = s.String()
	}
	return AuditEvent{Action: action, Target: e.SPIFFEID, Detail: map[string]string{
		"entry": e.ID, "parent": e.ParentID, "selectors": strings.Join(sel, ",")}}
}

// strictEntries: the selector rules apply to this command's entry.
func (t *txn) strictEntries() bool { return t.c.Version >= EntryRulesVersion }

func applyEntryCreate(t *txn, e *Entry) (any, []AuditEvent, error) {
	if err := t.checkIPSANVersion(e); err != nil {
		return nil, nil, err
	}
	if err := t.checkFederatesWith(e); err != nil {
		return nil, nil, err
	}
	sortSelectors(e.Selectors)
	if err := validateEntry(t.f.td, e, t.strictEntries()); err != nil {
		return nil, nil, err
	}
	if old, err := t.entry(e.ID); err != nil || old != nil {
		if err != nil {
			return nil, nil, err
		}
		return nil, nil, refuse("entry id %s already exists", e.ID)
	}
	if dup := t.sameEntryExists(e); dup != "" {
		return nil, nil, refuse("entry %s already registers %s for parent %s with these selectors", dup, e.SPIFFEID, e.ParentID)
	}
	e.CreatedAt, e.UpdatedAt, e.Revision = t.c.Time, t.c.Time, t.index
	t.touchAgent(e.ParentID)
	return e, []AuditEvent{entryAudit(t.c.Type, e)}, putEntry(t.tx, nil, e)
}

func applyEntryUpdate(t *txn, e *Entry) (any, []AuditEvent, error) {
	if err := t.checkIPSANVersion(e); err != nil {
		return nil, nil, err
	}
	if err := t.checkFederatesWith(e); err != nil {
		return nil, nil, err
	}
	sortSelectors(e.Selectors)
	old, err := t.entry(e.ID)
	if err != nil {
		return nil, nil, err
	}
	if old == nil {
		return nil, nil, refuse("no entry %s", truncate(e.ID, 64))
	}
	// From version 4 an update that names a revision replaces only that
	// revision: sigilctl reads the entry, changes the fields given and
	// writes it back, and a change committed in between is not lost.
	// Version 3 commands carried whatever revision and it was ignored.
	if t.strictEntries() && e.Revision != 0 && e.Revision != old.Revision {
		return nil, nil, refuse("entry %s changed since it was read (revision %d, now %d): read it again and repeat the update", e.ID, e.Revision, old.Revision)
	}
	if err := validateEntry(t.f.td, e, t.strictEntries()); err != nil {
		return nil, nil, err
	}
	if dup := t.sameEntryExists(e); dup != "" {
		return nil, nil, refuse("entry %s already registers %s for parent %s with these selectors", dup, e.SPIFFEID, e.ParentID)
	}
	e.CreatedAt, e.UpdatedAt, e.Revision = old.CreatedAt, t.c.Time, t.index
	t.touchAgent(old.ParentID)
	t.touchAgent(e.ParentID)
	return e, []AuditEvent{entryAudit(t.c.Type, e)}, putEntry(t.tx, old, e)
}

func applyEntryDelete(t *txn, p *EntryID) (any, []AuditEvent, error) {
	e, err := t.entry(p.ID)
	if err != nil {
		return nil, nil, err
	}
	if e == nil {
		return nil, nil, refuse("no entry %s", truncate(p.ID, 64))
	}
	if err := deleteEntryIndexes(t.tx, e); err != nil {
		return nil, nil, err
	}
	t.touchAgent(e.ParentID)
	return nil, []AuditEvent{entryAudit(t.c.Type, e)}, t.tx.Bucket(bEntries).Delete([]byte(e.ID))
}

func validAgentID(td spiffeid.TrustDomain, s string) bool {
	if len(s) > maxAgentID {
		return false
	}
	id, err := spiffeid.FromString(s)
	return err == nil && id.MemberOf(td) && strings.HasPrefix(id.Path(), "/sigil/agent/")
}

func applyAgentUpsert(t *txn, p *AgentUpsert) (any, []AuditEvent, error) {
	a := &p.Agent
	if p.ExpectSerial != "" && t.c.Version < 3 {
		// Version 2 nodes refused the field as unknown: replay as then.
		return nil, nil, refuse("%s payload: expect_serial is a field of version 3 commands, not of version %d", t.c.Type, t.c.Version)
	}
	if !validAgentID(t.f.td, a.ID) {
		return nil, nil, refuse("agent id %q: want spiffe://%s/sigil/agent/...", truncate(a.ID, 128), t.f.td.Name())
	}
	if a.Job != nil || strings.HasPrefix(a.ID, "spiffe://"+t.f.td.Name()+jobAgentPathPrefix) {
		return nil, nil, refuse("agent %s: job agents are recorded by %s only (they renew by joining again)", truncate(a.ID, 128), CmdJobJoin)
	}
	if a.AttestationType == "" || len(a.AttestationType) > 32 {
		return nil, nil, refuse("agent %s: attestation type missing or too long", a.ID)
	}
	if len(a.Facts) > maxDetailKeys-2 || len(a.SerialNumber) > 64 {
		return nil, nil, refuse("agent %s: at most %d facts and a 64-character serial", a.ID, maxDetailKeys-2)
	}
	if p.ExpectSerial != "" && !serialRE.MatchString(p.ExpectSerial) {
		return nil, nil, refuse("agent %s: expect_serial %q: want lowercase hex", a.ID, truncate(p.ExpectSerial, 64))
	}
	for k, v := range a.Facts {
		if len(k) > maxDetailKey || len(v) > maxDetailValue {
			return nil, nil, refuse("agent %s: fact %q too long", a.ID, truncate(k, 64))
		}
	}
	old, err := t.agent(a.ID)
	if err != nil {
		return nil, nil, err
	}
	if old != nil {
		if old.Banned {
			return nil, nil, refuse("agent %s is banned", a.ID)
		}
		a.JoinedAt = old.JoinedAt
		a.BundleAck = old.BundleAck
	} else {
		a.JoinedAt = t.c.Time
		a.BundleAck = 0
	}
	// A join replaces any certificate and leaves no grace; a renewal
	// replaces the current one, or within its grace the one the last
	// renewal replaced (that renewal's certificate was never used to
	// renew, so it is taken as never delivered).
	a.PreviousSerial, a.PreviousUntil = "", time.Time{}
	undelivered := ""
	switch grace := t.c.Version >= RenewGraceVersion; {
	case p.ExpectSerial == "":
	case old != nil && old.SerialNumber == p.ExpectSerial:
		if grace {
			a.PreviousSerial, a.PreviousUntil = p.ExpectSerial, t.c.Time.Add(RenewGrace)
		}
	case grace && old != nil && old.PreviousSerial == p.ExpectSerial && t.c.Time.Before(old.PreviousUntil):
		// The deadline stays the first renewal's: retries do not extend it.
		a.PreviousSerial, a.PreviousUntil = old.PreviousSerial, old.PreviousUntil
		undelivered = old.SerialNumber
	default:
		current := "none"
		if old != nil && old.SerialNumber != "" {
			current = old.SerialNumber
		}
		return nil, nil, refuse("agent %s: renewal of certificate %s refused: the agent's current certificate is %s (another renewal or a join was recorded first)",
			a.ID, p.ExpectSerial, current)
	}
	a.Banned = false
	a.UpdatedAt, a.Revision = t.c.Time, t.index
	detail := map[string]string{"attestation": a.AttestationType, "serial": a.SerialNumber}
	if undelivered != "" {
		detail["renewed_again"] = p.ExpectSerial
		detail["replaced_undelivered"] = undelivered
	}
	for k, v := range a.Facts {
		detail["fact."+k] = v
	}
	t.touchAgent(a.ID)
	return a, []AuditEvent{{Action: t.c.Type, Target: a.ID, Detail: detail}}, putJSON(t.tx.Bucket(bAgents), []byte(a.ID), a)
}

func (t *txn) setBanned(id string, banned bool) (any, []AuditEvent, error) {
	a, err := t.agent(id)
	if err != nil {
		return nil, nil, err
	}
	if a == nil {
		return nil, nil, refuse("no agent %s", truncate(id, 128))
	}
	if a.Banned == banned {
		return nil, nil, refuse("agent %s is already %s", id, map[bool]string{true: "banned", false: "not banned"}[banned])
	}
	a.Banned, a.UpdatedAt, a.Revision = banned, t.c.Time, t.index
	if banned {
		// A ban ends the renewal grace: unbanned later, only the current
		// certificate renews.
		a.PreviousSerial, a.PreviousUntil = "", time.Time{}
	}
	t.touchAgent(id)
	return a, []AuditEvent{{Action: t.c.Type, Target: id}}, putJSON(t.tx.Bucket(bAgents), []byte(id), a)
}

func checkEKCA(der []byte) (EKCA, error) {
	if len(der) > MaxEKCADER {
		return EKCA{}, refuse("EK CA certificate of %d bytes; at most %d", len(der), MaxEKCADER)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return EKCA{}, refuse("EK CA certificate: %v", err)
	}
	if !cert.IsCA {
		return EKCA{}, refuse("EK CA certificate %q is not a CA", cert.Subject)
	}
	sum := sha256.Sum256(der)
	return EKCA{ID: hex.EncodeToString(sum[:]), Subject: cert.Subject.String(), DER: der}, nil
}

func applyEKCAAdd(t *txn, p *EKCAAdd) (any, []AuditEvent, error) {
	ca, err := checkEKCA(p.DER)
	if err != nil {
		return nil, nil, err
	}
	pol, err := t.policy()
	if err != nil {
		return nil, nil, err
	}
	for _, o := range pol.EKCAs {
		if o.ID == ca.ID {
			return nil, nil, refuse("EK CA %s is already trusted", ca.ID)
		}
	}
	if len(pol.EKCAs) >= MaxEKCAs {
		return nil, nil, refuse("%d EK CAs are trusted already; at most %d", len(pol.EKCAs), MaxEKCAs)
	}
	pol.EKCAs = append(pol.EKCAs, ca)
	return ca, []AuditEvent{{Action: t.c.Type, Target: ca.ID, Detail: map[string]string{"subject": ca.Subject}}}, t.putPolicy(pol)
}

func applyEKCARemove(t *txn, p *EKCARemove) (any, []AuditEvent, error) {
	pol, err := t.policy()
	if err != nil {
		return nil, nil, err
	}
	i := slices.IndexFunc(pol.EKCAs, func(e EKCA) bool { return e.ID == p.ID })
	if i < 0 {
		return nil, nil, refuse("no EK CA %s", truncate(p.ID, 64))
	}
	ca := pol.EKCAs[i]
	pol.EKCAs = slices.Delete(pol.EKCAs, i, i+1)
	return nil, []AuditEvent{{Action: t.c.Type, Target: ca.ID, Detail: map[string]string{"subject": ca.Subject}}}, t.putPolicy(pol)
}

func applyEKAllowAdd(t *txn, p *EKHash) (any, []AuditEvent, error) {
	h := strings.ToLower(p.Hash)
	if !hexHashRE.MatchString(h) {
		return nil, nil, refuse("EK hash %q: want 64 hex digits (SHA-256 of the EK public key, PKIX DER)", truncate(p.Hash, 80))
	}
	pol, err := t.policy()
	if err != nil {
		return nil, nil, err
	}
	if slices.Contains(pol.EKAllow, h) {
		return nil, nil, refuse("EK %s is already allowed", h)
	}
	if len(pol.EKAllow) >= MaxEKAllowlist {
		return nil, nil, refuse("the EK allowlist holds %d hashes; at most %d (use an EK CA)", len(pol.EKAllow), MaxEKAllowlist)
	}
	pol.EKAllow = append(pol.EKAllow, h)
	slices.Sort(pol.EKAllow)
	return nil, []AuditEvent{{Action: t.c.Type, Target: h}}, t.putPolicy(pol)
}

func applyEKAllowRemove(t *txn, p *EKHash) (any, []AuditEvent, error) {
	h := strings.ToLower(p.Hash)
	pol, err := t.policy()
	if err != nil {
		return nil, nil, err
	}
	i := slices.Index(pol.EKAllow, h)
	if i < 0 {
		return nil, nil, refuse("EK %s is not on the allowlist", truncate(h, 80))
	}
	pol.EKAllow = slices.Delete(pol.EKAllow, i, i+1)
	return nil, []AuditEvent{{Action: t.c.Type, Target: h}}, t.putPolicy(pol)
}

func checkPCRPolicy(p *PCRPolicy) error {
	if p == nil {
		return nil
	}
	if p.Bank != "sha256" {
		return refuse("PCR bank %q: only sha256 is supported", truncate(p.Bank, 32))
	}
	if len(p.PCRs) == 0 {
		return refuse("PCR policy names no PCRs")
	}
	for k, v := range p.PCRs {
		n, err := strconv.Atoi(k)
		if err != nil || n < 0 || n > 23 {
			return refuse("PCR index %q: want 0-23", truncate(k, 16))
		}
		if !hexHashRE.MatchString(v) {
			return refuse("PCR %s value %q: want 64 hex digits", k, truncate(v, 80))
		}
	}
	return nil
}

func applyPCRPolicySet(t *txn, p *PCRPolicySet) (any, []AuditEvent, error) {
	if err := checkPCRPolicy(p.Policy); err != nil {
		return nil, nil, err
	}
	pol, err := t.policy()
	if err != nil {
		return nil, nil, err
	}
	pol.PCRPolicy = p.Policy
	detail := map[string]string{}
	if p.Policy != nil {
		for k, v := range p.Policy.PCRs {
			detail["pcr"+k] = v
		}
	}
	return nil, []AuditEvent{{Action: t.c.Type, Detail: detail}}, t.putPolicy(pol)
}

func applyTokenCreate(t *txn, p *TokenCreate) (any, []AuditEvent, error) {
	if !hexHashRE.MatchString(p.ID) {
		return nil, nil, refuse("token id must be the token's SHA-256 in hex")
	}
	if !p.ExpiresAt.After(t.c.Time) {
		return nil, nil, refuse("token would expire before it is created")
	}
	tokens := t.tx.Bucket(bTokens)
	if tokens.Get([]byte(p.ID)) != nil {
		return nil, nil, refuse("token %.12s exists", p.ID)
	}
	// Expired tokens are dropped here, deterministically, so the table
	// does not grow forever. They are found through the expiry index: a
	// scan of every token made each creation cost the whole table (a fleet
	// rollout of 10,000 tokens spent most of three nodes' CPU in it).
	if err := dropExpiredTokens(t.tx, t.c.Time); err != nil {
		return nil, nil, err
	}
	tok := &JoinToken{ID: p.ID, ExpiresAt: p.ExpiresAt.UTC(), CreatedBy: truncate(t.c.Actor, maxActor), CreatedAt: t.c.Time}
	if err := indexToken(t.tx, tok); err != nil {
		return nil, nil, err
	}
	return tok, []AuditEvent{{Action: t.c.Type, Target: p.ID[:12], Detail: map[string]string{"expires": tok.ExpiresAt.Format(time.RFC3339)}}},
		putJSON(tokens, []byte(p.ID), tok)
}

// indexToken adds t to the token expiry index (second resolution; the
// token's own ExpiresAt decides).
func indexToken(tx *bolt.Tx, t *JoinToken) error {
	return tx.Bucket(bTokensByExpiry).Put(expiryKey(t.ExpiresAt, t.ID), nil)
}

// dropExpiredTokens deletes the tokens that have expired at now (ExpiresAt
// not after now) and their index keys, reading only the index keys up to
// now's second.
func dropExpiredTokens(tx *bolt.Tx, now time.Time) error {
	byExp, tokens := tx.Bucket(bTokensByExpiry), tx.Bucket(bTokens)
	limit := u64Key(uint64(now.Unix()))
	var drop [][]byte
	c := byExp.Cursor()
	for k, _ := c.First(); len(k) > 8 && bytes.Compare(k[:8], limit) <= 0; k, _ = c.Next() {
		var tok JoinToken
		ok, err := getJSON(tokens, k[8:], &tok)
		if err != nil {
			return err
		}
		// In now's own second a token may not have expired yet.
		if ok && tok.ExpiresAt.After(now) {
			continue
		}
		drop = append(drop, bytes.Clone(k))
	}
	for _, k := range drop {
		if err := tokens.Delete(k[8:]); err != nil {
			return err
		}
		if err := byExp.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

func applyTokenUse(t *txn, p *TokenUse) (any, []AuditEvent, error) {
	pol, err := t.policy()
	if err != nil {
		return nil, nil, err
	}
	var tok JoinToken
	ok, err := getJSON(t.tx.Bucket(bTokens), []byte(p.ID), &tok)
	if err != nil {
		return nil, nil, err
	}
	switch {
	case pol.JoinTokensDisabled:
		return nil, nil, refuse("join tokens are disabled")
	case !ok:
		return nil, nil, refuse("unknown join token")
	case !tok.RevokedAt.IsZero():
		return nil, nil, refuse("join token %.12s was revoked at %s by %s", p.ID, tok.RevokedAt.Format(time.RFC3339), tok.RevokedBy)
	case tok.UsedBy != "":
		return nil, nil, refuse("join token %.12s was already used by %s", p.ID, tok.UsedBy)
	case !tok.ExpiresAt.After(t.c.Time):
		return nil, nil, refuse("join token %.12s expired at %s", p.ID, tok.ExpiresAt.Format(time.RFC3339))
	case !validAgentID(t.f.td, p.Agent):
		return nil, nil, refuse("join token used for %q, which is not an agent ID", truncate(p.Agent, 128))
	}
	tok.UsedBy, tok.UsedAt = p.Agent, t.c.Time
	return tok, []AuditEvent{{Action: t.c.Type, Target: p.ID[:12], Detail: map[string]string{"agent": p.Agent}}},
		putJSON(t.tx.Bucket(bTokens), []byte(p.ID), &tok)
}

// checkRoot parses a trust-bundle root and returns its SHA-256.
func checkRoot(td spiffeid.TrustDomain, i int, der []byte) (string, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return "", refuse("root %d: %v", i, err)
	}
	if !cert.IsCA || cert.CheckSignatureFrom(cert) != nil {
		return "", refuse("root %d (%s) is not a self-signed CA certificate", i, cert.Subject)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != td.IDString() {
		return "", refuse("root %d (%s) is not a root of %s", i, cert.Subject, td.IDString())
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

func (t *txn) bumpBundle() (uint64, error) {
	meta := t.tx.Bucket(bMeta)
	seq := getU64(meta, keyBundleSequence) + 1
	t.bundleChanged = true
	return seq, putU64(meta, keyBundleSequence, seq)
}

// bumpBundleQuietly is bumpBundle for a change only the agents this
// command touches need (revocations of SVIDs that only they held): the
// sequence moves (and with it each node's CRL), but the rest of the fleet
// is not woken for a new view.
func (t *txn) bumpBundleQuietly() (uint64, error) {
	meta := t.tx.Bucket(bMeta)
	seq := getU64(meta, keyBundleSequence) + 1
	t.bundleQuiet = true
	return seq, putU64(meta, keyBundleSequence, seq)
}

func applyBundleRoots(t *txn, p *BundleRoots) (any, []AuditEvent, error) {
	if len(p.Roots) == 0 {
		return nil, nil, refuse("a trust bundle needs at least one root")
	}
	// Roots are set once, when a new cluster starts, from the nodes'
	// configured roots; no node may replace them later.
	var cur [][]byte
	if _, err := getJSON(t.tx.Bucket(bMeta), keyRoots, &cur); err != nil {
		return nil, nil, err
	}
	if len(cur) > 0 {
		return nil, nil, refuse("the trust bundle's roots are already set; a node cannot replace them")
	}
	var fps []string
	for i, der := range p.Roots {
		fp, err := checkRoot(t.f.td, i, der)
		if err != nil {
			return nil, nil, err
		}
		fps = append(fps, fp)
	}
	if err := putJSON(t.tx.Bucket(bMeta), keyRoots, p.Roots); err != nil {
		return nil, nil, err
	}
	seq, err := t.bumpBundle()
	if err != nil {
		return nil, nil, err
	}
	b, err := readBundle(t.tx, t.f.td.Name())
	return b, []AuditEvent{{Action: t.c.Type, Detail: map[string]string{
		"roots": strings.Join(fps, ","), "sequence": fmt.Sprint(seq)}}}, err
}

var kidRE = regexp.MustCompile(`^[A-Za-z0-9_-]{8,64}$`)

// checkJWTKeyType admits the key types nodes sign JWT-SVIDs with
// (ca.JWTAlgorithm): ECDSA P-256 or P-384 (ES256, ES384) and RSA of 2048
// to 4096 bits with exponent 65537 (RS256, jwt.key-type rsa-2048).
//
// The check is the same for every command version. Before RSA keys were
// a node's choice it admitted any key with an Equal method (RSA, Ed25519,
// X25519 and every ECDSA curve included): what it refuses now no node
// version ever made, since nodes made ECDSA P-256 keys only, so a log
// that nodes wrote replays as it was applied (only a node can publish a
// key). Nodes of a version before jwt.key-type admit an RSA key (RS256,
// rsa-2048) like any other key with Equal, so a mixed-version cluster
// does not diverge on one: old nodes do not refuse it.
func checkJWTKeyType(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("ECDSA curve %s: want P-256 or P-384", k.Curve.Params().Name)
		}
		return nil
	case *rsa.PublicKey:
		if b := k.N.BitLen(); b < 2048 || b > 4096 {
			return fmt.Errorf("RSA key of %d bits: want 2048 to 4096", b)
		}
		if k.E != 65537 {
			return fmt.Errorf("RSA public exponent %d: want 65537", k.E)
		}
		return nil
	}
	return fmt.Errorf("unsupported key type %T: want ECDSA P-256 or P-384, or RSA", pub)
}

// checkJWTKey validates a JWT key's form.
func checkJWTKey(k *JWTKey) error {
	if !kidRE.MatchString(k.KID) {
		return refuse("kid %q: want 8-64 characters of A-Z a-z 0-9 _ -", truncate(k.KID, 80))
	}
	pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
	if err != nil {
		return refuse("JWT key %s: %v", k.KID, err)
	}
	if err := checkJWTKeyType(pub); err != nil {
		return refuse("JWT key %s: %v", k.KID, err)
	}
	_, err = checkJWTKeyCAForm(k)
	return err
}

// applyJWTKeyAdd publishes a node's JWT key. Only the node itself may
// publish its keys (the raft origin, not a field it chose), so neither an
// admin nor another node can slip a key into the bundle under its name.
func applyJWTKeyAdd(t *txn, k *JWTKey) (any, []AuditEvent, error) {
	if k.Node != t.origin {
		return nil, nil, refuse("JWT key for node %q proposed by node %s: a node publishes only its own keys", truncate(k.Node, 64), t.origin)
	}
	if err := checkJWTKey(k); err != nil {
		return nil, nil, err
	}
	if err := t.checkJWTKeyCA(k); err != nil {
		return nil, nil, err
	}
	if !k.NotAfter.After(t.c.Time) {
		return nil, nil, refuse("JWT key %s would be published already expired", k.KID)
	}
	keys := t.tx.Bucket(bJWTKeys)
	if keys.Get([]byte(k.KID)) != nil {
		return nil, nil, refuse("kid %s is already in the bundle", k.KID)
	}
	k.NotAfter = k.NotAfter.UTC()
	if err := putJSON(keys, []byte(k.KID), k); err != nil {
		return nil, nil, err
	}
	seq, err := t.bumpBundle()
	if err != nil {
		return nil, nil, err
	}
	b, err := readBundle(t.tx, t.f.td.Name())
	return b, []AuditEvent{{Action: t.c.Type, Target: k.KID, Detail: map[string]string{
		"node": k.Node, "not_after": k.NotAfter.Format(time.RFC3339), "sequence": fmt.Sprint(seq)}}}, err
}

// applyJWTKeyRemove retires a key; only after every token it signed has
// expired (its NotAfter), so validators never lose a key they still need.
func applyJWTKeyRemove(t *txn, p *JWTKeyRemove) (any, []AuditEvent, error) {
	var k JWTKey
	ok, err := getJSON(t.tx.Bucket(bJWTKeys), []byte(p.KID), &k)
	if err != nil {
		return nil, nil, err
	}
	if !ok {
		return nil, nil, refuse("no JWT key %s in the bundle", truncate(p.KID, 80))
	}
	if k.Node != t.origin {
		return nil, nil, refuse("JWT key %s is node %s's; node %s may retire only its own", p.KID, k.Node, t.origin)
	}
	if k.NotAfter.After(t.c.Time) {
		return nil, nil, refuse("JWT key %s may still have valid tokens until %s", p.KID, k.NotAfter.UTC().Format(time.RFC3339))
	}
	if err := t.tx.Bucket(bJWTKeys).Delete([]byte(p.KID)); err != nil {
		return nil, nil, err
	}
	seq, err := t.bumpBundle()
	return nil, []AuditEvent{{Action: t.c.Type, Target: p.KID, Detail: map[string]string{"node": k.Node, "sequence": fmt.Sprint(seq)}}}, err
}

var serialRE = regexp.MustCompile(`^[0-9a-f]{1,40}$`)

func revocationKey(node, serial string) []byte { return indexKey(node, serial) }

func applyRevoke(t *txn, p *Revoke) (any, []AuditEvent, error) {
	s := strings.ToLower(strings.TrimLeft(p.Serial, "0"))
	if !serialRE.MatchString(s) {
		return nil, nil, refuse("serial %q: want hex", truncate(p.Serial, 80))
	}
	if p.Node == "" || len(p.Node) > 64 {
		return nil, nil, refuse("revocation of %s names no issuing node", s)
	}
	rev := t.tx.Bucket(bRevoked)
	if rev.Get(revocationKey(p.Node, s)) != nil {
		return nil, nil, refuse("serial %s of node %s is already revoked", s, p.Node)
	}
	// Expired revocations are dropped: an expired certificate is refused
	// anyway, and the CRL stays small.
	if err := dropExpiredRevocations(rev, t.c.Time); err != nil {
		return nil, nil, err
	}
	r := Revocation{Serial: s, Node: p.Node, NotAfter: p.NotAfter.UTC(), At: t.c.Time}
	if err := putJSON(rev, revocationKey(p.Node, s), r); err != nil {
		return nil, nil, err
	}
	_, err := t.bumpBundle()
	return nil, []AuditEvent{{Action: t.c.Type, Target: s, Detail: map[string]string{"node": p.Node, "not_after": r.NotAfter.Format(time.RFC3339)}}}, err
}

func dropExpiredRevocations(rev *bolt.Bucket, now time.Time) error {
	var expired [][]byte
	err := rev.ForEach(func(k, v []byte) error {
		var r Revocation
		if err := decodeStrict(v, &r); err != nil {
			return err
		}
		if !r.NotAfter.After(now) {
			expired = append(expired, bytes.Clone(k))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, k := range expired {
		if err := rev.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// IssueResult lists the events of an svid.issue command the FSM refused.
type IssueResult struct {
	Refused []int `json:"refused,omitempty"`
}

// IssuedSVID is what the state keeps of an X.509-SVID until it expires:
// enough to revoke it by serial.
type IssuedSVID struct {
	Serial   string    `json:"serial"`
	Node     string    `json:"node"`
	NotAfter time.Time `json:"not_after"`
	Seq      uint64    `json:"seq"` // its audit record
}

// maxSVIDPrunePerCommand bounds the expired-SVID cleanup one issuance
// command does, so no command's cost depends on history.
const maxSVIDPrunePerCommand = 4096

// applyIssue records issuances, checking at commit time, in log order,
// that each requesting agent is known and not banned: a ban committed
// before this record makes it a refusal, whatever the issuing node saw.
func applyIssue(t *txn, p *AuditAppend) (any, []AuditEvent, error) {
	if err := checkEvents(p.Events); err != nil {
		return nil, nil, err
	}
	res := &IssueResult{}
	events := make([]AuditEvent, 0, len(p.Events))
	agents := map[string]*Agent{}
	for i, e := range p.Events {
		if _, isCommand := handlers[e.Action]; isCommand || e.Action == CmdAuditCheckpoint || e.Action == CmdAuditPrune ||
			!strings.HasPrefix(e.Action, "svid.") && !strings.HasPrefix(e.Action, "join.") {
			return nil, nil, refuse("svid.issue carries svid.* and join.* events only, not %q", e.Action)
		}
		if strings.HasPrefix(e.Action, "svid.") && strings.HasSuffix(e.Action, ".issue") && e.Detail["node"] != t.origin {
			return nil, nil, refuse("issuance recorded for node %q by node %s: a node records only what it signed", truncate(e.Detail["node"], 64), t.origin)
		}
		if strings.HasSuffix(e.Action, ".issue") {
			id := e.Detail["agent"]
			a, seen := agents[id]
			if !seen {
				var err error
				if a, err = t.agent(id); err != nil {
					return nil, nil, err
				}
				agents[id] = a
			}
			if a == nil || a.Banned {
				res.Refused = append(res.Refused, i)
				reason := "agent is banned"
				if a == nil {
					reason = "agent unknown"
				}
				events = append(events, AuditEvent{Action: strings.TrimSuffix(e.Action, ".issue") + ".refuse", Target: e.Target,
					Detail: map[string]string{"agent": e.Detail["agent"], "entry": e.Detail["entry"], "reason": reason + " (at commit)"}})
				continue
			}
		}
		events = append(events, e)
	}
	return res, events, nil
}

// recordSVID indexes an X.509-SVID issuance by serial (called as its
// audit record is appended) and drops a bounded number of expired ones.
func (t *txn) recordSVID(e AuditEvent, seq uint64) error {
	serial := strings.ToLower(e.Detail["serial"])
	exp, err := time.Parse(time.RFC3339, e.Detail["expires"])
	if !serialRE.MatchString(serial) || err != nil {
		return nil // not indexable; the audit record still says what happened
	}
	s := IssuedSVID{Serial: serial, Node: e.Detail["node"], NotAfter: exp.UTC(), Seq: seq}
	if t.tx.Bucket(bSVIDs).Get([]byte(serial)) != nil {
		// 127-bit random serials do not collide: a repeat is a replay or a
		// forgery, and must not redirect a revocation.
		return refuse("serial %s is already recorded", serial)
	}
	if err := putJSON(t.tx.Bucket(bSVIDs), []byte(serial), s); err != nil {
		return err
	}
	if err := t.tx.Bucket(bSVIDsByExpiry).Put(expiryKey(s.NotAfter, serial), nil); err != nil {
		return err
	}
	return pruneExpiredSVIDs(t.tx, t.c.Time, maxSVIDPrunePerCommand)
}

func expiryKey(at time.Time, serial string) []byte {
	return append(u64Key(uint64(at.Unix())), serial...)
}

func pruneExpiredSVIDs(tx *bolt.Tx, now time.Time, limit int) error {
	byExp, svids := tx.Bucket(bSVIDsByExpiry), tx.Bucket(bSVIDs)
	c := byExp.Cursor()
	var drop [][]byte
	for k, _ := c.First(); k != nil && len(drop) < limit; k, _ = c.Next() {
		if len(k) < 8 || int64(u64FromKey(k)) >= now.Unix() {
			break
		}
		drop = append(drop, bytes.Clone(k))
	}
	for _, k := range drop {
		if err := byExp.Delete(k); err != nil {
			return err
		}
		// The serial may have been reissued with a later expiry: keep it.
		var s IssuedSVID
		if ok, _ := getJSON(svids, k[8:], &s); ok && s.NotAfter.Unix() == int64(u64FromKey(k)) {
			if err := svids.Delete(k[8:]); err != nil {
				return err
			}
		}
	}
	return nil
}

func u64FromKey(k []byte) uint64 {
	var v uint64
	for _, b := range k[:8] {
		v = v<<8 | uint64(b)
	}
	return v
}

// truncate cuts s to at most n bytes (on a rune boundary) and marks the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n - len("…")
	for cut > 0 && cut < len(s) && s[cut]&0xC0 == 0x80 {
		cut--
	}
	return s[:cut] + "…"
}
