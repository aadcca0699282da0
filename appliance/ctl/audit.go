package ctl

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

func auditCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "The hash-chained audit log"}
	cmd.AddCommand(auditListCmd(g), auditExportCmd(g), auditVerifyCmd(g), auditVerifySegmentCmd(g))
	return cmd
}

// chainError is a break in the audit chain, at record Seq.
type chainError struct {
	Seq uint64
	Err error
}

func (e *chainError) Error() string {
	return fmt.Sprintf("audit chain broken at record %d: %v", e.Seq, e.Err)
}

// chain checks pages of records as they arrive: state's chain rules
// within each page (api.VerifyAudit) and the link from one page to the
// next, which VerifyAudit cannot see.
type chain struct {
	start uint64 // the first record expected (0: the first page may start anywhere)
	seq   uint64 // the last record checked
	hash  string
	n     int
	first uint64 // the first record checked
}

// page checks recs. On a break it returns how many leading records are
// good, and a *chainError.
func (c *chain) page(recs []api.AuditRecord) (int, error) {
	if len(recs) == 0 {
		return 0, nil
	}
	r0 := &recs[0]
	switch {
	case c.n == 0 && c.start != 0 && r0.Seq != c.start:
		return 0, &chainError{r0.Seq, fmt.Errorf("the records start at %d, not at %d", r0.Seq, c.start)}
	case c.n > 0 && r0.Seq != c.seq+1:
		// Not necessarily tampering: records pruned while they were
		// being read leave the same hole. Run again to tell.
		return 0, &chainError{r0.Seq, fmt.Errorf("record %d follows record %d: records missing (pruned while this ran? run it again; if it recurs, records were removed)", r0.Seq, c.seq)}
	case c.n > 0 && r0.Prev != c.hash:
		return 0, &chainError{r0.Seq, fmt.Errorf("prev hash %.16s does not match record %d (%.16s)", r0.Prev, c.seq, c.hash)}
	}
	if bad, err := api.VerifyAudit(recs); err != nil {
		good := 0
		for good < len(recs) && recs[good].Seq != bad {
			good++
		}
		c.take(recs[:good])
		return good, &chainError{bad, err}
	}
	c.take(recs)
	return len(recs), nil
}

func (c *chain) take(recs []api.AuditRecord) {
	if len(recs) == 0 {
		return
	}
	if c.n == 0 {
		c.first = recs[0].Seq
	}
	last := &recs[len(recs)-1]
	c.seq, c.hash = last.Seq, last.Hash
	c.n += len(recs)
}

// pruneLink looks for the audit.prune record that accounts for the
// records before the first retained one: it names the last pruned record
// and its hash, which must be the first retained record's prev.
type pruneLink struct {
	first   uint64 // the first retained record
	prev    string // its prev hash
	at      uint64 // the prune record found (0: none yet)
	problem string
}

func (l *pruneLink) see(recs []api.AuditRecord) {
	for i := range recs {
		r := &recs[i]
		if l.first <= 1 || l.at != 0 || r.Action != state.CmdAuditPrune {
			continue
		}
		to, err := strconv.ParseUint(r.Detail["to"], 10, 64)
		if err != nil || to != l.first-1 {
			continue
		}
		l.at = r.Seq
		if r.Detail["last_hash"] != l.prev {
			l.problem = fmt.Sprintf("the audit.prune at record %d says record %d hashed to %.16s, but record %d's prev is %.16s",
				r.Seq, to, r.Detail["last_hash"], l.first, l.prev)
		}
	}
}

