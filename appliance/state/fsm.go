// Package state is the appliance's replicated state machine: registration
// entries, attested agents, the TPM join policy, one-time join tokens, the
// trust bundle and the hash-chained audit log.
//
// State changes only through typed, versioned commands applied in raft log
// order. Apply is deterministic: it reads time from the command (stamped by
// the proposer), never from the clock, and refuses unknown command types or
// versions rather than guess, so replicas cannot diverge. Every change
// appends an audit record; a refused command changes nothing.
package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// CommandVersion is the only command envelope version this code applies.
const CommandVersion = 1

// Command is the envelope of every replicated change.
type Command struct {
	Version int             `json:"v"`
	Type    string          `json:"type"`
	Actor   string          `json:"actor"` // SPIFFE ID of the admin, node or agent
	Time    time.Time       `json:"time"`  // stamped by the proposer
	Payload json.RawMessage `json:"payload"`
}

// NewCommand builds an encoded command.
func NewCommand(typ, actor string, now time.Time, payload any) ([]byte, error) {
	p, err := json.Marshal(payload)
	if err != nil {
		return nil, err
	}
	return json.Marshal(Command{Version: CommandVersion, Type: typ, Actor: actor, Time: now.UTC(), Payload: p})
}

// ErrRefused wraps every refusal of a command, with the reason.
var ErrRefused = errors.New("refused")

func refuse(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, a...))
}

// data is everything that is replicated; snapshots serialize exactly this.
type data struct {
	TrustDomain string                `json:"trust_domain"`
	Entries     map[string]*Entry     `json:"entries"`
	Agents      map[string]*Agent     `json:"agents"`
	Policy      JoinPolicy            `json:"policy"`
	Tokens      map[string]*JoinToken `json:"tokens"`
	Bundle      Bundle                `json:"bundle"`
	Audit       []*AuditRecord        `json:"audit"`
	// Index is the raft index of the last applied command.
	Index uint64 `json:"index"`
}

// FSM holds the state. Reads take a read lock and return copies.
type FSM struct {
	td spiffeid.TrustDomain

	mu sync.RWMutex
	d  *data
	// regIndex maps registrationKey -> entry ID; derived from d.Entries,
	// nil until first needed and after a restore.
	regIndex map[string]string
	// watchers are woken (channel closed) on every applied change;
	// cfgWatch only on changes to what agents see (not audit records).
	watch    chan struct{}
	cfgWatch chan struct{}
}

// New returns an empty state for a trust domain.
func New(td spiffeid.TrustDomain) *FSM {
	return &FSM{td: td, d: emptyData(td), watch: make(chan struct{}), cfgWatch: make(chan struct{})}
}

func emptyData(td spiffeid.TrustDomain) *data {
	return &data{TrustDomain: td.Name(), Entries: map[string]*Entry{}, Agents: map[string]*Agent{},
		Tokens: map[string]*JoinToken{}, Bundle: Bundle{TrustDomain: td.Name()}}
}

// TrustDomain is the trust domain this state belongs to.
func (f *FSM) TrustDomain() spiffeid.TrustDomain { return f.td }

// handler applies one command type to d (already locked). It returns the
// response for the proposer and the audit events for the change.
type handler func(f *FSM, c *Command, index uint64) (any, []AuditEvent, error)

// AuditEvent is an audit record before it is chained.
type AuditEvent struct {
	Action string            `json:"action"`
	Target string            `json:"target,omitempty"`
	Detail map[string]string `json:"detail,omitempty"`
}

var handlers = map[string]handler{}

// register binds a command type to a typed handler with strict payload
// decoding. Called from init functions only.
func register[P any](typ string, fn func(f *FSM, c *Command, index uint64, p *P) (any, []AuditEvent, error)) {
	handlers[typ] = func(f *FSM, c *Command, index uint64) (any, []AuditEvent, error) {
		var p P
		dec := json.NewDecoder(bytes.NewReader(c.Payload))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&p); err != nil {
			return nil, nil, refuse("%s payload: %v", typ, err)
		}
		return fn(f, c, index, &p)
	}
}

