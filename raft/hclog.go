package raft

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

const (
	// repeatWindow is how often one repeated line of the raft library
	// (a heartbeat to a dead peer fails several times a second; a node cut
	// off from the quorum starts an election every timeout) is logged:
	// the first occurrence, then one line per window carrying how many
	// were left out since. Debug lines are not limited: they are off
	// unless someone is looking.
	repeatWindow = 10 * time.Second
	// maxRepeatKeys bounds the (message, peer) pairs tracked; the library's
	// messages are fixed strings and the peers are cluster members, so the
	// bound is only reached if that changes.
	maxRepeatKeys = 256
)

// newHCLogger gives hashicorp/raft a logger whose lines reach log as
// structured slog records at their own level (trace and debug as debug),
// with the library's key/value pairs as attributes. The hclog logger
// itself writes nothing: only the sink does.
func newHCLogger(log *slog.Logger) hclog.Logger {
	il := hclog.NewInterceptLogger(&hclog.LoggerOptions{Name: "raft", Level: hclog.Info, Output: io.Discard})
	il.RegisterSink(&hclogSink{log: log, now: time.Now, seen: map[repeatKey]*repeatTally{}})
	return il
}

type repeatKey struct{ msg, peer string }

type repeatTally struct {
	start      time.Time
	suppressed uint64
}

// hclogSink is the slog side of the library's logger.
type hclogSink struct {
	log *slog.Logger
	now func() time.Time

	mu   sync.Mutex
	seen map[repeatKey]*repeatTally
}

var _ hclog.SinkAdapter = (*hclogSink)(nil)

func slogLevel(l hclog.Level) slog.Level {
	switch {
	case l >= hclog.Error:
		return slog.LevelError
	case l == hclog.Warn:
		return slog.LevelWarn
	case l == hclog.Info:
		return slog.LevelInfo
	}
	return slog.LevelDebug
}

func (s *hclogSink) Accept(name string, level hclog.Level, msg string, args ...any) {
	lvl := slogLevel(level)
	if !s.log.Enabled(context.Background(), lvl) {
		return
	}
	attrs := make([]slog.Attr, 0, len(args)/2+2)
	peer := ""
	for i := 0; i+1 < len(args); i += 2 {
		k := fmt.Sprint(args[i])
		v := hclogValue(args[i+1])
		switch k {
		case "node", "component", "msg", "level", "time", "source":
			// Keys the node's logger and slog itself already carry.
			k = "raft_" + k
		case "peer", "server-id", "id":
			if peer == "" {
				peer = fmt.Sprint(v)
			}
		}
		attrs = append(attrs, slog.Any(k, v))
	}
	if len(args)%2 == 1 {
		// hclog's own convention for an odd argument.
		attrs = append(attrs, slog.Any("EXTRA_VALUE_AT_END", hclogValue(args[len(args)-1])))
	}
	if lvl >= slog.LevelInfo {
		ok, suppressed := s.allow(repeatKey{msg, peer})
		if !ok {
			return
		}
		if suppressed > 0 {
			attrs = append(attrs, slog.Uint64("repeated", suppressed), slog.Duration("repeat_window", repeatWindow))
		}
	}
	if name != "" && name != "raft" {
		attrs = append(attrs, slog.String("library", name))
	}
	s.log.LogAttrs(context.Background(), lvl, msg, attrs...)
}

// allow says whether a line is logged now: the first of its key in a
// window is, with the count of those left out in the window before.
func (s *hclogSink) allow(k repeatKey) (ok bool, suppressed uint64) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.seen[k]
	if t == nil && len(s.seen) >= maxRepeatKeys {
		for key, v := range s.seen {
			if now.Sub(v.start) >= repeatWindow {
				delete(s.seen, key)
			}
		}
		if len(s.seen) >= maxRepeatKeys {
			return true, 0 // untracked: logged as it comes
		}
	}
	if t == nil || now.Sub(t.start) >= repeatWindow {
		if t != nil {
			suppressed = t.suppressed
		}
		s.seen[k] = &repeatTally{start: now}
		return true, suppressed
	}
	t.suppressed++
	return false, 0
}

// hclogValue renders the library's values as slog renders them well:
// hclog.Format as its formatted string, durations as text.
func hclogValue(v any) any {
	switch x := v.(type) {
	case hclog.Format:
		if len(x) == 0 {
			return ""
		}
		return fmt.Sprintf(fmt.Sprint(x[0]), x[1:]...)
	case time.Duration:
		return x.String()
	case fmt.Stringer:
		return x.String()
	}
	return v
}
