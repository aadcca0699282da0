package ctl

import (
	"bufio"
	"context"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

// auditSelection is audit list's filter flags.
type auditSelection struct {
	actor, action, target string
	since, until          string
	newestFirst           bool
	before                uint64
}

func (s *auditSelection) flags(c *cobra.Command) {
	f := c.Flags()
	f.StringVar(&s.actor, "actor", "", "only records of this actor (a SPIFFE ID, or local:uid=...; a trailing * matches a prefix)")
	f.StringVar(&s.action, "action", "", "only records of this action, such as token.revoke (a trailing * matches a prefix: 'agent.*')")
	f.StringVar(&s.target, "target", "", "only records about this target (a trailing * matches a prefix)")
	f.StringVar(&s.since, "since", "", "only records at or after this time: RFC 3339 (2026-12-03T06:00:00Z) or a duration ago (1h, '90m ago')")
	f.StringVar(&s.until, "until", "", "only records at or before this time: RFC 3339 or a duration ago")
	f.BoolVar(&s.newestFirst, "newest-first", false, "list from the newest record down")
	f.Uint64Var(&s.before, "before", 0, "with --newest-first: records before this sequence number (to go on from where a capped list stopped)")
}

// request puts the selection into req; it reports whether there is one.
func (s *auditSelection) request(req *api.AuditRequest, now time.Time) (bool, error) {
	f := &api.AuditFilter{Actor: s.actor, Action: s.action, Target: s.target}
	var err error
	if f.Since, err = parseWhen("since", s.since, now); err != nil {
		return false, err
	}
	if f.Until, err = parseWhen("until", s.until, now); err != nil {
		return false, err
	}
	if !f.Since.IsZero() && !f.Until.IsZero() && f.Until.Before(f.Since) {
		return false, clirun.Usagef("--until %s is before --since %s", f.Until.Format(time.RFC3339), f.Since.Format(time.RFC3339))
	}
	if s.before != 0 && !s.newestFirst {
		return false, clirun.Usagef("--before applies with --newest-first (oldest first, use --after)")
	}
	if *f != (api.AuditFilter{}) {
		req.Filter = f
	}
	req.NewestFirst, req.Before = s.newestFirst, s.before
	return req.Filter != nil || req.NewestFirst, nil
}

// parseWhen reads a time flag: RFC 3339, or a duration before now ("1h",
// "1h ago").
func parseWhen(flag, v string, now time.Time) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339, v); err == nil {
		return t, nil
	}
	d, err := time.ParseDuration(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "ago")))
	if err != nil || d < 0 {
		return time.Time{}, clirun.Usagef("--%s %q: want an RFC 3339 time (2026-12-03T06:00:00Z) or a duration ago (1h, '90m ago')", flag, v)
	}
	return now.Add(-d), nil
}

// auditSelect lists the records a filtered or newest-first request
// selects: the node reads a bounded stretch of the log per request
// (api.MaxAuditScan) and says where it stopped, and this goes on until it
// has --limit records or the log ends.
func (g *globals) auditSelect(req api.AuditRequest) error {
	limit := req.Limit
	if limit <= 0 || limit > state.MaxAuditList {
		limit = state.MaxAuditList
	}
	var next uint64
	res, err := func() (*api.AuditList, error) {
		var res *api.AuditList
		err := g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
			start := time.Now()
			last := start
			r := req
			for {
				r.Limit = limit
				if res != nil {
					r.Limit = limit - len(res.Records)
				}
				rctx, cancel := g.request(ctx)
				l, err := c.AuditList(rctx, &r)
				cancel()
				if err != nil {
					return nil, err
				}
				if res == nil {
					res = l
				} else {
					res.Records = append(res.Records, l.Records...)
				}
				next = l.Next
				if next == 0 || len(res.Records) >= limit {
					break
				}
				if req.NewestFirst {
					r.Before = next
				} else {
					r.After = next
				}
				if now := time.Now(); now.Sub(last) >= progressEvery {
					last = now
					g.note("audit list: %d records selected, at record %d of head %d, %.0f s\n", len(res.Records), next, l.Head, now.Sub(start).Seconds())
				}
			}
			res.Next = next
			res.Records = nonNil(res.Records)
			return res, nil
		}, func(w *bufio.Writer, v any) {
			var rows [][]string
			for _, r := range v.(*api.AuditList).Records {
				rows = append(rows, auditRow(&r))
			}
			table(w, auditHeader, rows)
		})
		return res, err
	}()
	if err != nil {
		return err
	}
	if next != 0 {
		flag := "--after"
		if req.NewestFirst {
			flag = "--newest-first --before"
		}
		g.note("note: output capped at %d records; more may match: go on with %s %d\n", len(res.Records), flag, next)
	}
	if res.First > 1 && req.After+1 < res.First {
		g.note("note: records before %d were pruned from the replicated log to the nodes' segment files and are not searched (sigilctl audit export includes them)\n", res.First)
	}
	return nil
}