func auditListCmd(g *globals) *cobra.Command {
	var req api.AuditRequest
	var all bool
	var sel auditSelection
	list := &cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List audit records",
		Long: fmt.Sprintf("Lists retained audit records after --after. One request returns at most %d; --all pages\n"+
			"through to the head. Records pruned from the replicated log are in the nodes' segment files:\n"+
			"sigilctl audit export includes them.\n\n"+
			"--actor, --action, --target, --since and --until select records (all that are given must\n"+
			"match; actor, action and target exactly, or by prefix when they end in *), and\n"+
			"--newest-first lists from the head down. The node filters: each request reads at most %d\n"+
			"records, and sigilctl goes on until it has --limit records (at most %d) or has walked the\n"+
			"whole retained log.", state.MaxAuditList, api.MaxAuditScan, state.MaxAuditList),
		RunE: func(*cobra.Command, []string) error {
			filtered, err := sel.request(&req, time.Now())
			if err != nil {
				return err
			}
			if filtered {
				if all {
					return clirun.Usagef("--all pages an unfiltered list; a filtered or --newest-first list walks the whole retained log already (--limit bounds what it shows, at most %d)", state.MaxAuditList)
				}
				return g.auditSelect(req)
			}
			if all {
				return g.auditListAll(req)
			}
			var notes []string
			err = g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				r := req
				if r.Limit <= 0 || r.Limit > pageSize {
					r.Limit = pageSize
				}
				l, err := c.AuditList(ctx, &r)
				if err != nil {
					return nil, err
				}
				notes = listNotes(req, l)
				l.Records = nonNil(l.Records)
				return l, nil
			}, func(w *bufio.Writer, v any) {
				var rows [][]string
				for _, r := range v.(*api.AuditList).Records {
					rows = append(rows, auditRow(&r))
				}
				table(w, auditHeader, rows)
			})
			for _, n := range notes {
				g.note("%s\n", n)
			}
			return err
		}}
	list.Flags().Uint64Var(&req.After, "after", 0, "records after this sequence number")
	list.Flags().IntVar(&req.Limit, "limit", 0, fmt.Sprintf("at most this many records (0: all, up to %d per request)", state.MaxAuditList))
	list.Flags().BoolVar(&all, "all", false, "page through every retained record up to the head (--limit bounds the total)")
	sel.flags(list) // auditfilter.go
	return list
}

// pageSize is how many records list --all and verify ask for at once:
// the most one request returns (tests page with less).
var pageSize = state.MaxAuditList

const auditHeader = "SEQ\tTIME\tACTOR\tACTION\tTARGET"

func auditRow(r *api.AuditRecord) []string {
	return []string{strconv.FormatUint(r.Seq, 10), r.Time.Format(time.RFC3339), r.Actor, r.Action, r.Target}
}

// listNotes says when a single list did not show everything asked for.
func listNotes(req api.AuditRequest, l *api.AuditList) []string {
	var notes []string
	if l.First > 1 && req.After+1 < l.First {
		notes = append(notes, fmt.Sprintf("note: records %d..%d were pruned from the replicated log to the nodes' segment files (sigilctl audit export --since %d includes them)",
			req.After+1, l.First-1, req.After))
	}
	n := len(l.Records)
	if n > 0 && l.Records[n-1].Seq < l.Head && (req.Limit <= 0 || n < req.Limit) {
		notes = append(notes, fmt.Sprintf("note: output capped at %d records (one request returns at most %d); records %d..%d not shown: use --all, or --after %d",
			n, pageSize, l.Records[n-1].Seq+1, l.Head, l.Records[n-1].Seq))
	}
	return notes
}

// auditListAll pages through the retained log up to the head seen by the
// first request, writing each page as it arrives.
func (g *globals) auditListAll(req api.AuditRequest) error {
	return g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
		w := bufio.NewWriter(g.out)
		var (
			after   = req.After
			left    = req.Limit // 0: no bound
			head    uint64
			first   uint64
			n       int
			pruned  []string
			started bool
		)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		// The target is the head when the listing started: a busy log
		// would otherwise never be caught up with.
		for {
			limit := pageSize
			if req.Limit > 0 {
				limit = min(left, pageSize)
			}
			rctx, cancel := g.request(ctx)
			l, err := c.AuditList(rctx, &api.AuditRequest{After: after, Limit: limit})
			cancel()
			if err != nil {
				return nil, err
			}
			if !started {
				started, head, first = true, l.Head, l.First
				if g.output == "json" {
					fmt.Fprint(w, "{\n  \"records\": [")
				} else if _, err := fmt.Fprintln(tw, auditHeader); err != nil {
					return nil, err
				}
				pruned = listNotes(api.AuditRequest{After: after}, &api.AuditList{First: l.First})
			} else if len(l.Records) > 0 && l.Records[0].Seq != after+1 {
				pruned = append(pruned, fmt.Sprintf("note: records %d..%d were pruned while listing (sigilctl audit export --since %d includes them)",
					after+1, l.Records[0].Seq-1, after))
			}
			for i := range l.Records {
				r := &l.Records[i]
				if g.output == "json" {
					b, err := json.MarshalIndent(r, "    ", "  ")
					if err != nil {
						return nil, err
					}
					if n > 0 {
						w.WriteByte(',')
					}
					fmt.Fprintf(w, "\n    %s", b)
				} else if _, err := fmt.Fprintln(tw, strings.Join(auditRow(r), "\t")); err != nil {
					return nil, err
				}
				n++
			}
			if g.output != "json" {
				if err := tw.Flush(); err != nil {
					return nil, err
				}
			}
			if len(l.Records) == 0 {
				break
			}
			after = l.Records[len(l.Records)-1].Seq
			if req.Limit > 0 {
				if left -= len(l.Records); left <= 0 {
					break
				}
			}
			if after >= head {
				break
			}
		}
		if g.output == "json" {
			if n > 0 {
				w.WriteString("\n  ")
			}
			fmt.Fprintf(w, "],\n  \"head\": %d", head)
			if first != 0 {
				fmt.Fprintf(w, ",\n  \"first\": %d", first)
			}
			w.WriteString("\n}\n")
		}
		if err := w.Flush(); err != nil {
			return nil, err
		}
		for _, p := range pruned {
			g.note("%s\n", p)
		}
		return nil, nil
	}, nil)
}

