package ctl_test

import (
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// sigilctl node issuing-cert install gives a node its renewed issuing CA
// (and is refused, naming the node, by a node the certificate is not
// for); sigilctl cluster status lists the trust chain's expiries and
// warns about those within --warn-within.
func TestSigilctlIssuingCertAndExpiryWarnings(t *testing.T) {
	tr := clustertest.NewTrust(t, "ci", []string{"node-1", "node-2"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	run, must, _ := cli(t)
	with := func(args ...string) []string {
		return append([]string{"--server", c.ConfigOf("node-1").API.Listen, "--cert", c.AdminCert, "--key", c.AdminKey, "--root", tr.RootPath}, args...)
	}
	oldSerial := tr.Nodes["node-1"].Issuing.SerialNumber.Text(16)
	var out string
	clustertest.Eventually(t, 30*time.Second, "node-1's issuing CA in cluster status", func() bool {
		out = must(with("cluster", "status")...)
		return regexp.MustCompile(`issuing-ca\s+node-1\s+` + oldSerial).MatchString(out)
	})
	// The defaults: the root (2y) and the issuing CA (1y) are far off,
	// and no JWT key is published yet.
	if strings.Contains(out, "WARNING") || !regexp.MustCompile(`root\s+CN=Test Root root`).MatchString(out) {
		t.Fatalf("cluster status with nothing close to expiry:\n%s", out)
	}
	// Within 400 days: the issuing CA warns, the root does not.
	out = must(with("cluster", "status", "--warn-within", "9600h")...)
	if !strings.Contains(out, "WARNING: issuing-ca node-1 ("+oldSerial+") expires within 9600h0m0s") || strings.Contains(out, "WARNING: root") ||
		!strings.Contains(out, "sigilctl node issuing-cert install") {
		t.Fatalf("cluster status --warn-within 9600h:\n%s", out)
	}

	// The renewal, through sigilctl; node-2's certificate reaches node-1
	// and is refused naming node-2.
	path, renewed := tr.SignIssuing(t, "node-1", "1y", false)
	newSerial := renewed.SerialNumber.Text(16)
	out = must(with("node", "issuing-cert", "install", path)...)
	if !strings.Contains(out, "node node-1 signs with issuing CA serial "+newSerial) || !strings.Contains(out, "replaced serial "+oldSerial) {
		t.Fatalf("install:\n%s", out)
	}
	node2, _ := tr.SignIssuing(t, "node-2", "1y", false)
	if _, err := run(with("node", "issuing-cert", "install", node2)...); err == nil || !strings.Contains(err.Error(), `send it to node "node-2"`) {
		t.Fatalf("node-2's certificate sent to node-1: %v", err)
	}
	if _, err := run(with("node", "issuing-cert", "install", path, "--node", "node-1")...); err == nil || !strings.Contains(err.Error(), "signs with already") {
		t.Fatalf("the same certificate again: %v", err)
	}
	var st api.ClusterStatus
	if err := json.Unmarshal([]byte(must(with("-o", "json", "cluster", "status")...)), &st); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range st.Expiries {
		found = found || e.Kind == api.ExpiryIssuingCA && e.Name == "node-1" && e.Serial == newSerial && e.NotAfter.Equal(renewed.NotAfter)
	}
	if !found {
		t.Fatalf("cluster status JSON expiries lack the new CA: %+v", st.Expiries)
	}
	// The install published a JWT key (48h by default): listed, no
	// warning.
	out = must(with("cluster", "status")...)
	if !regexp.MustCompile(`jwt-key\s+node-1\s+`).MatchString(out) || strings.Contains(out, "WARNING") {
		t.Fatalf("cluster status after the install:\n%s", out)
	}
	// A newest JWT key warns within 24h at most, whatever --warn-within
	// says: keys are short-lived by design.
	if out = must(with("cluster", "status", "--warn-within", "1000h")...); strings.Contains(out, "WARNING: jwt-key") {
		t.Fatalf("cluster status --warn-within 1000h warns about a fresh JWT key:\n%s", out)
	}
}
