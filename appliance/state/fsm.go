// Package state is the appliance's replicated state machine: registration
// entries, attested agents, the TPM join policy, one-time join tokens, the
// trust bundle, revocations, the index of issued X.509-SVIDs and the
// hash-chained audit log.
//
// The data lives in a bbolt file, one bucket per kind with indexes where
// queries need them, so memory holds only caches and the audit chain head
// whatever the history. The file is rebuilt from raft (snapshot, then log)
// every time the node starts, so it is written without fsync: raft's own
// log is the durable copy.
//
// State changes only through typed, versioned commands applied in raft log
// order. Apply is deterministic: it reads time from the command (stamped by
// the proposer), never from the clock, and refuses unknown command types or
// versions rather than guess, so replicas cannot diverge. Every change
// appends an audit record in the same transaction; a refused command changes
// nothing. Who may propose what is checked against the raft origin, the
// authenticated member that proposed the command.
package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	bolt "go.etcd.io/bbolt"
)

// CommandVersion is the command envelope version this code writes.
// Version 2: payloads have explicit JSON field names and commands are
// checked against their raft origin. Version 3: an admin certificate's
// command carries the certificate's serial (actor_serial), and the state
// machine decides the admin's standing and role by that certificate, not
// by its name; an agent renewal names the certificate it replaces.
// Version 4: an entry's selectors must be ones sigil-agent produces, and
// an entry update that names a revision applies only to that revision
// (EntryRulesVersion). Version 5: a renewal may name the certificate the
// agent's last renewal replaced, within RenewGrace of that renewal
// (RenewGraceVersion). Version 6: job identity (join rules, job.join,
// job.end; JobVersion), and IP SANs on entries (IPSANVersion). Version
// 7: SPIFFE federation (relationships, foreign bundles, entries'
// federates_with; FederationVersion). Version 8: a node's issuing CA
// renewed while it runs (CmdNodeCAInstall, NodeCAInstallVersion).
// Version 9: phased root rotation (bundle.root.*, node.issuing-ca.stage,
// agent.bundle.ack; RootRotationVersion). The
// rules a version brings apply to its commands only: a log of version 2
// commands replays exactly as it was first applied.
const CommandVersion = RootRotationVersion

// minCommandVersion is the oldest envelope version this code still
// applies (raft logs and snapshots written before the last upgrade).
const minCommandVersion = 2

// MaxCommandSize bounds one command; a restore of a large state is the
// biggest legitimate one.
const MaxCommandSize = 48 << 20

// Command is the envelope of every replicated change.
type Command struct {
	Version int    `json:"v"`
	Type    string `json:"type"`
	Actor   string `json:"actor"` // SPIFFE ID of the admin, node or agent
	// ActorSerial is the serial (lowercase hex, no leading zeros) of the
	// admin certificate that made the call; version 3, admins only.
	ActorSerial string          `json:"actor_serial,omitempty"`
	Time        time.Time       `json:"time"` // stamped by the proposer
	Payload     json.RawMessage `json:"payload"`
}

// NewCommand builds an encoded command of a node, or of root on a node's
// local socket. An admin certificate's command is NewAdminCommand.
func NewCommand(typ, actor string, now time.Time, payload any) ([]byte, error) {
	return newCommand(typ, actor, "", now, payload)
}

// NewAdminCommand builds an encoded command of the admin certificate with
// this serial (hex): the state machine checks, at commit and in log
// order, that this certificate may still act for the admin's name and
// takes the admin's role from it.
func NewAdminCommand(typ, actor, serial string, now time.Time, payload any) ([]byte, error) {
	return newCommand(typ, actor, serial, now, payload)
}

func newCommand(typ, actor, serial string, now time.Time, payload any) ([]byte, error) {
	p, err := json.Marshal(payload)
	if err != nil {
		return nil, err
	}
	return json.Marshal(Command{Version: CommandVersion, Type: typ, Actor: actor, ActorSerial: serial, Time: now.UTC(), Payload: p})
}

// ErrRefused wraps every refusal of a command, with the reason.
var ErrRefused = errors.New("refused")

func refuse(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, a...))
}