// exportResult is what audit export reports at the end.
type exportResult struct {
	File     string `json:"file,omitempty"`
	Records  int    `json:"records"`
	From     uint64 `json:"from,omitempty"`
	To       uint64 `json:"to,omitempty"`
	LastHash string `json:"last_hash,omitempty"`
	// Retained is the node's first retained record: records before it
	// came from the node's segment files.
	Retained uint64  `json:"retained_from,omitempty"`
	Head     uint64  `json:"head"`
	Seconds  float64 `json:"seconds"`
}

func auditExportCmd(g *globals) *cobra.Command {
	var since uint64
	var out string
	cmd := &cobra.Command{Use: "export", Args: cobra.NoArgs, Short: "Stream every audit record as JSON lines, checking the chain",
		Long: "Writes every audit record after --since as JSON lines, one record per line: the records the\n" +
			"node pruned to its segment files, then the retained log. The hash chain is checked here as\n" +
			"the records arrive; a break stops the export with an error naming the record. --out writes\n" +
			"a new file (0600, never over an existing one; removed if the export fails).",
		RunE: func(*cobra.Command, []string) error { return g.auditExport(since, out) }}
	cmd.Flags().Uint64Var(&since, "since", 0, "records after this sequence number (0: everything the node holds)")
	cmd.Flags().StringVar(&out, "out", "", "write to this new file instead of stdout")
	return cmd
}

