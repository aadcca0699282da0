package ctl

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/selector"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

// entryFlags are the fields of an entry as flags. On update only the flags
// given change the entry (cobra's Changed): the rest keep their stored
// values.
type entryFlags struct {
	spiffeID, parentID, hint string
	selectors, add, remove   []string
	dns, ips, federatesWith  []string
	x509TTL, jwtTTL          time.Duration
	force                    bool
}

// selectorHelp lists the selectors sigil-agent produces, for --help.
func selectorHelp() string {
	var b strings.Builder
	b.WriteString("Selectors are the ones sigil-agent reads from the kernel about a caller;\nany other is refused, since no workload could ever show it:\n")
	for _, k := range selector.Kinds {
		fmt.Fprintf(&b, "  %-30s %s\n", k.Prefix()+"...", k.Form)
	}
	b.WriteString("A workload has one value of each kind but the supplementary ones, so an\nentry may not ask for two different values of any other kind.\n")
	return b.String()
}

func (f *entryFlags) register(c *cobra.Command, update bool) {
	fl := c.Flags()
	fl.StringVar(&f.spiffeID, "spiffe-id", "", "SPIFFE ID to issue")
	fl.StringVar(&f.parentID, "parent-id", "", "agent that may obtain it (spiffe://<td>/sigil/agent/...)")
	sel := "type:value the workload must show (repeatable)"
	if update {
		sel = "replace all the selectors with these (repeatable; see --add-selector, --remove-selector)"
		fl.StringArrayVar(&f.add, "add-selector", nil, "add a selector, keeping the others (repeatable)")
		fl.StringArrayVar(&f.remove, "remove-selector", nil, "remove a selector, keeping the others (repeatable)")
	}
	fl.StringArrayVar(&f.selectors, "selector", nil, sel)
	fl.DurationVar(&f.x509TTL, "x509-ttl", 0, "X.509-SVID lifetime; 0 means the default, 1h")
	fl.DurationVar(&f.jwtTTL, "jwt-ttl", 0, "JWT-SVID lifetime; 0 means the default, 5m")
	fl.StringArrayVar(&f.dns, "dns", nil, "DNS SAN (repeatable; on update the list replaces the stored one, --dns '' clears it)")
	fl.StringArrayVar(&f.ips, "ip", nil, "IP SAN, IPv4 or IPv6 (repeatable; on update the list replaces the stored one, --ip '' clears it)")
	fl.StringArrayVar(&f.federatesWith, "federates-with", nil, "foreign trust domain (a federation relationship) whose bundle the entry's workloads get (repeatable; on update the list replaces the stored one, --federates-with '' clears it)")
	fl.StringVar(&f.hint, "hint", "", "hint for workloads with several identities (a workload that matches two entries with one hint gets it on the older entry's SVID only)")
	fl.BoolVar(&f.force, "force", false, "register the entry even though its parent is not a joined, unbanned agent (one that has yet to join, say)")
}

// parseSelectors splits type:value selectors; the appliance checks them.
func parseSelectors(flag string, in []string) ([]api.Selector, error) {
	var out []api.Selector
	for _, s := range in {
		typ, val, found := strings.Cut(s, ":")
		if !found {
			return nil, clirun.Usagef("--%s %q: want type:value, e.g. unix:uid:1000", flag, s)
		}
		out = append(out, api.Selector{Type: typ, Value: val})
	}
	return out, nil
}

// dnsNames drops empty names, so that an empty --dns (or --federates-with)
// means none.
func dnsNames(in []string) []string {
	var out []string
	for _, n := range in {
		if n != "" {
			out = append(out, n)
		}
	}
	return out
}

// ipAddresses drops empty addresses, so that an empty --ip means none, and
// writes each address the appliance can parse in the canonical form it
// stores (fd00:0::1 as fd00::1, ::ffff:10.0.0.5 as 10.0.0.5, which is
// also how a certificate carries it). The appliance checks the rest.
func ipAddresses(in []string) []string {
	var out []string
	for _, s := range in {
		if s == "" {
			continue
		}
		if a, err := netip.ParseAddr(s); err == nil && a.Zone() == "" {
			s = a.Unmap().String()
		}
		out = append(out, s)
	}
	return out
}

