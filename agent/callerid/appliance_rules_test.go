package callerid_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/sigil-appliance/sigil/agent/callerid"
	"github.com/sigil-appliance/sigil/appliance/selector"
)

// The appliance refuses entries whose selectors the agent never produces
// (appliance/selector). These tests hold the two together: every selector
// a real attestation gives passes the appliance's rules, every kind the
// appliance accepts is one Attest adds, and Attest adds no kind the
// appliance would refuse. Changing either side without the other fails
// here, not in the field as a workload that never gets an identity.

func checkAll(t *testing.T, sel callerid.Selectors) map[string]bool {
	t.Helper()
	kinds := map[string]bool{}
	var set [][2]string
	for _, s := range sel.List() {
		typ, val, _ := strings.Cut(s, ":")
		if err := selector.Check(typ, val); err != nil {
			t.Errorf("the agent produced %s, which the appliance refuses: %v", s, err)
		}
		name, _, _ := strings.Cut(val, ":")
		kinds[typ+":"+name] = true
		set = append(set, [2]string{typ, val})
	}
	if err := selector.CheckSet(set); err != nil {
		t.Errorf("the appliance refuses the set one caller showed: %v", err)
	}
	return kinds
}

// A root caller with a supplementary group, in a container runtime's
// systemd scope, shows every kind of selector.
func TestApplianceAcceptsAttestedSelectors(t *testing.T) {
	d := newCallerDir(t)
	base := cgroupBase(t)
	id := "4f1c0e2a9b7d6c5e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e"
	dir := mkCgroup(t, filepath.Join(base, "rules", "system.slice", "docker-"+id+".scope"))
	root := exec.Command(d.bin)
	root.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: 0, Groups: []uint32{0}}}
	kinds := checkAll(t, d.attest(t, startIn(t, root, dir)))
	for _, k := range selector.Kinds {
		if !kinds[k.Type+":"+k.Name] {
			t.Errorf("the appliance accepts %s selectors, which this caller did not show: %v", k.Prefix(), kinds)
		}
	}
	// A uid with no name in the user database.
	checkAll(t, d.attest(t, startIn(t, d.asUser(), dir)))

	// Unit and container names from every cgroup layout the agent reads.
	for _, cg := range []string{
		"0::/system.slice/web.service\n",
		"0::/system.slice/system-getty.slice/getty@tty1.service\n",
		"0::/user.slice/user-1000.slice/session-3.scope\n",
		"0::/system.slice/docker-" + id + ".scope\n",
		"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-" + id + ".scope\n",
		"0::/kubepods/burstable/pod1/crio-" + id + "\n",
		"0::/libpod_parent/libpod-" + id + "\n",
		"1:name=systemd:/system.slice/cron.service\n0::/\n",
	} {
		if u := callerid.SystemdUnit([]byte(cg)); u != "" {
			if err := selector.Check("systemd", "unit:"+u); err != nil {
				t.Errorf("%q: the appliance refuses unit %s: %v", cg, u, err)
			}
		}
		if c := callerid.ContainerID([]byte(cg)); c != "" {
			if err := selector.Check("container", "id:"+c); err != nil {
				t.Errorf("%q: the appliance refuses container %s: %v", cg, c, err)
			}
		}
	}
}

// Every add(TYPE, "NAME:"+...) in Attest names a kind the appliance
// accepts, and every kind it accepts is added there.
func TestApplianceKindsMatchAttest(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "selectors.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var added []string
	ast.Inspect(f, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok || len(call.Args) != 2 {
			return true
		}
		if fn, ok := call.Fun.(*ast.Ident); !ok || fn.Name != "add" {
			return true
		}
		typ, ok := call.Args[0].(*ast.BasicLit)
		if !ok {
			t.Errorf("add with a type that is not a literal: the appliance's rules cannot be checked against it")
			return true
		}
		val := call.Args[1]
		if b, ok := val.(*ast.BinaryExpr); ok {
			val = b.X
		}
		lit, ok := val.(*ast.BasicLit)
		if !ok {
			t.Errorf("add with a value that does not start with a literal NAME:")
			return true
		}
		ty, _ := strconv.Unquote(typ.Value)
		v, _ := strconv.Unquote(lit.Value)
		name, _, found := strings.Cut(v, ":")
		if !found {
			t.Errorf("add(%s, %s): no NAME: prefix", typ.Value, lit.Value)
		}
		added = append(added, ty+":"+name)
		return true
	})
	var accepted []string
	for _, k := range selector.Kinds {
		accepted = append(accepted, k.Type+":"+k.Name)
	}
	slices.Sort(added)
	added = slices.Compact(added)
	slices.Sort(accepted)
	if !slices.Equal(added, accepted) {
		t.Fatalf("Attest adds %v; the appliance accepts %v", added, accepted)
	}
}