func (g *globals) auditExport(since uint64, out string) (err error) {
	var dst io.Writer = g.out
	var f *newFile
	if out != "" && out != "-" {
		if f, err = createNew(out); err != nil {
			return err
		}
		dst = f
		defer func() {
			if err != nil {
				err = f.abort(err)
			}
		}()
	}
	w := bufio.NewWriterSize(dst, 1<<20)
	res := &exportResult{File: out}
	if out == "-" {
		res.File = ""
	}
	ch := &chain{start: since + 1}
	var v any
	err = g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
		ctx, touch, done := g.idle(ctx)
		defer done()
		start := time.Now()
		last := start
		err := c.AuditExport(ctx, &api.AuditRequest{After: since}, func(l *api.AuditList) error {
			touch()
			if res.Head == 0 {
				res.Head, res.Retained = l.Head, l.First
			}
			good, cerr := ch.page(l.Records)
			for i := range l.Records[:good] {
				b, err := json.Marshal(&l.Records[i])
				if err != nil {
					return err
				}
				w.Write(b)
				if err := w.WriteByte('\n'); err != nil {
					return err
				}
			}
			if cerr != nil {
				return cerr
			}
			if now := time.Now(); now.Sub(last) >= progressEvery {
				last = now
				g.note("audit export: %d records, at record %d of head %d, %.0f s\n", ch.n, ch.seq, res.Head, now.Sub(start).Seconds())
			}
			return nil
		})
		if err != nil {
			var ce *chainError
			if errors.As(err, &ce) {
				if f == nil {
					// The records before the break, all checked.
					if ferr := w.Flush(); ferr != nil {
						return nil, fmt.Errorf("%w (and writing the records before it failed: %v)", err, ferr)
					}
				}
				return nil, err
			}
			return nil, fmt.Errorf("audit export: %w", streamErr(ctx, err))
		}
		if ch.n > 0 && ch.seq < res.Head {
			return nil, fmt.Errorf("audit export: the node's records end at %d, its head was %d", ch.seq, res.Head)
		}
		if err := w.Flush(); err != nil {
			return nil, err
		}
		if f != nil {
			if err := f.finish(); err != nil {
				return nil, err
			}
		}
		res.Records, res.From, res.To, res.LastHash = ch.n, ch.first, ch.seq, ch.hash
		res.Seconds = time.Since(start).Seconds()
		v = res
		return nil, nil
	}, nil)
	if err != nil {
		return err
	}
	// The records went to out; the summary goes to stdout only when out
	// is a file, else to stderr.
	text := func(w *bufio.Writer, _ any) {
		switch {
		case res.Records == 0:
			fmt.Fprintf(w, "no audit records after %d (head %d)\n", since, res.Head)
		default:
			fmt.Fprintf(w, "exported records %d..%d (%d records)", res.From, res.To, res.Records)
			if res.File != "" {
				fmt.Fprintf(w, " to %s", res.File)
			}
			fmt.Fprintf(w, "; hash chain intact, last hash %.16s", res.LastHash)
			if res.Retained > res.From {
				fmt.Fprintf(w, "; records before %d from the node's segment files", res.Retained)
			}
			fmt.Fprintf(w, "; %.1f s\n", res.Seconds)
		}
	}
	if f == nil {
		// A note, as g.note: the records reached stdout, checked above.
		w := bufio.NewWriter(g.errOut)
		text(w, nil)
		_ = w.Flush()
		return nil
	}
	return g.print(v, text)
}

// verifyResult is what audit verify found: the walk here, and the node's
// own check (which also verifies every checkpoint signature).
type verifyResult struct {
	Records  int              `json:"records"`
	From     uint64           `json:"from,omitempty"`
	To       uint64           `json:"to,omitempty"`
	Pages    int              `json:"pages"`
	Intact   bool             `json:"intact"`
	FirstBad uint64           `json:"first_bad,omitempty"`
	Error    string           `json:"error,omitempty"`
	PrunedAt uint64           `json:"prune_record,omitempty"`
	Warnings []string         `json:"warnings,omitempty"`
	Node     *api.AuditVerify `json:"node"`
	Retained uint64           `json:"retained_from,omitempty"`
}

func auditVerifyCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "verify", Args: cobra.NoArgs, Short: "Check the hash chain and the signed checkpoints; report the first break",
		Long: "Pages through the retained audit log and checks the hash chain here, across pages, and asks\n" +
			"the node to check it too, with every checkpoint's HSM signature against the roots. Records\n" +
			"pruned to segment files are checked with sigilctl audit verify-segment.",
		RunE: func(*cobra.Command, []string) error { return g.auditVerify() }}
}

