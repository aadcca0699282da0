package state

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
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
)

// Payloads.
type (
	EntryID      struct{ ID string }
	AgentID      struct{ ID string }
	EKCAAdd      struct{ DER []byte }
	EKCARemove   struct{ ID string }
	EKHash       struct{ Hash string }
	PCRPolicySet struct {
		Policy *PCRPolicy // nil clears
	}
	JoinTokens  struct{ Enabled bool }
	TokenCreate struct {
		ID        string // hex SHA-256 of the token
		ExpiresAt time.Time
	}
	TokenUse struct {
		ID    string
		Agent string
	}
	BundleRoots  struct{ Roots [][]byte }
	StateRestore struct {
		State   []byte // exported state JSON
		Archive string // SHA-256 of the archive it came from
	}
	AuditAppend  struct{ Events []AuditEvent }
	JWTKeyRemove struct{ KID string }
	Revoke       struct {
		Serial   string
		Node     string
		NotAfter time.Time
	}
)

func init() {
	register(CmdEntryCreate, applyEntryCreate)
	register(CmdEntryUpdate, applyEntryUpdate)
	register(CmdEntryDelete, applyEntryDelete)
	register(CmdAgentUpsert, applyAgentUpsert)
	register(CmdAgentBan, func(f *FSM, c *Command, i uint64, p *AgentID) (any, []AuditEvent, error) {
		return f.setBanned(c, i, p.ID, true)
	})
	register(CmdAgentUnban, func(f *FSM, c *Command, i uint64, p *AgentID) (any, []AuditEvent, error) {
		return f.setBanned(c, i, p.ID, false)
	})
	register(CmdEKCAAdd, applyEKCAAdd)
	register(CmdEKCARemove, applyEKCARemove)
	register(CmdEKAllowAdd, applyEKAllowAdd)
	register(CmdEKAllowRemove, applyEKAllowRemove)
	register(CmdPCRPolicySet, applyPCRPolicySet)
	register(CmdJoinTokensToggle, func(f *FSM, c *Command, i uint64, p *JoinTokens) (any, []AuditEvent, error) {
		f.d.Policy.JoinTokensDisabled = !p.Enabled
		return nil, []AuditEvent{{Action: c.Type, Detail: map[string]string{"enabled": strconv.FormatBool(p.Enabled)}}}, nil
	})
	register(CmdTokenCreate, applyTokenCreate)
	register(CmdTokenUse, applyTokenUse)
	register(CmdBundleSetRoots, applyBundleRoots)
	register(CmdStateRestore, applyStateRestore)
	register(CmdJWTKeyAdd, applyJWTKeyAdd)
	register(CmdJWTKeyRemove, applyJWTKeyRemove)
	register(CmdRevoke, applyRevoke)
	register(CmdIssue, applyIssue)
	register(CmdAudit, func(f *FSM, c *Command, i uint64, p *AuditAppend) (any, []AuditEvent, error) {
		if len(p.Events) == 0 {
			return nil, nil, refuse("audit.append with no events")
		}
		for _, e := range p.Events {
			if e.Action == "" {
				return nil, nil, refuse("audit event without action")
			}
		}
		return nil, p.Events, nil
	})
}

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

