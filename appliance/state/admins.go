package state

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Admin roles. A certificate's role is what the state recorded when it
// was issued (AdminCertRole); a certificate the state has no record of (made
// outside the admin API, such as a test harness's, or expired and
// forgotten) is a plain admin. Commands of version 2 took the role of the
// name's last issuance, and still do when an old log is replayed.
const (
	// RoleAdmin administers the appliance and may renew its own
	// certificate (same name, same role) and revoke its own name.
	RoleAdmin = "admin"
	// RoleAdminIssuer may also issue certificates for any admin name and
	// role, and revoke any admin name.
	RoleAdminIssuer = "admin-issuer"
)

// Admin commands.
const (
	CmdAdminIssue  = "admin.issue"
	CmdAdminRevoke = "admin.revoke"
)

// Bounds of the admin table: it is one stored value (and one snapshot
// frame), rewritten at each issuance.
const (
	MaxAdmins     = 512
	MaxAdminCerts = 16
)

// MaxAdminCertTTL bounds the validity of every admin certificate a node
// accepts (a node refuses an admin-cert-max-ttl above it). The admin table
// relies on it to forget a name: once every certificate a revocation
// revoked has expired, the revocation decides nothing any more.
const MaxAdminCertTTL = 7 * 24 * time.Hour

// adminForgetAfter is how long a revocation is kept after it was made:
// MaxAdminCertTTL, and an hour for the clocks of the node that stamped the
// revocation and the nodes that signed the certificates to disagree.
const adminForgetAfter = MaxAdminCertTTL + time.Hour

// AdminNameRE is what an admin name may be: the last segment of
// spiffe://<td>/sigil/admin/<name>.
var AdminNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// AdminRecord is what the state knows of one admin name.
type AdminRecord struct {
	Name string `json:"name"`
	// Role is the role of the name's last issuance: what an issuance for
	// the name that asks for no role gives. Each certificate's own role
	// is in Certs, and that is the one its calls have.
	Role     string    `json:"role"`
	IssuedBy string    `json:"issued_by,omitempty"`
	IssuedAt time.Time `json:"issued_at,omitzero"`
	// RevokedAt is when the name was last revoked. From then on only
	// certificates in Certs (issued through the appliance after the
	// revocation) are accepted for this name.
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	RevokedBy string    `json:"revoked_by,omitempty"`
	// Certs are the unexpired certificates issued for this name since its
	// last revocation (or ever, if never revoked).
	Certs    []AdminCert `json:"certs,omitempty"`
	Revision uint64      `json:"revision"`
}

// AdminCert is one admin certificate the appliance issued.
type AdminCert struct {
	Serial   string    `json:"serial"` // hex, lowercase, no leading zeros
	Node     string    `json:"node"`   // whose issuing CA signed it
	Role     string    `json:"role"`
	NotAfter time.Time `json:"not_after"`
}

// Accepts says whether a certificate with this serial may act for the
// name: any certificate until the name is first revoked, afterwards only
// those issued since the last revocation.
func (r *AdminRecord) Accepts(serial string) bool {
	if r.RevokedAt.IsZero() {
		return true
	}
	return slices.ContainsFunc(r.Certs, func(c AdminCert) bool { return c.Serial == serial })
}

// AdminIssue records an admin certificate before it is handed out. Role
// "" keeps the name's current role (admin for a new name).
type AdminIssue struct {
	Name     string    `json:"name"`
	Role     string    `json:"role,omitempty"`
	Serial   string    `json:"serial"`
	Node     string    `json:"node"`
	NotAfter time.Time `json:"not_after"`
}

// AdminRevoke revokes every certificate of an admin name issued so far.
type AdminRevoke struct {
	Name string `json:"name"`
}

var keyAdmins = []byte("admins")

func init() {
	register(CmdAdminIssue, byAdmin, applyAdminIssue)
	register(CmdAdminRevoke, byAdmin, applyAdminRevoke)
}

func validRole(r string) bool { return r == RoleAdmin || r == RoleAdminIssuer }