// Options configure an FSM.
type Options struct {
	// Path is the state file. It is recreated by Open: raft restores it.
	Path   string
	NodeID string // this node, named in the segments it exports
	Logger *slog.Logger
	// ExportDir receives a signed JSON-lines segment of every range of
	// audit records that a prune removes; "" keeps no copy (tests).
	ExportDir string
	// SignHead signs a checkpoint digest with the node's issuing key and
	// returns the signature and the issuing certificate (DER); it signs
	// exported segments. Nil leaves segments unsigned.
	SignHead func(digest []byte) (sig, certDER []byte, err error)
	// SnapshotRate paces raft snapshots (bytes per second; 0: as fast as
	// the disk takes them), so that writing a large state does not take
	// the CPU and the disk from the commits that go on meanwhile.
	SnapshotRate int64
}

// FSM is the state of one replica.
type FSM struct {
	td   spiffeid.TrustDomain
	opts Options
	log  *slog.Logger

	// dbMu guards the db pointer: readers share it, a raft snapshot
	// restore swaps in a new file under the write lock.
	dbMu sync.RWMutex
	db   *bolt.DB

	applied atomic.Uint64

	mu       sync.Mutex // watchers
	watch    chan struct{}
	cfgWatch chan struct{}
	// fedWatch is closed when a federation relationship or a foreign
	// bundle changes (and at a restore): the leader's fetch loop reads
	// the relationships again only then, not at every agent's renewal.
	fedWatch chan struct{}
	// agentWatch: one channel per agent someone waits on (AgentChanged),
	// closed when that agent's view changes. A change to one agent's
	// entries wakes its own stream only, not every agent's.
	agentWatch map[string]chan struct{}

	// Caches of small, hot values, replaced after each change.
	bundle     atomic.Pointer[Bundle]
	policy     atomic.Pointer[JoinPolicy]
	head       atomic.Pointer[AuditHead]
	checkpoint atomic.Uint64
	rootCRLs   atomic.Pointer[rootCRLCache] // crl.go

	exportFailures atomic.Uint64
}

// AuditHead is the newest audit record's sequence number and hash, and the
// first record still retained.
type AuditHead struct {
	Seq   uint64 `json:"seq"`
	Hash  string `json:"hash"`
	First uint64 `json:"first"`
}

// Open creates an empty state file at opts.Path (removing an old one) for a
// trust domain.
func Open(td spiffeid.TrustDomain, opts Options) (*FSM, error) {
	if opts.Path == "" {
		return nil, errors.New("state: no path")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	f := &FSM{td: td, opts: opts, log: opts.Logger.With("component", "state"),
		watch: make(chan struct{}), cfgWatch: make(chan struct{}), fedWatch: make(chan struct{})}
	if err := os.MkdirAll(filepath.Dir(opts.Path), 0o700); err != nil {
		return nil, err
	}
	db, err := openDB(opts.Path)
	if err != nil {
		return nil, err
	}
	f.db = db
	if err := f.loadCaches(); err != nil {
		_ = db.Close() // a fresh file nobody else uses: the load error is the one to report
		return nil, err
	}
	return f, nil
}

// openDB makes a fresh state file. NoSync is safe because the file is never
// trusted across a restart; the large initial mmap keeps a long snapshot
// read transaction from blocking writers that grow the file.
func openDB(path string) (*bolt.DB, error) {
	for _, p := range []string{path, path + ".restore"} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("state: remove old %s: %w", p, err)
		}
	}
	return createDB(path)
}

func createDB(path string) (*bolt.DB, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout: time.Second, NoSync: true, NoGrowSync: true, NoFreelistSync: true, FreelistType: bolt.FreelistMapType,
		InitialMmapSize: 4 << 30,
	})
	if err != nil {
		return nil, fmt.Errorf("state: open %s: %w", path, err)
	}
	if err := db.Update(createBuckets); err != nil {
		_ = db.Close() // the file is unusable either way: report why
		return nil, err
	}
	return db, nil
}

// Close releases the state file.
func (f *FSM) Close() error {
	f.dbMu.Lock()
	defer f.dbMu.Unlock()
	if f.db == nil {
		return nil
	}
	err := f.db.Close()
	f.db = nil
	return err
}

// TrustDomain is the trust domain this state belongs to.
func (f *FSM) TrustDomain() spiffeid.TrustDomain { return f.td }

