package nodeid

import (
	"fmt"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, id := range []string{"n1", "node-1", "0", "a-", strings.Repeat("a", 63)} {
		if err := Check(id); err != nil || !Valid(id) {
			t.Errorf("%q refused: %v", id, err)
		}
	}
	for _, id := range []string{"", "-a", "Node1", "node_1", "node.1", "n1\n", " n1", "n1/x", "nöde", strings.Repeat("a", 64)} {
		err := Check(id)
		if err == nil || Valid(id) {
			t.Errorf("%q accepted", id)
			continue
		}
		if want := fmt.Sprintf("node id %q: want %s", id, Pattern); err.Error() != want {
			t.Errorf("%q: %v, want %q", id, err, want)
		}
	}
}