// ResolveAdminRole is the role an issuance of name with the requested
// role gives, against the current record (nil: none): the requested one,
// else the role of the name's last issuance, else RoleAdmin. Root on a
// node's socket and version 2 commands decide with this alone.
func ResolveAdminRole(cur *AdminRecord, requested string) string {
	switch {
	case requested != "":
		return requested
	case cur != nil && cur.Role != "":
		return cur.Role
	}
	return RoleAdmin
}

// ResolveAdminRoleBy is ResolveAdminRole for an issuance requested by the
// admin certificate of role callerRole named caller: a certificate that
// renews its own name without asking for a role keeps its own role (roles
// belong to certificates, so a plain certificate of a name that was since
// issued as an issuer renews as a plain admin, as MayIssueAdmin wants).
func ResolveAdminRoleBy(cur *AdminRecord, requested, caller, callerRole, name string) string {
	if requested == "" && caller == name {
		return callerRole
	}
	return ResolveAdminRole(cur, requested)
}

// MayIssueAdmin decides whether an admin whose own role is callerRole,
// named caller, may have a certificate issued for name with role: an
// issuer may issue anything; a plain admin only its own name as a plain
// admin (its renewal). Root on a node's local socket is not an admin
// certificate and is not asked.
func MayIssueAdmin(caller, callerRole, name, role string) error {
	if callerRole == RoleAdminIssuer {
		return nil
	}
	if name != caller {
		return fmt.Errorf("admin %s (role %s) may issue certificates only for its own name, not for %s (that takes role %s)", caller, callerRole, name, RoleAdminIssuer)
	}
	if role != RoleAdmin {
		return fmt.Errorf("admin %s (role %s) may not give itself role %s", caller, callerRole, role)
	}
	return nil
}

// MayRevokeAdmin: an issuer may revoke any name, any admin its own.
func MayRevokeAdmin(caller, callerRole, name string) error {
	if callerRole == RoleAdminIssuer || name == caller {
		return nil
	}
	return fmt.Errorf("admin %s (role %s) may revoke only its own name, not %s (that takes role %s)", caller, callerRole, name, RoleAdminIssuer)
}

// AdminCertRole is the role of the admin certificate with this serial
// acting for name: the role it was issued with, as the table recorded it,
// or RoleAdmin for a certificate the table has no record of. A role belongs
// to the certificate, not to the name: re-issuing a name with another role
// changes nothing for the certificates issued before.
func AdminCertRole(admins []AdminRecord, name, serial string) string {
	if r := FindAdmin(admins, name); r != nil {
		for _, c := range r.Certs {
			if c.Serial == serial && validRole(c.Role) {
				return c.Role
			}
		}
	}
	return RoleAdmin
}

// AdminRoleOf is the role of an admin name's last issuance (RoleAdmin when
// it has no record): the caller's role for commands of version 2, which
// carry no certificate serial.
func AdminRoleOf(admins []AdminRecord, name string) string {
	if r := FindAdmin(admins, name); r != nil && r.Role != "" {
		return r.Role
	}
	return RoleAdmin
}

// FindAdmin returns name's record in an admin table, or nil.
func FindAdmin(admins []AdminRecord, name string) *AdminRecord {
	i, ok := slices.BinarySearchFunc(admins, name, func(r AdminRecord, n string) int { return strings.Compare(r.Name, n) })
	if !ok {
		return nil
	}
	return &admins[i]
}

// readAdmins decodes the admin table, ordered by name.
func readAdmins(tx *bolt.Tx) ([]AdminRecord, error) {
	var admins []AdminRecord
	if _, err := getJSON(tx.Bucket(bMeta), keyAdmins, &admins); err != nil {
		return nil, fmt.Errorf("admin table: %w", err)
	}
	return admins, nil
}

func putAdmins(tx *bolt.Tx, admins []AdminRecord) error {
	return putJSON(tx.Bucket(bMeta), keyAdmins, admins)
}