func (g *globals) auditVerify() error {
	res := &verifyResult{}
	err := g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
		var (
			ch     chain
			link   pruneLink
			after  uint64
			target uint64
			start  = time.Now()
			last   = start
		)
		for {
			rctx, cancel := g.request(ctx)
			l, err := c.AuditList(rctx, &api.AuditRequest{After: after, Limit: pageSize})
			cancel()
			if err != nil {
				return nil, err
			}
			res.Pages++
			if res.Pages == 1 {
				target, res.Retained = l.Head, l.First
			}
			if len(l.Records) == 0 {
				break
			}
			if ch.n > 0 && l.Records[0].Seq != after+1 && l.First > after+1 {
				return nil, fmt.Errorf("audit verify: records %d..%d were pruned while the check ran; run it again", after+1, l.First-1)
			}
			good, cerr := ch.page(l.Records)
			if link.first == 0 && ch.n > 0 {
				link.first, link.prev = ch.first, l.Records[0].Prev
			}
			link.see(l.Records[:good])
			if cerr != nil {
				var ce *chainError
				errors.As(cerr, &ce)
				res.FirstBad, res.Error = ce.Seq, ce.Err.Error()
				break
			}
			after = ch.seq
			if after >= target {
				break
			}
			if now := time.Now(); now.Sub(last) >= progressEvery {
				last = now
				g.note("audit verify: %d records checked, at record %d of head %d, %.0f s\n", ch.n, ch.seq, target, now.Sub(start).Seconds())
			}
		}
		res.Records, res.From, res.To = ch.n, ch.first, ch.seq
		res.Intact = res.Error == ""
		res.PrunedAt = link.at
		switch {
		case link.problem != "":
			res.Intact, res.FirstBad, res.Error = false, link.first, link.problem
		case res.Intact && link.first > 1 && link.at == 0:
			res.Warnings = append(res.Warnings, fmt.Sprintf("no retained audit.prune record accounts for records 1..%d before the first retained record", link.first-1))
		}
		rctx, cancel := g.request(ctx)
		defer cancel()
		var err error
		if res.Node, err = c.AuditVerify(rctx, &api.Empty{}); err != nil {
			return nil, err
		}
		return res, nil
	}, func(w *bufio.Writer, _ any) { res.text(w) })
	if err != nil {
		return err
	}
	if !res.Intact || !res.Node.Intact {
		return fmt.Errorf("audit verification FAILED at record %d", res.firstBad())
	}
	return nil
}

func (r *verifyResult) firstBad() uint64 {
	switch {
	case r.Intact:
		return r.Node.FirstBad
	case r.Node.Intact:
		return r.FirstBad
	}
	return min(r.FirstBad, r.Node.FirstBad)
}

func (r *verifyResult) text(w *bufio.Writer) {
	n := r.Node
	if n.Intact {
		count := uint64(0)
		if n.To >= n.From && n.From > 0 {
			count = n.To - n.From + 1
		}
		fmt.Fprintf(w, "verified records %d..%d (%d records); ", n.From, n.To, count)
		if n.Checkpoints == 0 {
			fmt.Fprintln(w, "no checkpoints signed by node HSM keys yet: all records are protected by the hash chain only")
		} else {
			fmt.Fprintf(w, "%d checkpoints signed by node HSM keys, last at %d; records after it are protected by the hash chain only\n", n.Checkpoints, n.LastCheckpoint)
		}
	} else {
		fmt.Fprintf(w, "FAILED: the node's check found record %d bad: %s\n", n.FirstBad, n.Error)
	}
	if r.Intact {
		fmt.Fprintf(w, "checked here: records %d..%d (%d records, %s), hash chain intact\n", r.From, r.To, r.Records, plural(r.Pages, "page"))
	} else {
		fmt.Fprintf(w, "FAILED: the check here found record %d bad: %s\n", r.FirstBad, r.Error)
	}
	if r.Retained > 1 && r.PrunedAt != 0 {
		fmt.Fprintf(w, "records 1..%d were pruned to the nodes' segment files (audit.prune at record %d links them): check them with sigilctl audit verify-segment\n", r.Retained-1, r.PrunedAt)
	}
	for _, x := range r.Warnings {
		fmt.Fprintln(w, "warning:", x)
	}
}

// segmentResult is what verify-segment found in one file.
type segmentResult struct {
	File     string `json:"file"`
	Node     string `json:"node,omitempty"`
	First    uint64 `json:"first,omitempty"`
	Last     uint64 `json:"last,omitempty"`
	Prev     string `json:"prev,omitempty"`
	LastHash string `json:"last_hash,omitempty"`
	Signed   bool   `json:"signed"`
	Signer   string `json:"signer,omitempty"` // the signing certificate's subject
	Error    string `json:"error,omitempty"`
}

type segmentsResult struct {
	Files []segmentResult `json:"files"`
	// Links lists breaks between consecutive files (by first record).
	Links  []string `json:"links,omitempty"`
	Intact bool     `json:"intact"`
}

func auditVerifySegmentCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "verify-segment FILE...", Args: cobra.MinimumNArgs(1),
		Short: "Check exported audit segment files offline, against the root (--root)",
		Long: "Checks segment files (audit-<first>-<last>.jsonl in a node's audit export directory) without a\n" +
			"node: each file's hash chain from its header's prev hash, and its closing checkpoint, which\n" +
			"the exporting node's HSM key signed, against the root certificate(s) in --root. Files are\n" +
			"taken in order of their first record, and each must continue the one before: its header's\n" +
			"prev hash is the previous file's last record hash.",
		RunE: func(_ *cobra.Command, args []string) error { return g.verifySegments(args) }}
}

