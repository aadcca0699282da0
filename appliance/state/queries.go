package state

// Entries returns every entry, ordered by ID.
func (f *FSM) Entries() []Entry {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]Entry, 0, len(f.d.Entries))
	for _, id := range sortedKeys(f.d.Entries) {
		out = append(out, clone(*f.d.Entries[id]))
	}
	return out
}

// Entry returns one entry.
func (f *FSM) Entry(id string) (Entry, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	e, ok := f.d.Entries[id]
	if !ok {
		return Entry{}, false
	}
	return clone(*e), true
}

// EntriesByParent returns the entries an agent (or node) is parent of.
func (f *FSM) EntriesByParent(parent string) []Entry {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []Entry
	for _, id := range sortedKeys(f.d.Entries) {
		if e := f.d.Entries[id]; e.ParentID == parent {
			out = append(out, clone(*e))
		}
	}
	return out
}

// Agents returns every agent, ordered by ID.
func (f *FSM) Agents() []Agent {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]Agent, 0, len(f.d.Agents))
	for _, id := range sortedKeys(f.d.Agents) {
		out = append(out, clone(*f.d.Agents[id]))
	}
	return out
}

// Agent returns one agent.
func (f *FSM) Agent(id string) (Agent, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	a, ok := f.d.Agents[id]
	if !ok {
		return Agent{}, false
	}
	return clone(*a), true
}

// Policy returns the join policy.
func (f *FSM) Policy() JoinPolicy {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return clone(f.d.Policy)
}

// Token returns a join token by its hash.
func (f *FSM) Token(id string) (JoinToken, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	t, ok := f.d.Tokens[id]
	if !ok {
		return JoinToken{}, false
	}
	return *t, true
}

// Bundle returns the trust bundle.
func (f *FSM) Bundle() Bundle {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return clone(f.d.Bundle)
}

// Counts is for metrics.
func (f *FSM) Counts() (entries, agents, audit int) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return len(f.d.Entries), len(f.d.Agents), len(f.d.Audit)
}