// checkAdmins validates a stored admin table (from a snapshot stream) as
// the commands would have written it.
func checkAdmins(admins []AdminRecord) error {
	if len(admins) > MaxAdmins {
		return fmt.Errorf("%d admin names; at most %d", len(admins), MaxAdmins)
	}
	for i, r := range admins {
		if !AdminNameRE.MatchString(r.Name) {
			return fmt.Errorf("admin name %q malformed", truncate(r.Name, 80))
		}
		if i > 0 && admins[i-1].Name >= r.Name {
			return fmt.Errorf("admin table not ordered by name at %s", r.Name)
		}
		if !validRole(r.Role) {
			return fmt.Errorf("admin %s: role %q", r.Name, truncate(r.Role, 32))
		}
		if len(r.Certs) > MaxAdminCerts {
			return fmt.Errorf("admin %s: %d certificates; at most %d", r.Name, len(r.Certs), MaxAdminCerts)
		}
		for _, c := range r.Certs {
			if !serialRE.MatchString(c.Serial) || c.Node == "" || len(c.Node) > 64 || !validRole(c.Role) {
				return fmt.Errorf("admin %s: certificate %q malformed", r.Name, truncate(c.Serial, 64))
			}
		}
	}
	return nil
}

func adminSPIFFEID(td, name string) string { return "spiffe://" + td + "/sigil/admin/" + name }

// callerRole is the admin role of the command's actor: that of the
// certificate that made the call (version 3), or of the name (version 2,
// as those commands were first applied); local is root on a node's socket,
// which may do anything.
func (t *txn) callerRole(admins []AdminRecord) (name, role string, local bool) {
	kind, n := t.f.actorKind(t.c.Actor)
	if kind == "local" {
		return "", "", true
	}
	if t.c.Version < 3 {
		return n, AdminRoleOf(admins, n), false
	}
	return n, AdminCertRole(admins, n, t.c.ActorSerial), false
}

// readAdminsForChange reads the admin table for a command that rewrites
// it, forgetting (from version 3 on, so that old logs replay as they were
// applied) the records that decide nothing any more at the command's time.
func (t *txn) readAdminsForChange() ([]AdminRecord, error) {
	admins, err := readAdmins(t.tx)
	if err != nil || t.c.Version < 3 {
		return admins, err
	}
	return forgetAdmins(admins, t.c.Time), nil
}

// forgetAdmins drops the records of names that no recorded certificate
// can act for any more at now, and whose revocation, if any, is older
// than adminForgetAfter: every certificate it revoked has expired, so the
// name is as good as one never recorded (a certificate made for it outside
// the API is a plain admin, like any unrecorded one). Without this the
// table would fill up with names over the years (MaxAdmins).
func forgetAdmins(admins []AdminRecord, now time.Time) []AdminRecord {
	return slices.DeleteFunc(admins, func(r AdminRecord) bool {
		if slices.ContainsFunc(r.Certs, func(c AdminCert) bool { return c.NotAfter.After(now) }) {
			return false
		}
		return r.RevokedAt.IsZero() || !r.RevokedAt.Add(adminForgetAfter).After(now)
	})
}

