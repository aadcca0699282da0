package agent_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
)

// federatedRun is the workload side of TestFederation, with nothing but
// go-spiffe and its own agent's socket (SPIFFE_ENDPOINT_SOCKET):
//
//   - fed-server listens with spiffetls for the one ID of the other trust
//     domain (SIGIL_PEER), reads the client's JWT-SVID, validates it
//     through its own agent for its audience (SIGIL_AUD), and answers with
//     its own JWT-SVID for the client's audience (SIGIL_PEER_AUD);
//   - fed-client dials with spiffetls for any member of the other trust
//     domain (SIGIL_PEER_TD), sends its JWT-SVID for the server's audience
//     and validates the answer through its own agent.
func federatedRun(ctx context.Context, client *workloadapi.Client, role string) string {
	ownJWT := func() (string, error) {
		s, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: os.Getenv("SIGIL_PEER_AUD")})
		if err != nil {
			return "", fmt.Errorf("own JWT-SVID: %w", err)
		}
		return s.Marshal(), nil
	}
	switch role {
	case "fed-server":
		peer := spiffeid.RequireFromString(os.Getenv("SIGIL_PEER"))
		l, err := spiffetls.Listen(ctx, "tcp", "127.0.0.1:0", tlsconfig.AuthorizeID(peer))
		if err != nil {
			return "ERR " + err.Error()
		}
		defer func() { _ = l.Close() }()
		fmt.Println("LISTEN", l.Addr().String())
		c, err := l.Accept()
		if err != nil {
			return "ERR " + err.Error()
		}
		defer func() { _ = c.Close() }()
		tok, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "ERR read: " + err.Error()
		}
		tlsPeer, _ := spiffetls.PeerIDFromConn(c)
		v, err := client.ValidateJWTSVID(ctx, strings.TrimSpace(tok), os.Getenv("SIGIL_AUD"))
		if err != nil {
			return "ERR validate: " + err.Error()
		}
		mine, err := ownJWT()
		if err != nil {
			return "ERR " + err.Error()
		}
		if _, err := fmt.Fprintln(c, mine); err != nil {
			return "ERR write: " + err.Error()
		}
		return "SERVED tls=" + tlsPeer.String() + " jwt=" + v.ID.String()
	case "fed-client":
		td := spiffeid.RequireTrustDomainFromString(os.Getenv("SIGIL_PEER_TD"))
		c, err := spiffetls.Dial(ctx, "tcp", os.Getenv("SIGIL_ADDR"), tlsconfig.AuthorizeMemberOf(td))
		if err != nil {
			return "ERR dial: " + err.Error()
		}
		defer func() { _ = c.Close() }()
		mine, err := ownJWT()
		if err != nil {
			return "ERR " + err.Error()
		}
		if _, err := fmt.Fprintln(c, mine); err != nil {
			return "ERR write: " + err.Error()
		}
		reply, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "ERR reply: " + err.Error()
		}
		tlsPeer, _ := spiffetls.PeerIDFromConn(c)
		v, err := client.ValidateJWTSVID(ctx, strings.TrimSpace(reply), os.Getenv("SIGIL_AUD"))
		if err != nil {
			return "ERR validate: " + err.Error()
		}
		return "GOT tls=" + tlsPeer.String() + " jwt=" + v.ID.String()
	}
	return "ERR unknown role"
}