// view runs fn in a read transaction.
func (f *FSM) view(fn func(tx *bolt.Tx) error) error {
	f.dbMu.RLock()
	defer f.dbMu.RUnlock()
	if f.db == nil {
		return errors.New("state: closed")
	}
	return f.db.View(fn)
}

// read is view for the queries that have no error to return: a failure (the
// store closed, a stored value unreadable) is logged, and the query answers
// with what it had read before it, or not found.
func (f *FSM) read(query string, fn func(tx *bolt.Tx) error) bool {
	if err := f.view(fn); err != nil {
		f.log.Error("state read failed", "query", query, "err", err)
		return false
	}
	return true
}

// AuditEvent is an audit record before it is chained.
type AuditEvent struct {
	Action string            `json:"action"`
	Target string            `json:"target,omitempty"`
	Detail map[string]string `json:"detail,omitempty"`
}

// txn is one command being applied: the bolt transaction and what the
// handlers need to know about the command.
type txn struct {
	tx     *bolt.Tx
	f      *FSM
	c      *Command
	index  uint64
	origin string
	// what changed, for caches and watchers
	bundleChanged, policyChanged, configChanged bool
	// bundleQuiet: the bundle changed in a way only the agents touched in
	// this command need to hear of (revocations of their own SVIDs).
	bundleQuiet bool
	// a federation relationship or a foreign bundle changed: agents'
	// federated bundles, so every agent's view (federation.go)
	federationChanged bool
	// agents whose view changed (their entries, their own record); a
	// config change that names none changes every agent's view
	agentsChanged map[string]bool
	// head is the audit head while records are appended (nil: untouched)
	head *AuditHead
}

// handler applies one command type. It returns the response for the
// proposer and the audit events for the change.
type handler func(t *txn) (any, []AuditEvent, error)

type registration struct {
	h     handler
	allow actorRule
}

var handlers = map[string]registration{}

// register binds a command type to a typed handler with strict payload
// decoding and the actors that may propose it. Called from init only.
func register[P any](typ string, allow actorRule, fn func(t *txn, p *P) (any, []AuditEvent, error)) {
	handlers[typ] = registration{allow: allow, h: func(t *txn) (any, []AuditEvent, error) {
		var p P
		dec := json.NewDecoder(bytes.NewReader(t.c.Payload))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&p); err != nil {
			return nil, nil, refuse("%s payload: %v", t.c.Type, err)
		}
		return fn(t, &p)
	}}
}

// Apply applies one command at a raft index. origin is the member that
// proposed it, as raft authenticated it.
//
// A refusal is deterministic: every replica refuses the same command. Any
// other error (a disk that fails, a state file that cannot be read) is this
// replica's alone, and skipping the command here while the others apply
// it would make the replicas diverge silently, so it stops the process:
// the state file is rebuilt from raft when the node starts again.
func (f *FSM) Apply(index uint64, origin string, cmd []byte) ([]byte, error) {
	resp, t, err := f.apply(index, origin, cmd)
	if err != nil && !errors.Is(err, ErrRefused) {
		f.log.Error("state machine failed to apply a command; stopping so that this replica cannot diverge", "index", index, "err", err)
		panic(fmt.Sprintf("state: apply index %d: %v", index, err))
	}
	f.applied.Store(index)
	if err != nil {
		f.log.Debug("command refused", "index", index, "origin", origin, "err", err)
		return nil, err
	}
	f.afterChange(t)
	if resp == nil {
		return nil, nil
	}
	return json.Marshal(resp)
}