// applyAdminIssue records an admin certificate, checking at commit time,
// in log order, that the caller may issue it: a role changed or a name
// revoked by an earlier command decides.
func applyAdminIssue(t *txn, p *AdminIssue) (any, []AuditEvent, error) {
	serial := strings.ToLower(p.Serial)
	switch {
	case !AdminNameRE.MatchString(p.Name):
		return nil, nil, refuse("admin name %q: want %s", truncate(p.Name, 80), AdminNameRE)
	case p.Role != "" && !validRole(p.Role):
		return nil, nil, refuse("admin role %q: want %s or %s", truncate(p.Role, 32), RoleAdmin, RoleAdminIssuer)
	case !serialRE.MatchString(serial) || strings.HasPrefix(serial, "0"):
		return nil, nil, refuse("serial %q: want hex without leading zeros", truncate(p.Serial, 80))
	case p.Node != t.origin:
		return nil, nil, refuse("admin certificate recorded for node %q by node %s: a node records only what it signed", truncate(p.Node, 64), t.origin)
	case !p.NotAfter.After(t.c.Time):
		return nil, nil, refuse("admin certificate %s would be recorded already expired", serial)
	}
	admins, err := t.readAdminsForChange()
	if err != nil {
		return nil, nil, err
	}
	cur := FindAdmin(admins, p.Name)
	role := ResolveAdminRole(cur, p.Role)
	if caller, callerRole, local := t.callerRole(admins); !local {
		if t.c.Version >= 3 {
			role = ResolveAdminRoleBy(cur, p.Role, caller, callerRole, p.Name)
		}
		if err := MayIssueAdmin(caller, callerRole, p.Name, role); err != nil {
			return nil, nil, refuse("%v", err)
		}
	}
	if cur == nil {
		if len(admins) >= MaxAdmins {
			return nil, nil, refuse("%d admin names are recorded; at most %d", len(admins), MaxAdmins)
		}
		i, _ := slices.BinarySearchFunc(admins, p.Name, func(r AdminRecord, n string) int { return strings.Compare(r.Name, n) })
		admins = slices.Insert(admins, i, AdminRecord{Name: p.Name})
		cur = &admins[i]
	}
	cur.Certs = slices.DeleteFunc(cur.Certs, func(c AdminCert) bool { return !c.NotAfter.After(t.c.Time) })
	if slices.ContainsFunc(cur.Certs, func(c AdminCert) bool { return c.Serial == serial }) {
		return nil, nil, refuse("admin certificate %s is already recorded", serial)
	}
	if len(cur.Certs) >= MaxAdminCerts {
		return nil, nil, refuse("admin %s has %d unexpired certificates; at most %d (revoke the name to start over)", p.Name, len(cur.Certs), MaxAdminCerts)
	}
	cur.Certs = append(cur.Certs, AdminCert{Serial: serial, Node: p.Node, Role: role, NotAfter: p.NotAfter.UTC()})
	cur.Role, cur.IssuedBy, cur.IssuedAt, cur.Revision = role, truncate(t.c.Actor, maxActor), t.c.Time, t.index
	out := *cur
	return &out, []AuditEvent{{Action: t.c.Type, Target: adminSPIFFEID(t.f.td.Name(), p.Name), Detail: map[string]string{
		"role": role, "serial": serial, "node": p.Node, "not_after": p.NotAfter.UTC().Format(time.RFC3339)}}}, putAdmins(t.tx, admins)
}

// applyAdminRevoke revokes every certificate issued so far for a name,
// whether the appliance recorded it or not: from this command on, only
// certificates issued after it are accepted for the name.
func applyAdminRevoke(t *txn, p *AdminRevoke) (any, []AuditEvent, error) {
	if !AdminNameRE.MatchString(p.Name) {
		return nil, nil, refuse("admin name %q: want %s", truncate(p.Name, 80), AdminNameRE)
	}
	admins, err := t.readAdminsForChange()
	if err != nil {
		return nil, nil, err
	}
	if caller, callerRole, local := t.callerRole(admins); !local {
		if err := MayRevokeAdmin(caller, callerRole, p.Name); err != nil {
			return nil, nil, refuse("%v", err)
		}
	}
	cur := FindAdmin(admins, p.Name)
	if cur == nil {
		if len(admins) >= MaxAdmins {
			return nil, nil, refuse("%d admin names are recorded; at most %d", len(admins), MaxAdmins)
		}
		i, _ := slices.BinarySearchFunc(admins, p.Name, func(r AdminRecord, n string) int { return strings.Compare(r.Name, n) })
		admins = slices.Insert(admins, i, AdminRecord{Name: p.Name, Role: RoleAdmin})
		cur = &admins[i]
	} else if !cur.RevokedAt.IsZero() && len(cur.Certs) == 0 {
		return nil, nil, refuse("admin %s is already revoked (at %s) and no certificate was issued for it since", p.Name, cur.RevokedAt.Format(time.RFC3339))
	}
	dropped := len(cur.Certs)
	cur.Certs = nil
	cur.RevokedAt, cur.RevokedBy, cur.Revision = t.c.Time, truncate(t.c.Actor, maxActor), t.index
	out := *cur
	return &out, []AuditEvent{{Action: t.c.Type, Target: adminSPIFFEID(t.f.td.Name(), p.Name), Detail: map[string]string{
		"recorded_certs": strconv.Itoa(dropped)}}}, putAdmins(t.tx, admins)
}