// warnSharedHint says on stderr which other entries of e's parent have
// e's hint: a workload that matches several of them gets the hint on the
// oldest one's SVID only (the Workload API's hints are unique within a
// response). Entries of one parent with one hint may well match disjoint
// workloads, so this is a warning, and the entry stays. It is sigilctl's
// check, after the change, from the parent's entry list: the appliance
// itself does not refuse or warn.
func (g *globals) warnSharedHint(ctx context.Context, c *api.AdminClient, e *api.Entry) {
	if e == nil || e.Hint == "" {
		return
	}
	l, err := c.EntryList(ctx, &api.EntryListRequest{ParentID: e.ParentID})
	if err != nil {
		g.note("warning: could not check whether other entries of %s have hint %q: %v\n", e.ParentID, e.Hint, err)
		return
	}
	var others []string
	for _, o := range l.Entries {
		if o.ID != e.ID && o.Hint == e.Hint {
			others = append(others, o.ID+" ("+o.SPIFFEID+")")
		}
	}
	if len(others) > 0 {
		g.note("warning: hint %q is also on entry %s of parent %s: a workload that matches several of them gets the hint on the oldest entry's SVID only\n",
			e.Hint, strings.Join(others, ", "), e.ParentID)
	}
}

// putEntry sends an entry create or update. With --force it first asks
// without force: when the appliance refuses the entry's parent, it says
// which check --force overrides, then forces it. An entry that needs no
// override is not forced.
func (g *globals) putEntry(ctx context.Context, call func(context.Context, *api.EntryRequest) (*api.Entry, error), e api.Entry, force bool) (*api.Entry, error) {
	out, err := call(ctx, &api.EntryRequest{Entry: e})
	if err == nil || !strings.Contains(err.Error(), api.ForceParentHint) {
		return out, err
	}
	reason := strings.TrimSpace(strings.TrimSuffix(status.Convert(err).Message(), api.ForceParentHint))
	if !force {
		return nil, fmt.Errorf("%s (--force registers it anyway)", reason)
	}
	g.note("forced: %s\n", reason)
	return call(ctx, &api.EntryRequest{Entry: e, Force: true})
}

func entryCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "entry", Short: "Registration entries"}

	var cf entryFlags
	create := &cobra.Command{Use: "create", Short: "Create an entry", Args: cobra.NoArgs, Long: "Create a registration entry: workloads that show all its selectors to the\nagent named by --parent-id get its SPIFFE ID.\n\n" + selectorHelp(),
		RunE: func(*cobra.Command, []string) error {
			sel, err := parseSelectors("selector", cf.selectors)
			if err != nil {
				return err
			}
			e := api.Entry{SPIFFEID: cf.spiffeID, ParentID: cf.parentID, Selectors: sel, DNSNames: dnsNames(cf.dns), IPAddresses: ipAddresses(cf.ips), FederatesWith: dnsNames(cf.federatesWith), Hint: cf.hint}
			if e.X509TTL, err = wholeSeconds("x509-ttl", cf.x509TTL); err != nil {
				return err
			}
			if e.JWTTTL, err = wholeSeconds("jwt-ttl", cf.jwtTTL); err != nil {
				return err
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				out, err := g.putEntry(ctx, c.EntryCreate, e, cf.force)
				if err == nil {
					g.warnSharedHint(ctx, c, out)
				}
				return out, err
			}, printEntry)
		}}
	cf.register(create, false)

	var uf entryFlags
	update := &cobra.Command{Use: "update ID", Short: "Change fields of an entry", Args: cobra.ExactArgs(1),
		Long: "Change the fields of an entry that flags are given for; the others keep\ntheir values. --selector replaces all the selectors, --add-selector and\n--remove-selector change some. --x509-ttl 0 or --jwt-ttl 0 go back to the\ndefault, --hint '', --dns '' and --ip '' clear. What changed is printed as\nold -> new. The change applies to the entry as it was read: if someone\nchanged it meanwhile, the update is refused, and repeating it is safe.\n\n" + selectorHelp(),
		RunE: func(cmd *cobra.Command, args []string) error {
			ch, err := uf.changes(cmd)
			if err != nil {
				return err
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				old, err := c.EntryShow(ctx, &api.IDRequest{ID: args[0]})
				if err != nil {
					return nil, err
				}
				e, err := ch(*old)
				if err != nil {
					return nil, err
				}
				if len(entryDiff(stored(*old), stored(e))) == 0 {
					return &entryUpdate{Entry: old, Changes: []fieldChange{}}, nil
				}
				out, err := g.putEntry(ctx, c.EntryUpdate, e, uf.force)
				if err != nil {
					return nil, err
				}
				if out.Hint != old.Hint || out.ParentID != old.ParentID {
					g.warnSharedHint(ctx, c, out)
				}
				return &entryUpdate{Entry: out, Changes: entryDiff(old, out)}, nil
			}, printUpdate)
		}}
	uf.register(update, true)

	var filter api.EntryListRequest
	list := &cobra.Command{Use: "list", Short: "List entries", Args: cobra.NoArgs, RunE: func(*cobra.Command, []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			l, err := c.EntryList(ctx, &filter)
			if err != nil {
				return nil, err
			}
			return nonNil(l.Entries), nil
		},
			func(w *bufio.Writer, v any) {
				var rows [][]string
				for _, e := range v.([]api.Entry) {
					rows = append(rows, []string{e.ID, e.SPIFFEID, e.ParentID, selectorString(e.Selectors),
						ttlString(e.X509TTL, e.EffectiveX509TTL), ttlString(e.JWTTTL, e.EffectiveJWTTTL)})
				}
				table(w, "ID\tSPIFFE ID\tPARENT\tSELECTORS\tX509 TTL\tJWT TTL", rows)
			})
	}}
	list.Flags().StringVar(&filter.ParentID, "parent-id", "", "only entries of this parent")
	list.Flags().StringVar(&filter.SPIFFEID, "spiffe-id", "", "only entries for this SPIFFE ID")
	show := &cobra.Command{Use: "show ID", Short: "Show an entry", Args: cobra.ExactArgs(1), RunE: func(_ *cobra.Command, args []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.EntryShow(ctx, &api.IDRequest{ID: args[0]})
		}, printEntry)
	}}
	del := &cobra.Command{Use: "delete ID", Short: "Delete an entry", Args: cobra.ExactArgs(1), RunE: func(_ *cobra.Command, args []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.EntryDelete(ctx, &api.IDRequest{ID: args[0]})
		}, ok("deleted "+args[0]))
	}}
	cmd.AddCommand(create, update, list, show, del)
	return cmd
}