func (f *FSM) apply(index uint64, origin string, cmd []byte) (any, *txn, error) {
	if len(cmd) > MaxCommandSize {
		return nil, nil, refuse("command of %d bytes exceeds %d", len(cmd), MaxCommandSize)
	}
	var c Command
	dec := json.NewDecoder(bytes.NewReader(cmd))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return nil, nil, refuse("malformed command: %v", err)
	}
	if c.Version < minCommandVersion || c.Version > CommandVersion {
		return nil, nil, refuse("command version %d; this node applies versions %d to %d (upgrade the node)", c.Version, minCommandVersion, CommandVersion)
	}
	reg, ok := handlers[c.Type]
	if !ok {
		return nil, nil, refuse("unknown command type %q (upgrade the node)", c.Type)
	}
	if c.Actor == "" || c.Time.IsZero() {
		return nil, nil, refuse("command %s has no actor or time", c.Type)
	}
	// Audit records carry the time in UTC as RFC 3339, which has four-digit
	// years only: a time outside them would fail the record's hash on every
	// replica, at every replay.
	if y := c.Time.UTC().Year(); y < 1 || y > 9999 {
		return nil, nil, refuse("command %s: time %s is outside years 1 to 9999", c.Type, c.Time.UTC().Format(time.RFC3339))
	}
	if err := f.authorize(reg.allow, &c, origin); err != nil {
		return nil, nil, err
	}
	if err := f.checkActorSerial(&c); err != nil { // admins.go
		return nil, nil, err
	}
	f.dbMu.RLock()
	defer f.dbMu.RUnlock()
	if f.db == nil {
		return nil, nil, errors.New("state: closed")
	}
	var resp any
	t := &txn{f: f, c: &c, index: index, origin: origin}
	err := f.db.Update(func(tx *bolt.Tx) error {
		t.tx = tx
		// bbolt does not keep FillPercent across transactions: the audit
		// log only grows at its end, so its pages are filled completely.
		tx.Bucket(bAudit).FillPercent = 1.0
		if err := t.checkVersionFloor(); err != nil {
			return err
		}
		if err := t.checkOriginCA(); err != nil { // crl.go
			return err
		}
		if err := t.checkAdminActor(); err != nil { // admins.go
			return err
		}
		r, events, err := reg.h(t)
		if err != nil {
			return err
		}
		for _, e := range events {
			if err := t.appendAudit(e); err != nil {
				return err
			}
		}
		if t.head != nil {
			if err := putJSON(tx.Bucket(bMeta), keyAuditHead, t.head); err != nil {
				return err
			}
		}
		resp = r
		return putU64(tx.Bucket(bMeta), keyIndex, index)
	})
	if err != nil {
		return nil, nil, err
	}
	return resp, t, nil
}

// checkVersionFloor refuses an envelope older than one already committed.
// Each version adds checks (version 3: the admin certificate's serial, a
// JWT key's CA), and a member that could still write the older envelope
// would skip them; every node writes the newest version it has, so once
// one has committed, the cluster runs code that writes it.
func (t *txn) checkVersionFloor() error {
	meta := t.tx.Bucket(bMeta)
	floor, v := getU64(meta, keyVersionFloor), uint64(t.c.Version)
	switch {
	case v < floor:
		return refuse("command version %d is older than version %d, which this cluster has already committed", v, floor)
	case v > floor:
		return putU64(meta, keyVersionFloor, v)
	}
	return nil
}

// afterChange refreshes caches and wakes watchers.
func (f *FSM) afterChange(t *txn) {
	if t.bundleChanged || t.policyChanged || t.bundleQuiet {
		if err := f.loadCaches(); err != nil {
			f.log.Error("state caches", "err", err)
		}
	} else {
		f.loadHead()
	}
	f.mu.Lock()
	close(f.watch)
	f.watch = make(chan struct{})
	if t.federationChanged {
		close(f.fedWatch)
		f.fedWatch = make(chan struct{})
	}
	if t.configChanged || t.bundleChanged || t.policyChanged || t.federationChanged {
		close(f.cfgWatch)
		f.cfgWatch = make(chan struct{})
		// A foreign bundle's change wakes every agent, not only those whose
		// entries federate with it: finding those would cost a scan of the
		// entries (or an index kept for it) per change. The cost is one view
		// per connected agent (its entries read, the view hashed; sent only
		// if it changed) for each bundle change, and a foreign bundle changes
		// at most once per fetch interval (30 s to 1 h, 5 min by default).
		if t.bundleChanged || t.policyChanged || t.federationChanged || len(t.agentsChanged) == 0 {
			f.wakeAllAgentsLocked()
		} else {
			for id := range t.agentsChanged {
				if ch, ok := f.agentWatch[id]; ok {
					close(ch)
					delete(f.agentWatch, id)
				}
			}
		}
	}
	f.mu.Unlock()
}

// touchAgent records that an agent's view (its entries or its own record)
// changed in this command.
func (t *txn) touchAgent(id string) {
	t.configChanged = true
	if t.agentsChanged == nil {
		t.agentsChanged = map[string]bool{}
	}
	t.agentsChanged[id] = true
}