// AdminRevokedMarker is in the refusal of a command by a revoked admin
// certificate, so that the API can answer it as an authentication failure.
const AdminRevokedMarker = "admin certificate revoked"

// checkActorSerial checks the envelope's actor_serial against its version
// and actor. Version 3 requires the serial of an admin certificate's
// command (a node of this version always sends it) and refuses one on any
// other actor's. Version 2 had no such field and its nodes refused it as
// unknown, so a version 2 command carrying one is refused as it was then.
func (f *FSM) checkActorSerial(c *Command) error {
	kind, _ := f.actorKind(c.Actor)
	switch {
	case c.Version < 3:
		if c.ActorSerial != "" {
			return refuse("malformed command: actor_serial is a field of version 3 commands, not of version %d", c.Version)
		}
	case kind == "admin":
		if !serialRE.MatchString(c.ActorSerial) || strings.HasPrefix(c.ActorSerial, "0") {
			return refuse("%s by admin %s: actor_serial %q: want the admin certificate's serial in lowercase hex without leading zeros",
				c.Type, c.Actor, truncate(c.ActorSerial, 64))
		}
	case c.ActorSerial != "":
		return refuse("%s by %s: actor_serial is for admin certificates only", c.Type, truncate(c.Actor, 128))
	}
	return nil
}

// checkAdminActor refuses, at commit and in log order, a command of an
// admin certificate that may no longer act for its name: the command came
// through a replica that had not applied the revocation yet (a lagging or
// restarting one). From version 3 on the command names its certificate,
// which must be one the name's record accepts (AdminRecord.Accepts), so a
// name revoked and re-issued does not revive its old certificates. A
// version 2 command names none, and is refused, as it was then, only when
// no unexpired certificate issued since the revocation holds the name.
func (t *txn) checkAdminActor() error {
	kind, name := t.f.actorKind(t.c.Actor)
	if kind != "admin" {
		return nil
	}
	admins, err := readAdmins(t.tx)
	if err != nil {
		return err
	}
	r := FindAdmin(admins, name)
	if r == nil || r.RevokedAt.IsZero() {
		return nil
	}
	if t.c.Version >= 3 {
		if r.Accepts(t.c.ActorSerial) {
			return nil
		}
		return refuse("%s by admin %s: %s: certificate %s was not issued since the name was revoked at %s by %s", t.c.Type, name,
			AdminRevokedMarker, t.c.ActorSerial, r.RevokedAt.Format(time.RFC3339), r.RevokedBy)
	}
	if slices.ContainsFunc(r.Certs, func(c AdminCert) bool { return c.NotAfter.After(t.c.Time) }) {
		return nil
	}
	return refuse("%s by admin %s: %s: the name was revoked at %s by %s and holds no certificate issued since", t.c.Type, name,
		AdminRevokedMarker, r.RevokedAt.Format(time.RFC3339), r.RevokedBy)
}

// Admins returns the admin table, ordered by name. An unreadable table is
// an error: callers that authorize admins must refuse then.
func (f *FSM) Admins() ([]AdminRecord, error) {
	var out []AdminRecord
	err := f.view(func(tx *bolt.Tx) error {
		var err error
		out, err = readAdmins(tx)
		return err
	})
	return out, err
}

// Admin returns one admin name's record; ok is false when the state has
// none.
func (f *FSM) Admin(name string) (rec AdminRecord, ok bool, err error) {
	admins, err := f.Admins()
	if err != nil {
		return AdminRecord{}, false, err
	}
	if r := FindAdmin(admins, name); r != nil {
		return *r, true, nil
	}
	return AdminRecord{}, false, nil
}