// changes checks the update's flags and returns the function that applies
// them to the stored entry.
func (f *entryFlags) changes(cmd *cobra.Command) (func(api.Entry) (api.Entry, error), error) {
	changed := cmd.Flags().Changed
	fields := []string{"spiffe-id", "parent-id", "selector", "add-selector", "remove-selector", "x509-ttl", "jwt-ttl", "dns", "ip", "federates-with", "hint"}
	if !slices.ContainsFunc(fields, changed) {
		return nil, clirun.Usagef("nothing to change: give at least one of --%s", strings.Join(fields, ", --"))
	}
	if changed("selector") && (changed("add-selector") || changed("remove-selector")) {
		return nil, clirun.Usagef("--selector replaces all the selectors: give it alone, or --add-selector and --remove-selector")
	}
	sel, err := parseSelectors("selector", f.selectors)
	if err != nil {
		return nil, err
	}
	add, err := parseSelectors("add-selector", f.add)
	if err != nil {
		return nil, err
	}
	remove, err := parseSelectors("remove-selector", f.remove)
	if err != nil {
		return nil, err
	}
	x509TTL, err := wholeSeconds("x509-ttl", f.x509TTL)
	if err != nil {
		return nil, err
	}
	jwtTTL, err := wholeSeconds("jwt-ttl", f.jwtTTL)
	if err != nil {
		return nil, err
	}
	return func(e api.Entry) (api.Entry, error) {
		e.Selectors = slices.Clone(e.Selectors)
		if changed("spiffe-id") {
			e.SPIFFEID = f.spiffeID
		}
		if changed("parent-id") {
			e.ParentID = f.parentID
		}
		if changed("selector") {
			e.Selectors = sel
		}
		for _, s := range remove {
			i := slices.Index(e.Selectors, s)
			if i < 0 {
				return e, fmt.Errorf("--remove-selector %s: entry %s has no such selector (it has %s)", s, e.ID, selectorString(e.Selectors))
			}
			e.Selectors = slices.Delete(e.Selectors, i, i+1)
		}
		for _, s := range add {
			if slices.Contains(e.Selectors, s) {
				return e, fmt.Errorf("--add-selector %s: entry %s already has it", s, e.ID)
			}
			e.Selectors = append(e.Selectors, s)
		}
		if changed("x509-ttl") {
			e.X509TTL = x509TTL
		}
		if changed("jwt-ttl") {
			e.JWTTTL = jwtTTL
		}
		if changed("dns") {
			e.DNSNames = dnsNames(f.dns)
		}
		if changed("ip") {
			e.IPAddresses = ipAddresses(f.ips)
		}
		if changed("federates-with") {
			e.FederatesWith = dnsNames(f.federatesWith)
		}
		if changed("hint") {
			e.Hint = f.hint
		}
		// e keeps the stored revision, so that the update applies to it
		// only.
		return e, nil
	}, nil
}