// ValidateEntry checks an entry against the trust domain. The admin API
// runs it before proposing so that operators get the error at once; the FSM
// runs it again because it is the authority.
func ValidateEntry(td spiffeid.TrustDomain, e *Entry) error {
	if !entryIDRE.MatchString(e.ID) {
		return refuse("entry id %q: want 8-64 characters of A-Z a-z 0-9 -", e.ID)
	}
	id, err := spiffeid.FromString(e.SPIFFEID)
	if err != nil {
		return refuse("spiffe_id %q: %v", e.SPIFFEID, err)
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
		return refuse("parent_id %q: %v", e.ParentID, err)
	}
	if !parent.MemberOf(td) {
		return refuse("parent_id %s is not in trust domain %s", parent, td)
	}
	if len(e.Selectors) == 0 {
		return refuse("entry %s has no selectors: it would match every workload", id)
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
	if len(e.Hint) > 64 {
		return refuse("hint is longer than 64 characters")
	}
	return nil
}

func sortSelectors(s []Selector) {
	slices.SortFunc(s, func(a, b Selector) int { return strings.Compare(a.String(), b.String()) })
}

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

// sameEntryExists looks the registration up in an index (rebuilt from the
// entries on restore): a scan per write would make writes O(entries).
func (f *FSM) sameEntryExists(e *Entry) string {
	if f.regIndex == nil {
		f.rebuildIndex()
	}
	if id, ok := f.regIndex[registrationKey(e)]; ok && id != e.ID {
		return id
	}
	return ""
}

func (f *FSM) rebuildIndex() {
	f.regIndex = make(map[string]string, len(f.d.Entries))
	for id, e := range f.d.Entries {
		f.regIndex[registrationKey(e)] = id
	}
}

func entryAudit(action string, e *Entry) AuditEvent {
	sel := make([]string, len(e.Selectors))
	for i, s := range e.Selectors {
		sel[i] = s.String()
	}
	return AuditEvent{Action: action, Target: e.SPIFFEID, Detail: map[string]string{
		"entry": e.ID, "parent": e.ParentID, "selectors": strings.Join(sel, ","), "admin": strconv.FormatBool(e.Admin)}}
}

func applyEntryCreate(f *FSM, c *Command, index uint64, e *Entry) (any, []AuditEvent, error) {
	sortSelectors(e.Selectors)
	if err := ValidateEntry(f.td, e); err != nil {
		return nil, nil, err
	}
	if _, ok := f.d.Entries[e.ID]; ok {
		return nil, nil, refuse("entry id %s already exists", e.ID)
	}
	if dup := f.sameEntryExists(e); dup != "" {
		return nil, nil, refuse("entry %s already registers %s for parent %s with these selectors", dup, e.SPIFFEID, e.ParentID)
	}
	e.CreatedAt, e.UpdatedAt, e.Revision = c.Time, c.Time, index
	f.d.Entries[e.ID] = e
	f.regIndex[registrationKey(e)] = e.ID
	return e, []AuditEvent{entryAudit(c.Type, e)}, nil
}

func applyEntryUpdate(f *FSM, c *Command, index uint64, e *Entry) (any, []AuditEvent, error) {
	sortSelectors(e.Selectors)
	old, ok := f.d.Entries[e.ID]
	if !ok {
		return nil, nil, refuse("no entry %s", e.ID)
	}
	if err := ValidateEntry(f.td, e); err != nil {
		return nil, nil, err
	}
	if dup := f.sameEntryExists(e); dup != "" {
		return nil, nil, refuse("entry %s already registers %s for parent %s with these selectors", dup, e.SPIFFEID, e.ParentID)
	}
	e.CreatedAt, e.UpdatedAt, e.Revision = old.CreatedAt, c.Time, index
	delete(f.regIndex, registrationKey(old))
	f.d.Entries[e.ID] = e
	f.regIndex[registrationKey(e)] = e.ID
	return e, []AuditEvent{entryAudit(c.Type, e)}, nil
}

func applyEntryDelete(f *FSM, c *Command, index uint64, p *EntryID) (any, []AuditEvent, error) {
	e, ok := f.d.Entries[p.ID]
	if !ok {
		return nil, nil, refuse("no entry %s", p.ID)
	}
	delete(f.d.Entries, p.ID)
	if f.regIndex != nil {
		delete(f.regIndex, registrationKey(e))
	}
	return nil, []AuditEvent{entryAudit(c.Type, e)}, nil
}

func applyAgentUpsert(f *FSM, c *Command, index uint64, a *Agent) (any, []AuditEvent, error) {
	id, err := spiffeid.FromString(a.ID)
	if err != nil || !id.MemberOf(f.td) || !strings.HasPrefix(id.Path(), "/sigil/agent/") {
		return nil, nil, refuse("agent id %q: want spiffe://%s/sigil/agent/...", a.ID, f.td.Name())
	}
	if a.AttestationType == "" {
		return nil, nil, refuse("agent %s: attestation type missing", a.ID)
	}
	if old, ok := f.d.Agents[a.ID]; ok {
		if old.Banned {
			return nil, nil, refuse("agent %s is banned", a.ID)
		}
		a.JoinedAt = old.JoinedAt
	} else {
		a.JoinedAt = c.Time
	}
	a.Banned = false
	a.UpdatedAt, a.Revision = c.Time, index
	f.d.Agents[a.ID] = a
	detail := map[string]string{"attestation": a.AttestationType, "serial": a.SerialNumber}
	for k, v := range a.Facts {
		detail["fact."+k] = v
	}
	return a, []AuditEvent{{Action: c.Type, Target: a.ID, Detail: detail}}, nil
}

func (f *FSM) setBanned(c *Command, index uint64, id string, banned bool) (any, []AuditEvent, error) {
	a, ok := f.d.Agents[id]
	if !ok {
		return nil, nil, refuse("no agent %s", id)
	}
	if a.Banned == banned {
		return nil, nil, refuse("agent %s is already %s", id, map[bool]string{true: "banned", false: "not banned"}[banned])
	}
	a.Banned, a.UpdatedAt, a.Revision = banned, c.Time, index
	return a, []AuditEvent{{Action: c.Type, Target: id}}, nil
}

func applyEKCAAdd(f *FSM, c *Command, index uint64, p *EKCAAdd) (any, []AuditEvent, error) {
	cert, err := x509.ParseCertificate(p.DER)
	if err != nil {
		return nil, nil, refuse("EK CA certificate: %v", err)
	}
	if !cert.IsCA {
		return nil, nil, refuse("EK CA certificate %q is not a CA", cert.Subject)
	}
	sum := sha256.Sum256(p.DER)
	ca := EKCA{ID: hex.EncodeToString(sum[:]), Subject: cert.Subject.String(), DER: p.DER}
	for _, o := range f.d.Policy.EKCAs {
		if o.ID == ca.ID {
			return nil, nil, refuse("EK CA %s is already trusted", ca.ID)
		}
	}
	f.d.Policy.EKCAs = append(f.d.Policy.EKCAs, ca)
	return ca, []AuditEvent{{Action: c.Type, Target: ca.ID, Detail: map[string]string{"subject": ca.Subject}}}, nil
}

func applyEKCARemove(f *FSM, c *Command, index uint64, p *EKCARemove) (any, []AuditEvent, error) {
	i := slices.IndexFunc(f.d.Policy.EKCAs, func(e EKCA) bool { return e.ID == p.ID })
	if i < 0 {
		return nil, nil, refuse("no EK CA %s", p.ID)
	}
	ca := f.d.Policy.EKCAs[i]
	f.d.Policy.EKCAs = slices.Delete(f.d.Policy.EKCAs, i, i+1)
	return nil, []AuditEvent{{Action: c.Type, Target: ca.ID, Detail: map[string]string{"subject": ca.Subject}}}, nil
}

func applyEKAllowAdd(f *FSM, c *Command, index uint64, p *EKHash) (any, []AuditEvent, error) {
	h := strings.ToLower(p.Hash)
	if !hexHashRE.MatchString(h) {
		return nil, nil, refuse("EK hash %q: want 64 hex digits (SHA-256 of the EK public key, PKIX DER)", p.Hash)
	}
	if slices.Contains(f.d.Policy.EKAllow, h) {
		return nil, nil, refuse("EK %s is already allowed", h)
	}
	f.d.Policy.EKAllow = append(f.d.Policy.EKAllow, h)
	slices.Sort(f.d.Policy.EKAllow)
	return nil, []AuditEvent{{Action: c.Type, Target: h}}, nil
}

func applyEKAllowRemove(f *FSM, c *Command, index uint64, p *EKHash) (any, []AuditEvent, error) {
	h := strings.ToLower(p.Hash)
	i := slices.Index(f.d.Policy.EKAllow, h)
	if i < 0 {
		return nil, nil, refuse("EK %s is not on the allowlist", h)
	}
	f.d.Policy.EKAllow = slices.Delete(f.d.Policy.EKAllow, i, i+1)
	return nil, []AuditEvent{{Action: c.Type, Target: h}}, nil
}

func applyPCRPolicySet(f *FSM, c *Command, index uint64, p *PCRPolicySet) (any, []AuditEvent, error) {
	if p.Policy != nil {
		if p.Policy.Bank != "sha256" {
			return nil, nil, refuse("PCR bank %q: only sha256 is supported", p.Policy.Bank)
		}
		if len(p.Policy.PCRs) == 0 {
			return nil, nil, refuse("PCR policy names no PCRs")
		}
		for k, v := range p.Policy.PCRs {
			n, err := strconv.Atoi(k)
			if err != nil || n < 0 || n > 23 {
				return nil, nil, refuse("PCR index %q: want 0-23", k)
			}
			if !hexHashRE.MatchString(v) {
				return nil, nil, refuse("PCR %s value %q: want 64 hex digits", k, v)
			}
		}
	}
	f.d.Policy.PCRPolicy = p.Policy
	detail := map[string]string{}
	if p.Policy != nil {
		for k, v := range p.Policy.PCRs {
			detail["pcr"+k] = v
		}
	}
	return nil, []AuditEvent{{Action: c.Type, Detail: detail}}, nil
}

func applyTokenCreate(f *FSM, c *Command, index uint64, p *TokenCreate) (any, []AuditEvent, error) {
	if !hexHashRE.MatchString(p.ID) {
		return nil, nil, refuse("token id must be the token's SHA-256 in hex")
	}
	if !p.ExpiresAt.After(c.Time) {
		return nil, nil, refuse("token would expire before it is created")
	}
	if _, ok := f.d.Tokens[p.ID]; ok {
		return nil, nil, refuse("token %.12s exists", p.ID)
	}
	// Expired tokens are dropped here, deterministically, so the table
	// does not grow forever.
	for _, id := range sortedKeys(f.d.Tokens) {
		if !f.d.Tokens[id].ExpiresAt.After(c.Time) {
			delete(f.d.Tokens, id)
		}
	}
	t := &JoinToken{ID: p.ID, ExpiresAt: p.ExpiresAt.UTC(), CreatedBy: c.Actor, CreatedAt: c.Time}
	f.d.Tokens[p.ID] = t
	return t, []AuditEvent{{Action: c.Type, Target: p.ID[:12], Detail: map[string]string{"expires": t.ExpiresAt.Format(time.RFC3339)}}}, nil
}

func applyTokenUse(f *FSM, c *Command, index uint64, p *TokenUse) (any, []AuditEvent, error) {
	t, ok := f.d.Tokens[p.ID]
	switch {
	case f.d.Policy.JoinTokensDisabled:
		return nil, nil, refuse("join tokens are disabled")
	case !ok:
		return nil, nil, refuse("unknown join token")
	case t.UsedBy != "":
		return nil, nil, refuse("join token %.12s was already used by %s", p.ID, t.UsedBy)
	case !t.ExpiresAt.After(c.Time):
		return nil, nil, refuse("join token %.12s expired at %s", p.ID, t.ExpiresAt.Format(time.RFC3339))
	}
	t.UsedBy, t.UsedAt = p.Agent, c.Time
	return t, []AuditEvent{{Action: c.Type, Target: p.ID[:12], Detail: map[string]string{"agent": p.Agent}}}, nil
}

func applyBundleRoots(f *FSM, c *Command, index uint64, p *BundleRoots) (any, []AuditEvent, error) {
	if len(p.Roots) == 0 {
		return nil, nil, refuse("a trust bundle needs at least one root")
	}
	var fps []string
	for i, der := range p.Roots {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, nil, refuse("root %d: %v", i, err)
		}
		if !cert.IsCA || cert.CheckSignatureFrom(cert) != nil {
			return nil, nil, refuse("root %d (%s) is not a self-signed CA certificate", i, cert.Subject)
		}
		if len(cert.URIs) != 1 || cert.URIs[0].String() != f.td.IDString() {
			return nil, nil, refuse("root %d (%s) is not a root of %s", i, cert.Subject, f.td.IDString())
		}
		sum := sha256.Sum256(der)
		fps = append(fps, hex.EncodeToString(sum[:]))
	}
	f.d.Bundle.Roots = p.Roots
	f.d.Bundle.Sequence++
	return f.d.Bundle, []AuditEvent{{Action: c.Type, Detail: map[string]string{
		"roots": strings.Join(fps, ","), "sequence": fmt.Sprint(f.d.Bundle.Sequence)}}}, nil
}

