//go:build faults

package faults_test

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// netw is the suite's network: per node a namespace with two veth links,
// one on a cluster bridge (raft and forwarding) and one on an API bridge
// that the test process (root namespace) also sits on. Cutting a node's
// cluster link partitions it from its peers while the test can still ask
// it for things. Addresses are private and exist only on these bridges.
type netw struct {
	t      *testing.T
	tag    string
	brC    string
	brA    string
	spaces []string
}

const (
	clusterNet = "10.213.0."
	apiNet     = "10.213.1."
)

func sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func newNet(t *testing.T, n int) *netw {
	for _, tool := range []string{"ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (Debian: iproute2)", tool)
		}
	}
	tag := fmt.Sprintf("%04d", os.Getpid()%10000)
	w := &netw{t: t, tag: tag, brC: "sgc" + tag, brA: "sga" + tag}
	t.Cleanup(w.close)
	for _, br := range []string{w.brC, w.brA} {
		sh(t, "ip", "link", "add", br, "type", "bridge")
		sh(t, "ip", "link", "set", br, "up")
	}
	sh(t, "ip", "addr", "add", apiNet+"254/24", "dev", w.brA)
	for k := 1; k <= n; k++ {
		ns := fmt.Sprintf("sgf%s-%d", tag, k)
		sh(t, "ip", "netns", "add", ns)
		w.spaces = append(w.spaces, ns)
		sh(t, "ip", "-n", ns, "link", "set", "lo", "up")
		for _, l := range []struct{ inner, outer, br, addr string }{
			{fmt.Sprintf("c%d", k), w.port("c", k), w.brC, fmt.Sprintf("%s%d/24", clusterNet, k)},
			{fmt.Sprintf("a%d", k), w.port("a", k), w.brA, fmt.Sprintf("%s%d/24", apiNet, k)},
		} {
			sh(t, "ip", "link", "add", l.outer, "type", "veth", "peer", "name", l.inner, "netns", ns)
			sh(t, "ip", "link", "set", l.outer, "master", l.br, "up")
			sh(t, "ip", "-n", ns, "addr", "add", l.addr, "dev", l.inner)
			sh(t, "ip", "-n", ns, "link", "set", l.inner, "up")
		}
	}
	return w
}

func (w *netw) port(kind string, k int) string { return fmt.Sprintf("sg%s%s%d", kind, w.tag, k) }

// partition cuts node k's cluster link; heal restores it.
func (w *netw) partition(k int) { sh(w.t, "ip", "link", "set", w.port("c", k), "down") }
func (w *netw) heal(k int)      { sh(w.t, "ip", "link", "set", w.port("c", k), "up") }

func (w *netw) close() {
	// Each is tried even if one fails; what stays is printed for whoever
	// cleans the machine up.
	for _, ns := range w.spaces {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "faults: netns %s left behind: %v %s\n", ns, err, out)
		}
	}
	for _, br := range []string{w.brC, w.brA} {
		if out, err := exec.Command("ip", "link", "del", br).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "faults: bridge %s left behind: %v %s\n", br, err, out)
		}
	}
}