func (g *globals) verifySegments(files []string) error {
	if g.dial.RootFile == "" {
		return errors.New("--root (or $SIGIL_ROOT) is required: segments are verified against the root certificate")
	}
	roots, err := api.ReadCerts(g.dial.RootFile)
	if err != nil {
		return err
	}
	res := &segmentsResult{Intact: true}
	for _, name := range files {
		sr := segmentResult{File: name}
		if err := readSegment(name, roots, &sr); err != nil {
			sr.Error = err.Error()
			res.Intact = false
		}
		res.Files = append(res.Files, sr)
	}
	ordered := slices.Clone(res.Files)
	slices.SortStableFunc(ordered, func(a, b segmentResult) int {
		switch {
		case a.First < b.First:
			return -1
		case a.First > b.First:
			return 1
		}
		return 0
	})
	var prev *segmentResult
	for i := range ordered {
		s := &ordered[i]
		if s.Error != "" {
			prev = nil // the link around a bad file cannot be checked
			continue
		}
		switch {
		case prev == nil:
		case s.First != prev.Last+1:
			res.Links = append(res.Links, fmt.Sprintf("%s starts at record %d, but %s ends at %d", s.File, s.First, prev.File, prev.Last))
		case s.Prev != prev.LastHash:
			res.Links = append(res.Links, fmt.Sprintf("%s does not continue %s: its prev hash %.16s is not record %d's hash %.16s", s.File, prev.File, s.Prev, prev.Last, prev.LastHash))
		}
		prev = s
	}
	if len(res.Links) > 0 {
		res.Intact = false
	}
	if err := g.print(res, func(w *bufio.Writer, _ any) {
		for _, s := range res.Files {
			if s.Error != "" {
				fmt.Fprintf(w, "FAILED %s: %s\n", s.File, s.Error)
				continue
			}
			fmt.Fprintf(w, "%s: records %d..%d, chain intact, checkpoint signed by %s (%s) verifies against the root\n", s.File, s.First, s.Last, s.Node, s.Signer)
		}
		for _, l := range res.Links {
			fmt.Fprintf(w, "FAILED link: %s\n", l)
		}
		if res.Intact {
			fmt.Fprintf(w, "%d segment files intact and linked: records %d..%d\n", len(ordered), ordered[0].First, ordered[len(ordered)-1].Last)
		}
	}); err != nil {
		return err
	}
	if !res.Intact {
		bad := 0
		for _, s := range res.Files {
			if s.Error != "" {
				bad++
			}
		}
		return fmt.Errorf("audit segments FAILED: %d of %d files bad, %d broken links", bad, len(res.Files), len(res.Links))
	}
	return nil
}

// readSegment verifies one segment file with state.ReadSegment.
func readSegment(name string, roots []*x509.Certificate, sr *segmentResult) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }() // read only
	var last api.AuditRecord
	tail := &tailBuffer{max: 64 << 10}
	rep, err := state.ReadSegment(io.TeeReader(bufio.NewReaderSize(f, 1<<20), tail), roots, func(r *api.AuditRecord) error {
		last = *r
		return nil
	})
	h := rep.Header
	sr.Node, sr.First, sr.Last, sr.Prev, sr.Signed = h.Node, h.First, h.Last, h.Prev, rep.Signed
	sr.LastHash = last.Hash
	if err == nil && rep.Signed {
		// The closing checkpoint (verified above) names the node and
		// carries the certificate of the key that signed it.
		lines := bytes.Split(bytes.TrimRight(tail.b, "\n"), []byte("\n"))
		var cl struct{ Checkpoint *state.AuditCheckpoint }
		if json.Unmarshal(lines[len(lines)-1], &cl) == nil && cl.Checkpoint != nil {
			sr.Node = cl.Checkpoint.Node
			if c, err := x509.ParseCertificate(cl.Checkpoint.Cert); err == nil {
				sr.Signer = c.Subject.String()
			}
		}
	}
	return err
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	b   []byte
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > 2*t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}