// applyStateRestore replaces the whole state with an archived one. The new
// state is checked first (trust domain, audit chain); the restore itself is
// then audited on top of the restored chain, so the log shows it.
func applyStateRestore(f *FSM, c *Command, index uint64, p *StateRestore) (any, []AuditEvent, error) {
	d, err := f.decodeData(p.State)
	if err != nil {
		return nil, nil, refuse("restore: %v", err)
	}
	prevSeq, prevHash := uint64(0), ""
	if n := len(f.d.Audit); n > 0 {
		prevSeq, prevHash = f.d.Audit[n-1].Seq, f.d.Audit[n-1].Hash
	}
	f.d = d
	f.regIndex = nil
	return nil, []AuditEvent{{Action: c.Type, Detail: map[string]string{
		"archive_sha256":   p.Archive,
		"restored_index":   fmt.Sprint(d.Index),
		"replaced_head":    fmt.Sprintf("%d:%.16s", prevSeq, prevHash),
		"restored_entries": fmt.Sprint(len(d.Entries)),
	}}}, nil
}

// nodeOf returns the node name of a node actor, or "".
func (f *FSM) nodeOf(actor string) string {
	id, err := spiffeid.FromString(actor)
	if err != nil || !id.MemberOf(f.td) {
		return ""
	}
	name, ok := strings.CutPrefix(id.Path(), "/sigil/node/")
	if !ok {
		return ""
	}
	return name
}

