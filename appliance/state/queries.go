package state

import (
	bolt "go.etcd.io/bbolt"
)

// Reads run in their own read transactions and return decoded copies;
// they never wait for Apply.

func (f *FSM) entriesFrom(tx *bolt.Tx, ids []string) []Entry {
	b := tx.Bucket(bEntries)
	out := make([]Entry, 0, len(ids))
	for _, id := range ids {
		var e Entry
		if ok, err := getJSON(b, []byte(id), &e); err != nil {
			f.log.Error("stored entry unreadable", "entry", id, "err", err)
		} else if ok {
			out = append(out, e)
		}
	}
	return out
}

// Entries returns every entry, ordered by ID.
func (f *FSM) Entries() []Entry {
	var out []Entry
	f.read("Entries", func(tx *bolt.Tx) error {
		return tx.Bucket(bEntries).ForEach(func(k, v []byte) error {
			var e Entry
			if err := decodeStrict(v, &e); err != nil {
				f.log.Error("stored entry unreadable", "entry", string(k), "err", err)
				return nil
			}
			out = append(out, e)
			return nil
		})
	})
	return out
}

// Entry returns one entry.
func (f *FSM) Entry(id string) (Entry, bool) {
	var e Entry
	var ok bool
	if !f.read("Entry", func(tx *bolt.Tx) error {
		var err error
		ok, err = getJSON(tx.Bucket(bEntries), []byte(id), &e)
		return err
	}) {
		return Entry{}, false
	}
	return e, ok
}

// EntriesByParent returns the entries an agent (or node) is parent of,
// ordered by ID.
func (f *FSM) EntriesByParent(parent string) []Entry {
	var out []Entry
	f.read("EntriesByParent", func(tx *bolt.Tx) error {
		out = f.entriesFrom(tx, idsWithPrefix(tx.Bucket(bEntriesByParent), parent))
		return nil
	})
	return out
}

// EntriesBySPIFFEID returns the entries for one SPIFFE ID, ordered by ID.
func (f *FSM) EntriesBySPIFFEID(id string) []Entry {
	var out []Entry
	f.read("EntriesBySPIFFEID", func(tx *bolt.Tx) error {
		out = f.entriesFrom(tx, idsWithPrefix(tx.Bucket(bEntriesBySPIFFE), id))
		return nil
	})
	return out
}

// Agents returns every agent, ordered by ID.
func (f *FSM) Agents() []Agent {
	var out []Agent
	f.read("Agents", func(tx *bolt.Tx) error {
		return tx.Bucket(bAgents).ForEach(func(k, v []byte) error {
			var a Agent
			if err := decodeStrict(v, &a); err != nil {
				f.log.Error("stored agent unreadable", "agent", string(k), "err", err)
				return nil
			}
			out = append(out, a)
			return nil
		})
	})
	return out
}

// Agent returns one agent.
func (f *FSM) Agent(id string) (Agent, bool) {
	var a Agent
	var ok bool
	if !f.read("Agent", func(tx *bolt.Tx) error {
		var err error
		ok, err = getJSON(tx.Bucket(bAgents), []byte(id), &a)
		return err
	}) {
		return Agent{}, false
	}
	return a, ok
}

// Policy returns the join policy.
func (f *FSM) Policy() JoinPolicy {
	if p := f.policy.Load(); p != nil {
		return clonePolicy(*p)
	}
	return JoinPolicy{}
}

func clonePolicy(p JoinPolicy) JoinPolicy {
	out := p
	out.EKCAs = append([]EKCA(nil), p.EKCAs...)
	out.EKAllow = append([]string(nil), p.EKAllow...)
	if p.PCRPolicy != nil {
		pp := &PCRPolicy{Bank: p.PCRPolicy.Bank, PCRs: map[string]string{}}
		for k, v := range p.PCRPolicy.PCRs {
			pp.PCRs[k] = v
		}
		out.PCRPolicy = pp
	}
	return out
}

// Token returns a join token by its hash.
func (f *FSM) Token(id string) (JoinToken, bool) {
	var t JoinToken
	var ok bool
	if !f.read("Token", func(tx *bolt.Tx) error {
		var err error
		ok, err = getJSON(tx.Bucket(bTokens), []byte(id), &t)
		return err
	}) {
		return JoinToken{}, false
	}
	return t, ok
}

// Bundle returns the trust bundle.
func (f *FSM) Bundle() Bundle {
	b := f.bundle.Load()
	if b == nil {
		return Bundle{TrustDomain: f.td.Name()}
	}
	out := *b
	out.Roots = append([][]byte(nil), b.Roots...)
	out.JWTKeys = append([]JWTKey(nil), b.JWTKeys...)
	out.Revoked = append([]Revocation(nil), b.Revoked...)
	out.RootCRLs = append([][]byte(nil), b.RootCRLs...)
	return out
}

// Counts is for metrics: entries, agents and retained audit records.
func (f *FSM) Counts() (entries, agents, audit int) {
	f.read("Counts", func(tx *bolt.Tx) error {
		entries = tx.Bucket(bEntries).Stats().KeyN
		agents = tx.Bucket(bAgents).Stats().KeyN
		return nil
	})
	if h := f.head.Load(); h != nil && h.Seq > 0 {
		audit = int(h.Seq - max(h.First, 1) + 1)
	}
	return entries, agents, audit
}

// ExportFailures counts audit segments this node failed to write.
func (f *FSM) ExportFailures() uint64 { return f.exportFailures.Load() }