// stored is an entry without what the appliance derives (the effective
// TTLs), to compare what is stored.
func stored(e api.Entry) *api.Entry {
	e.EffectiveX509TTL, e.EffectiveJWTTTL = 0, 0
	return &e
}

// entryUpdate is what entry update prints: the stored entry and what
// changed (none when the flags gave the stored values: nothing was
// written).
type entryUpdate struct {
	Entry   *api.Entry    `json:"entry"`
	Changes []fieldChange `json:"changes"`
}

type fieldChange struct {
	Field string `json:"field"`
	Old   string `json:"old"`
	New   string `json:"new"`
}

// entryDiff lists the fields that differ, as entry show writes them.
func entryDiff(old, e *api.Entry) []fieldChange {
	out := []fieldChange{}
	oldRows, newRows := entryRows(old), entryRows(e)
	for i, r := range oldRows {
		if r[0] == "id" || r[0] == "revision" {
			continue
		}
		if r[1] != newRows[i][1] {
			out = append(out, fieldChange{Field: r[0], Old: r[1], New: newRows[i][1]})
		}
	}
	return out
}

func printUpdate(w *bufio.Writer, v any) {
	u := v.(*entryUpdate)
	if len(u.Changes) == 0 {
		fmt.Fprintf(w, "entry %s unchanged: the flags give its stored values\n", u.Entry.ID)
		return
	}
	fmt.Fprintf(w, "updated entry %s (revision %d)\n", u.Entry.ID, u.Entry.Revision)
	rows := make([][]string, len(u.Changes))
	for i, c := range u.Changes {
		rows[i] = []string{c.Field, orEmpty(c.Old) + " -> " + orEmpty(c.New)}
	}
	table(w, "FIELD\tCHANGE", rows)
}

func orEmpty(s string) string {
	if s == "" {
		return "(empty)"
	}
	return s
}

func selectorString(s []api.Selector) string {
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = x.String()
	}
	return strings.Join(out, ",")
}

// ttlString shows a stored TTL, or the default it stands for when it is 0
// (effective, as the appliance reports it).
func ttlString(stored, effective api.Seconds) string {
	switch {
	case stored != 0:
		return shortDuration(stored.Duration())
	case effective != 0:
		return shortDuration(effective.Duration()) + " (default)"
	}
	return "default"
}

// shortDuration writes 1h rather than 1h0m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

func entryRows(e *api.Entry) [][]string {
	return [][]string{
		{"id", e.ID}, {"spiffe_id", e.SPIFFEID}, {"parent_id", e.ParentID}, {"selectors", selectorString(e.Selectors)},
		{"x509_ttl", ttlString(e.X509TTL, e.EffectiveX509TTL)}, {"jwt_ttl", ttlString(e.JWTTTL, e.EffectiveJWTTTL)},
		{"dns_names", strings.Join(e.DNSNames, ",")}, {"ip_addresses", strings.Join(e.IPAddresses, ",")},
		{"federates_with", strings.Join(e.FederatesWith, ",")}, {"hint", e.Hint},
		{"revision", fmt.Sprint(e.Revision)},
	}
}

// printEntry writes an entry, and a warning when its selectors break the
// rules: an entry stored before the appliance enforced them still loads,
// and no workload can match it until it is updated.
func printEntry(w *bufio.Writer, v any) {
	e := v.(*api.Entry)
	rows := entryRows(e)
	sel := make([][2]string, len(e.Selectors))
	for i, s := range e.Selectors {
		sel[i] = [2]string{s.Type, s.Value}
	}
	if err := selector.CheckSet(sel); err != nil {
		rows = append(rows, []string{"warning", "no workload can match this entry: " + err.Error()})
	}
	table(w, "FIELD\tVALUE", rows)
}