var kidRE = regexp.MustCompile(`^[A-Za-z0-9_-]{8,64}$`)

// applyJWTKeyAdd publishes a node's JWT key. Only the node itself may
// publish its keys, so a compromised admin cannot slip a key into the
// bundle under a node's name.
func applyJWTKeyAdd(f *FSM, c *Command, index uint64, k *JWTKey) (any, []AuditEvent, error) {
	if node := f.nodeOf(c.Actor); node == "" || node != k.Node {
		return nil, nil, refuse("JWT key for node %q proposed by %s: a node publishes only its own keys", k.Node, c.Actor)
	}
	if !kidRE.MatchString(k.KID) {
		return nil, nil, refuse("kid %q: want 8-64 characters of A-Z a-z 0-9 _ -", k.KID)
	}
	pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
	if err != nil {
		return nil, nil, refuse("JWT key %s: %v", k.KID, err)
	}
	if _, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok {
		return nil, nil, refuse("JWT key %s: unsupported key type %T", k.KID, pub)
	}
	if !k.NotAfter.After(c.Time) {
		return nil, nil, refuse("JWT key %s would be published already expired", k.KID)
	}
	for _, o := range f.d.Bundle.JWTKeys {
		if o.KID == k.KID {
			return nil, nil, refuse("kid %s is already in the bundle", k.KID)
		}
	}
	f.d.Bundle.JWTKeys = append(f.d.Bundle.JWTKeys, *k)
	f.d.Bundle.Sequence++
	return f.d.Bundle, []AuditEvent{{Action: c.Type, Target: k.KID, Detail: map[string]string{
		"node": k.Node, "not_after": k.NotAfter.UTC().Format(time.RFC3339), "sequence": fmt.Sprint(f.d.Bundle.Sequence)}}}, nil
}