// wakeAllAgentsLocked closes every agent watch (f.mu held).
func (f *FSM) wakeAllAgentsLocked() {
	for _, ch := range f.agentWatch {
		close(ch)
	}
	f.agentWatch = nil
}

// AgentChanged returns a channel closed at the next change to what an
// agent sees: its entries, its own record (a ban, a removal), the bundle,
// the join policy, a federation relationship or foreign bundle, or a
// restored state. Entries and bans of other
// agents do not close it: a fleet's sync streams are not all woken by a
// change that concerns one of them. The channel is shared by everyone
// waiting on the same agent; it is forgotten once closed.
func (f *FSM) AgentChanged(id string) <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ch, ok := f.agentWatch[id]; ok {
		return ch
	}
	if f.agentWatch == nil {
		f.agentWatch = map[string]chan struct{}{}
	}
	ch := make(chan struct{})
	f.agentWatch[id] = ch
	return ch
}

// AppliedIndex is the raft index of the last command this replica has
// consumed (applied or refused), or that its restored snapshot covers.
func (f *FSM) AppliedIndex() uint64 { return f.applied.Load() }

// Index is AppliedIndex (the revision agents resume from).
func (f *FSM) Index() uint64 { return f.applied.Load() }

// Changed returns a channel closed at the next applied change.
func (f *FSM) Changed() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.watch
}

// FederationsChanged returns a channel closed at the next change to a
// federation relationship or a foreign bundle.
func (f *FSM) FederationsChanged() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fedWatch
}

// ConfigChanged returns a channel closed at the next change to entries,
// agents, policy or the bundle; audit and issuance records do not wake it,
// so agents' sync streams sleep through issuance traffic.
func (f *FSM) ConfigChanged() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cfgWatch
}

// actorRule says which actors may propose a command type.
type actorRule int

const (
	// byNode: only a node, and only the member that proposed it.
	byNode actorRule = iota
	// byAdmin: an admin (certificate or a node's local socket); the
	// proposing node vouches for it and is recorded with it.
	byAdmin
	// byAdminOrNode: audit records of either, and a node's issuing CA
	// (installed by an admin, or shown by the node itself).
	byAdminOrNode
)

// authorize checks the actor against the raft origin: a node may speak only
// for itself, and vouch only for the callers it authenticates (admins over
// mutual TLS or its own local socket).
func (f *FSM) authorize(rule actorRule, c *Command, origin string) error {
	if origin == "" {
		return refuse("%s by %s has no authenticated origin", c.Type, c.Actor)
	}
	kind, name := f.actorKind(c.Actor)
	switch kind {
	case "node":
		if name != origin {
			return refuse("%s: node %s proposed a command as %s", c.Type, origin, c.Actor)
		}
		if rule == byAdmin {
			return refuse("%s may be proposed only for an admin, not by node %s", c.Type, name)
		}
	case "local":
		if name != origin {
			return refuse("%s: node %s proposed a command as another node's local admin (%s)", c.Type, origin, c.Actor)
		}
		fallthrough
	case "admin":
		if rule == byNode {
			return refuse("%s may be proposed only by a node itself, not by %s", c.Type, c.Actor)
		}
	default:
		return refuse("%s: actor %q is not a node or an admin", c.Type, truncate(c.Actor, 128))
	}
	return nil
}

// actorKind classifies an actor string: "node", "admin" or "local" (root
// on a node's local socket, "local:uid=N@<node>") and its name.
func (f *FSM) actorKind(actor string) (kind, name string) {
	if rest, ok := strings.CutPrefix(actor, "local:uid="); ok {
		if i := strings.LastIndexByte(rest, '@'); i > 0 && i < len(rest)-1 {
			return "local", rest[i+1:]
		}
		return "", ""
	}
	id, err := spiffeid.FromString(actor)
	if err != nil || !id.MemberOf(f.td) {
		return "", ""
	}
	if n, ok := strings.CutPrefix(id.Path(), "/sigil/node/"); ok && n != "" && !strings.Contains(n, "/") {
		return "node", n
	}
	if n, ok := strings.CutPrefix(id.Path(), "/sigil/admin/"); ok && n != "" && !strings.Contains(n, "/") {
		return "admin", n
	}
	return "", ""
}