// Apply applies one command at raft index.
func (f *FSM) Apply(index uint64, cmd []byte) ([]byte, error) {
	var c Command
	dec := json.NewDecoder(bytes.NewReader(cmd))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return nil, refuse("malformed command: %v", err)
	}
	if c.Version != CommandVersion {
		return nil, refuse("command version %d; this node applies version %d (upgrade the node)", c.Version, CommandVersion)
	}
	h, ok := handlers[c.Type]
	if !ok {
		return nil, refuse("unknown command type %q (upgrade the node)", c.Type)
	}
	if c.Actor == "" || c.Time.IsZero() {
		return nil, refuse("command %s has no actor or time", c.Type)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// Handlers validate before they mutate: a refusal leaves d untouched.
	resp, events, err := h(f, &c, index)
	if err != nil {
		return nil, err
	}
	for _, e := range events {
		f.appendAudit(index, c.Time, c.Actor, e)
	}
	f.d.Index = index
	close(f.watch)
	f.watch = make(chan struct{})
	if c.Type != CmdAudit && c.Type != CmdIssue {
		close(f.cfgWatch)
		f.cfgWatch = make(chan struct{})
	}
	if resp == nil {
		return nil, nil
	}
	return json.Marshal(resp)
}

// Changed returns a channel closed at the next applied change.
func (f *FSM) Changed() <-chan struct{} {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.watch
}

// ConfigChanged returns a channel closed at the next change to entries,
// agents, policy or the bundle; audit and issuance records do not wake it,
// so agents' sync streams sleep through issuance traffic.
func (f *FSM) ConfigChanged() <-chan struct{} {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.cfgWatch
}

// Index is the raft index of the last applied change.
func (f *FSM) Index() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.d.Index
}

// Snapshot is the state at one instant, serialized.
type Snapshot struct{ b []byte }

func (s *Snapshot) Persist(w io.Writer) error { _, err := w.Write(s.b); return err }
func (s *Snapshot) Release()                  {}

// Snapshot serializes the state at this instant; the copy is taken under
// the lock, so Persist may run while commands apply.
func (f *FSM) Snapshot() (*Snapshot, error) {
	b, err := f.Export()
	if err != nil {
		return nil, err
	}
	return &Snapshot{b: b}, nil
}

// Export returns the state as JSON (the body of snapshots and archives).
func (f *FSM) Export() ([]byte, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return json.Marshal(f.d)
}

// Restore replaces the state with a raft snapshot. The snapshot is parsed
// and checked completely before anything is replaced.
func (f *FSM) Restore(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	d, err := f.decodeData(b)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.d = d
	f.regIndex = nil
	close(f.watch)
	f.watch = make(chan struct{})
	close(f.cfgWatch)
	f.cfgWatch = make(chan struct{})
	f.mu.Unlock()
	return nil
}

// decodeData parses exported state and checks it belongs here and its audit
// chain is intact.
func (f *FSM) decodeData(b []byte) (*data, error) {
	d := emptyData(f.td)
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(d); err != nil {
		return nil, fmt.Errorf("state: %v", err)
	}
	if dec.More() {
		return nil, errors.New("state: trailing data")
	}
	if d.TrustDomain != f.td.Name() {
		return nil, fmt.Errorf("state is for trust domain %q, this appliance serves %q", d.TrustDomain, f.td.Name())
	}
	if d.Entries == nil {
		d.Entries = map[string]*Entry{}
	}
	if d.Agents == nil {
		d.Agents = map[string]*Agent{}
	}
	if d.Tokens == nil {
		d.Tokens = map[string]*JoinToken{}
	}
	if n, err := verifyChain(d.Audit); err != nil {
		return nil, fmt.Errorf("state: audit chain breaks at record %d: %v", n, err)
	}
	return d, nil
}

// sortedKeys gives deterministic iteration for responses.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// clone deep-copies through JSON: state values are small and this keeps
// readers from sharing memory with the FSM.
func clone[T any](v T) T {
	b, _ := json.Marshal(v)
	var out T
	json.Unmarshal(b, &out)
	return out
}