// applyJWTKeyRemove retires a key; only after every token it signed has
// expired (its NotAfter), so validators never lose a key they still need.
func applyJWTKeyRemove(f *FSM, c *Command, index uint64, p *JWTKeyRemove) (any, []AuditEvent, error) {
	i := slices.IndexFunc(f.d.Bundle.JWTKeys, func(k JWTKey) bool { return k.KID == p.KID })
	if i < 0 {
		return nil, nil, refuse("no JWT key %s in the bundle", p.KID)
	}
	k := f.d.Bundle.JWTKeys[i]
	if k.NotAfter.After(c.Time) {
		return nil, nil, refuse("JWT key %s may still have valid tokens until %s", p.KID, k.NotAfter.UTC().Format(time.RFC3339))
	}
	f.d.Bundle.JWTKeys = slices.Delete(f.d.Bundle.JWTKeys, i, i+1)
	f.d.Bundle.Sequence++
	return nil, []AuditEvent{{Action: c.Type, Target: p.KID, Detail: map[string]string{"node": k.Node, "sequence": fmt.Sprint(f.d.Bundle.Sequence)}}}, nil
}

var serialRE = regexp.MustCompile(`^[0-9a-f]{1,40}$`)

func applyRevoke(f *FSM, c *Command, index uint64, p *Revoke) (any, []AuditEvent, error) {
	s := strings.ToLower(strings.TrimLeft(p.Serial, "0"))
	if !serialRE.MatchString(s) {
		return nil, nil, refuse("serial %q: want hex", p.Serial)
	}
	if p.Node == "" {
		return nil, nil, refuse("revocation of %s names no issuing node", s)
	}
	for _, r := range f.d.Bundle.Revoked {
		if r.Serial == s && r.Node == p.Node {
			return nil, nil, refuse("serial %s of node %s is already revoked", s, p.Node)
		}
	}
	// Expired revocations are dropped: an expired certificate is refused
	// anyway, and the CRL stays small.
	f.d.Bundle.Revoked = slices.DeleteFunc(f.d.Bundle.Revoked, func(r Revocation) bool { return !r.NotAfter.After(c.Time) })
	f.d.Bundle.Revoked = append(f.d.Bundle.Revoked, Revocation{Serial: s, Node: p.Node, NotAfter: p.NotAfter.UTC(), At: c.Time})
	f.d.Bundle.Sequence++
	return nil, []AuditEvent{{Action: c.Type, Target: s, Detail: map[string]string{"node": p.Node, "not_after": p.NotAfter.UTC().Format(time.RFC3339)}}}, nil
}

// IssueResult lists the events of an svid.issue command the FSM refused.
type IssueResult struct {
	Refused []int `json:"refused,omitempty"`
}

// applyIssue records issuances, checking at commit time, in log order,
// that each requesting agent is known and not banned: a ban committed
// before this record makes it a refusal, whatever the issuing node saw.
func applyIssue(f *FSM, c *Command, index uint64, p *AuditAppend) (any, []AuditEvent, error) {
	if len(p.Events) == 0 {
		return nil, nil, refuse("svid.issue with no events")
	}
	res := &IssueResult{}
	events := make([]AuditEvent, 0, len(p.Events))
	for i, e := range p.Events {
		if e.Action == "" {
			return nil, nil, refuse("issue event without action")
		}
		if strings.HasSuffix(e.Action, ".issue") {
			a, ok := f.d.Agents[e.Detail["agent"]]
			if !ok || a.Banned {
				res.Refused = append(res.Refused, i)
				reason := "agent is banned"
				if !ok {
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