// federate makes from trust to's trust domain: a federation relationship
// on from's appliance with to's bundle endpoint (https_spiffe, served by
// to's node) and, to authenticate its first fetch, to's bundle as its
// admin shows it.
func federate(t *testing.T, from, to *agentEnv) {
	t.Helper()
	ctx := context.Background()
	b, err := to.c.Admin(to.c.WaitLeader(10*time.Second)).BundleShow(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	toTD := to.tr.TrustDomain
	_, err = from.c.Admin(from.c.WaitLeader(10*time.Second)).FederationAdd(ctx, &api.FederationRelationship{
		TrustDomain:       toTD.Name(),
		BundleEndpointURL: "https://" + to.c.ConfigOf("node-1").Bundle.Listen,
		Profile:           "https_spiffe",
		EndpointSPIFFEID:  spiffeid.RequireFromPath(toTD, "/sigil/node/node-1").String(),
		Bundle:            b.SPIFFE,
	})
	if status.Code(err) == codes.Unimplemented {
		t.Skipf("the appliance does not serve federation yet: %v", err)
	}
	if err != nil {
		t.Fatalf("%s trusting %s: %v", from.tr.TrustDomain, toTD, err)
	}
}

// Issue #17 end to end: two Sigil appliances of two trust domains
// federate both ways; an agent of each serves a workload whose entry
// federates with the other trust domain. The workloads, using only
// go-spiffe and their own agent, complete mutual TLS with each other
// (the server authorizing the client's ID, the client any member of the
// server's trust domain) and each validates the other's JWT-SVID through
// its own agent's ValidateJWTSVID. A workload of beta.test whose entry
// does not federate cannot authenticate alpha's server; once alpha
// deletes its relationship with beta.test, alpha's workload refuses
// beta's.
func TestFederation(t *testing.T) {
	// Both trusts before either node: SoftHSM shows a process only the
	// tokens that existed when the module was initialized.
	alphaTrust := clustertest.NewTrustIn(t, "alpha.test", "fa", []string{"node-1"}, nil)
	betaTrust := clustertest.NewTrustIn(t, "beta.test", "fb", []string{"node-1"}, nil)
	// Bundle endpoints that ask to be fetched again every 2 s: a new JWT
	// key reaches the other trust domain within the test's patience.
	fast := func(c *node.Config) {
		c.Bundle.MinFetchInterval = node.Duration{Duration: time.Second}
		c.Bundle.RefreshHint = node.Duration{Duration: 2 * time.Second}
	}
	alpha := newAgentEnvOn(t, alphaTrust, fast, nil)
	beta := newAgentEnvOn(t, betaTrust, fast, nil)
	federate(t, alpha, beta)
	federate(t, beta, alpha)
	fedEntry := func(e *agentEnv, path string, uid int, with string) string {
		t.Helper()
		r := &api.EntryRequest{Entry: api.Entry{SPIFFEID: e.td + path, ParentID: e.id, FederatesWith: []string{with},
			Selectors: []api.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", uid)}}}}
		en, err := e.c.Admin(e.c.WaitLeader(10*time.Second)).EntryCreate(context.Background(), r)
		if err != nil {
			t.Fatal(err)
		}
		return en.SPIFFEID
	}
	server := fedEntry(alpha, "/fed/server", 1001, "beta.test")
	client := fedEntry(beta, "/fed/client", 1002, "alpha.test")

	// Each agent gets the other trust domain's bundle from its appliance,
	// and with it the JWT key the other signs with from now on: a node
	// makes its JWT key when it first signs one, and a foreign key is
	// known only from the next fetch of its bundle, so the test makes
	// both keys first and waits for each to cross over.
	for _, e := range []struct {
		env   *agentEnv
		from  *agentEnv
		other string
	}{{alpha, beta, "beta.test"}, {beta, alpha, "alpha.test"}} {
		rot, err := e.from.c.Admin(e.from.c.WaitLeader(10*time.Second)).JWTKeyRotate(context.Background(), &api.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		td := spiffeid.RequireTrustDomainFromString(e.other)
		clustertest.Eventually(t, 30*time.Second, e.env.td+"'s agent to hold "+e.other+"'s bundle with JWT key "+rot.KID, func() bool {
			s, _ := e.env.a.Cache().Current()
			return s.Federated[td] != nil && s.Federated[td].HasJWTAuthority(rot.KID)
		})
	}

	_, srv := alpha.w.start(t, 1001, "fed-server", "SIGIL_PEER="+client, "SIGIL_AUD=alpha-server", "SIGIL_PEER_AUD=beta-client")
	addr := expectLine(t, srv, "LISTEN ")
	got := beta.w.result(t, 1002, "fed-client", "SIGIL_PEER_TD=alpha.test", "SIGIL_ADDR="+addr,
		"SIGIL_AUD=beta-client", "SIGIL_PEER_AUD=alpha-server")
	served := expectLine(t, srv, "fed-server ")
	if want := "GOT tls=" + server + " jwt=" + server; got != want {
		t.Errorf("client: %q, want %q", got, want)
	}
	if want := "SERVED tls=" + client + " jwt=" + client; served != want {
		t.Errorf("server: %q, want %q", served, want)
	}

	// A workload of beta.test whose entry does not federate has no
	// alpha.test bundle: it cannot authenticate alpha's server.
	beta.entry(t, "/fed/loner", 0, "", "unix:uid:1003")
	_, srv = alpha.w.start(t, 1001, "fed-server", "SIGIL_PEER="+client, "SIGIL_AUD=alpha-server", "SIGIL_PEER_AUD=beta-client")
	addr = expectLine(t, srv, "LISTEN ")
	got = beta.w.result(t, 1003, "fed-client", "SIGIL_PEER_TD=alpha.test", "SIGIL_ADDR="+addr,
		"SIGIL_AUD=beta-client", "SIGIL_PEER_AUD=alpha-server")
	if !strings.HasPrefix(got, "ERR dial: ") || !strings.Contains(got, "alpha.test") {
		t.Errorf("a workload that does not federate dialled alpha.test: %q", got)
	}
	t.Logf("a workload that does not federate: %s", got)

	// alpha stops trusting beta.test: its agent drops the bundle, and its
	// workload no longer accepts beta's client.
	if _, err := alpha.c.Admin(alpha.c.WaitLeader(10*time.Second)).FederationDelete(context.Background(), &api.IDRequest{ID: "beta.test"}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 20*time.Second, "alpha's agent to drop beta.test's bundle", func() bool {
		s, _ := alpha.a.Cache().Current()
		return s.Federated[spiffeid.RequireTrustDomainFromString("beta.test")] == nil
	})
	_, srv = alpha.w.start(t, 1001, "fed-server", "SIGIL_PEER="+client, "SIGIL_AUD=alpha-server", "SIGIL_PEER_AUD=beta-client")
	addr = expectLine(t, srv, "LISTEN ")
	got = beta.w.result(t, 1002, "fed-client", "SIGIL_PEER_TD=alpha.test", "SIGIL_ADDR="+addr,
		"SIGIL_AUD=beta-client", "SIGIL_PEER_AUD=alpha-server")
	served = expectLine(t, srv, "fed-server ")
	if !strings.HasPrefix(served, "ERR ") || !strings.Contains(served, "beta.test") {
		t.Errorf("alpha's server after the relationship was deleted: %q (client: %q)", served, got)
	}
	t.Logf("after the relationship was deleted: server %s; client %s", served, got)
	if strings.HasPrefix(got, "GOT ") {
		t.Errorf("beta's client completed after alpha stopped trusting beta.test: %q", got)
	}
}
