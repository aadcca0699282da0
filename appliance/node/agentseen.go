package node

import (
	"sync"
	"time"
)

// seenAgents is this node's own view of when each agent last called it
// (any agent service or renewal call, authenticated by the agent's
// certificate) and which agents hold a Sync stream open to it now. It is
// kept in memory only: a replicated record per contact would grow the raft
// log and the audit log with every sync, and a node that restarts starts
// with an empty view. So it is per node and approximate: an agent that
// talks to another node is not seen here, and a host that vanished without
// closing its connection counts as connected until gRPC notices. The admin
// service reports it with the node's ID (api.Agent.SeenBy).
//
// The zero value is ready to use.
type seenAgents struct {
	mu    sync.Mutex
	seen  map[string]agentContact
	limit int // 0: maxSeenAgents
}

type agentContact struct {
	last  time.Time
	syncs int // Sync streams open now
}

// maxSeenAgents bounds the view. Only callers holding an agent
// certificate of this trust domain are recorded, so it is bounded by the
// agents the appliance admitted; the bound keeps a node's memory fixed
// even so. Agents beyond it are not recorded (their last-seen is not
// shown) until the view is pruned (prune, on agent list).
const maxSeenAgents = 1 << 20

// saw records a call of agent id at now.
func (s *seenAgents) saw(id string, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.update(id, now, 0)
}

// syncOpened records a Sync stream of id opened at now; the function it
// returns records its end.
func (s *seenAgents) syncOpened(id string, now time.Time) func() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.update(id, now, 1) {
		return func() {}
	}
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.update(id, time.Now(), -1)
	}
}

func (s *seenAgents) update(id string, now time.Time, syncs int) bool {
	c, ok := s.seen[id]
	if !ok {
		if len(s.seen) >= s.max() {
			return false
		}
		if s.seen == nil {
			s.seen = map[string]agentContact{}
		}
	}
	if now.After(c.last) {
		c.last = now
	}
	c.syncs += syncs
	s.seen[id] = c
	return true
}

func (s *seenAgents) max() int {
	if s.limit > 0 {
		return s.limit
	}
	return maxSeenAgents
}

// contact returns what this node saw of agent id.
func (s *seenAgents) contact(id string) (last time.Time, connected bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.seen[id]
	return c.last, c.syncs > 0
}

// prune forgets agents that keep is false for (removed from the state)
// and that hold no stream open.
func (s *seenAgents) prune(keep func(id string) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, c := range s.seen {
		if c.syncs == 0 && !keep(id) {
			delete(s.seen, id)
		}
	}
}
