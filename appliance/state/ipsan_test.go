package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// IP SANs are a field of version 6 commands (IPSANVersion): nodes of
// earlier versions refused ip_addresses as unknown, so a version 5
// command that has it is refused as they refused it, whether it creates,
// updates or restores entries; from version 6 each address is checked.
func TestIPSANsByVersion(t *testing.T) {
	a := newApplier(t)
	v5 := func(typ string, p any) error {
		t.Helper()
		a.index++
		pl, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		cmd, err := json.Marshal(Command{Version: 5, Type: typ, Actor: actorFor(typ), ActorSerial: testSerial, Time: t0, Payload: pl})
		if err != nil {
			t.Fatal(err)
		}
		_, err = a.fsm.Apply(a.index, origin, cmd)
		return err
	}
	withIPs := func(e *Entry, ips ...string) *Entry { e.IPAddresses = ips; return e }

	if err := v5(CmdEntryCreate, withIPs(entry("entry-0001", "spiffe://example.org/web", "unix:uid:1"), "10.0.0.5")); !errors.Is(err, ErrRefused) ||
		!strings.Contains(err.Error(), "ip_addresses is a field of version 6 commands, not of version 5") {
		t.Fatalf("version 5 entry.create with ip_addresses: %v", err)
	}
	if len(a.fsm.Entries()) != 0 {
		t.Fatal("a refused version 5 command stored an entry")
	}
	if err := v5(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")); err != nil {
		t.Fatalf("version 5 entry.create without IP SANs: %v", err)
	}
	if err := v5(CmdEntryUpdate, withIPs(entry("entry-0001", "spiffe://example.org/web", "unix:uid:1"), "fd00::1")); !errors.Is(err, ErrRefused) ||
		!strings.Contains(err.Error(), "ip_addresses is a field of version 6") {
		t.Fatalf("version 5 entry.update with ip_addresses: %v", err)
	}

	// A version 5 restore of entries with IP SANs is refused too. The
	// archive is this state's (its audit head is ours); the payload's
	// entries are given an address, as a crafted command could.
	var arch bytes.Buffer
	if _, err := a.fsm.WriteArchive(&arch, "node-1", t0); err != nil {
		t.Fatal(err)
	}
	p, _, _, err := a.fsm.ReadArchive(bytes.NewReader(arch.Bytes()), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p.Entries[0].IPAddresses = []string{"10.0.0.5"}
	if err := v5(CmdStateRestore, p); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "ip_addresses is a field of version 6") {
		t.Fatalf("version 5 restore with ip_addresses: %v", err)
	}
	if e, _ := a.fsm.Entry("entry-0001"); len(e.IPAddresses) != 0 {
		t.Fatal("a refused restore stored IP SANs")
	}

	// Version 6: each address is checked.
	before, _ := a.fsm.Export()
	many := make([]string, MaxIPAddresses+1)
	for i := range many {
		many[i] = fmt.Sprintf("10.0.1.%d", i+1)
	}
	for _, tc := range []struct {
		ips  []string
		want string
	}{
		{[]string{"10.0.0.256"}, `ip address "10.0.0.256": not an IPv4 or IPv6 address`},
		{[]string{"web.example.org"}, "not an IPv4 or IPv6 address"},
		{[]string{""}, "not an IPv4 or IPv6 address"},
		{[]string{"0.0.0.0"}, "0.0.0.0 is the unspecified address"},
		{[]string{"::"}, ":: is the unspecified address"},
		{[]string{"224.0.0.1"}, "224.0.0.1 is a multicast address"},
		{[]string{"ff02::1"}, "ff02::1 is a multicast address"},
		{[]string{"255.255.255.255"}, "is the broadcast address"},
		{[]string{"fe80::1%eth0"}, "a zone is not allowed"},
		{[]string{"::ffff:10.0.0.5"}, "write the IPv4 address (10.0.0.5)"},
		{[]string{"FD00:0::1"}, `"FD00:0::1": write it as fd00::1`},
		{[]string{"10.0.0.5", "10.0.0.5"}, "ip address 10.0.0.5 given twice"},
		{many, fmt.Sprintf("has %d IP addresses; at most %d", MaxIPAddresses+1, MaxIPAddresses)},
	} {
		_, err := a.apply(CmdEntryCreate, t0, withIPs(entry("entry-0002", "spiffe://example.org/db", "unix:uid:2"), tc.ips...))
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ip_addresses %q: %v, want a refusal containing %q", tc.ips, err, tc.want)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused entries changed the state")
	}
	a.must(CmdEntryUpdate, withIPs(entry("entry-0001", "spiffe://example.org/web", "unix:uid:1"), "10.0.0.5", "fd00::1"))
	if e, _ := a.fsm.Entry("entry-0001"); strings.Join(e.IPAddresses, ",") != "10.0.0.5,fd00::1" {
		t.Fatalf("stored IP SANs %q", e.IPAddresses)
	}

	// A raft snapshot carries them.
	snap, err := a.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := snap.Persist(&buf); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	b := newFSM(t)
	if err := b.Restore(&buf); err != nil {
		t.Fatal(err)
	}
	if e, _ := b.Entry("entry-0001"); strings.Join(e.IPAddresses, ",") != "10.0.0.5,fd00::1" {
		t.Fatalf("IP SANs after a snapshot: %q", e.IPAddresses)
	}
}

// A raft snapshot is checked as it loads: an entry with an IP SAN the
// state machine would refuse (written into the store behind its back)
// fails the load.
func TestSnapshotRefusesBadIPSAN(t *testing.T) {
	a := newApplier(t)
	a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1"))
	bad := entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")
	bad.IPAddresses = []string{"224.0.0.1"}
	if err := a.fsm.db.Update(func(tx *bolt.Tx) error { return putJSON(tx.Bucket(bEntries), []byte(bad.ID), bad) }); err != nil {
		t.Fatal(err)
	}
	snap, err := a.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := snap.Persist(&buf); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	if err := newFSM(t).Restore(&buf); err == nil || !strings.Contains(err.Error(), "224.0.0.1 is a multicast address") {
		t.Fatalf("snapshot with a multicast IP SAN: %v", err)
	}
}
