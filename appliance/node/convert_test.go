package node

import (
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// convTime is a distinct, non-zero time for each h.
func convTime(h int) time.Time {
	return time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC).Add(time.Duration(h) * time.Hour)
}

// Fully populated state values: allSet checks that they stay so when the
// state types grow a field, which then needs a converter line too.
func fullEntry() state.Entry {
	return state.Entry{ID: "e1", SPIFFEID: "spiffe://example.org/web", ParentID: "spiffe://example.org/sigil/agent/a1",
		Selectors: []state.Selector{{Type: "unix", Value: "uid:1000"}, {Type: "unix", Value: "gid:10"}},
		X509TTL:   3600, JWTTTL: 300, DNSNames: []string{"web.example.org", "web"}, IPAddresses: []string{"10.0.0.5", "fd00::1"}, FederatesWith: []string{"other.org"}, Hint: "web",
		CreatedAt: convTime(0), UpdatedAt: convTime(1), Revision: 42}
}

func fullAgent() state.Agent {
	return state.Agent{ID: "spiffe://example.org/sigil/agent/a1", AttestationType: "tpm",
		Facts: map[string]string{"ek_hash": "ab12", "ak_name": "cd34"}, SerialNumber: "0a1b", ExpiresAt: convTime(2),
		PreviousSerial: "09ff", PreviousUntil: convTime(3),
		Banned: true, JoinedAt: convTime(0), UpdatedAt: convTime(1), Revision: 7, BundleAck: 5,
		Job: &state.JobRun{Rule: "gh", RuleRevision: 3, Run: "1-1", Key: "0123456789abcdef", SPIFFEID: "spiffe://example.org/ci/x", UID: 1000, TTL: 600}}
}

func fullBundle() state.Bundle {
	return state.Bundle{TrustDomain: "example.org", Roots: [][]byte{{1, 2, 3}, {4, 5}},
		JWTKeys:  []state.JWTKey{{KID: "k1", Node: "node-1", PublicKey: []byte{6, 7}, NotAfter: convTime(2), CA: []byte{8}}},
		Revoked:  []state.Revocation{{Serial: "0ff1ce", Node: "node-2", NotAfter: convTime(3), At: convTime(1)}},
		Sequence: 9, RootCRLs: [][]byte{{10, 11}}}
}

// allSet fails unless every field of v (recursively, through slices, maps
// and pointers) is non-zero.
func allSet(t *testing.T, v any) {
	t.Helper()
	var walk func(path string, v reflect.Value)
	walk = func(path string, v reflect.Value) {
		if tm, ok := v.Interface().(time.Time); ok {
			if tm.IsZero() {
				t.Errorf("%s is zero", path)
			}
			return
		}
		switch v.Kind() {
		case reflect.Struct:
			for i := 0; i < v.NumField(); i++ {
				walk(path+"."+v.Type().Field(i).Name, v.Field(i))
			}
		case reflect.Slice, reflect.Map:
			if v.Len() == 0 {
				t.Errorf("%s is empty", path)
			}
			if v.Kind() == reflect.Slice && v.Type().Elem().Kind() != reflect.Uint8 {
				for i := 0; i < v.Len(); i++ {
					walk(path+"[]", v.Index(i))
				}
			}
		case reflect.Pointer:
			if v.IsNil() {
				t.Errorf("%s is nil", path)
			} else {
				walk(path, v.Elem())
			}
		default:
			if v.IsZero() {
				t.Errorf("%s is zero", path)
			}
		}
	}
	walk(reflect.TypeOf(v).String(), reflect.ValueOf(v))
}

func TestConvertEntryRoundTrip(t *testing.T) {
	e := fullEntry()
	allSet(t, e)
	a := apiEntry(e)
	allSet(t, a)
	if back := stateEntry(a); !reflect.DeepEqual(back, e) {
		t.Fatalf("state -> api -> state lost something:\n got %+v\nwant %+v", back, e)
	}
	if again := apiEntry(stateEntry(a)); !reflect.DeepEqual(again, a) {
		t.Fatalf("api -> state -> api lost something:\n got %+v\nwant %+v", again, a)
	}
	if a.Selectors[1].String() != "unix:gid:10" || a.X509TTL.Duration() != time.Hour || a.JWTTTL.Duration() != 5*time.Minute {
		t.Fatalf("converted entry: %+v", a)
	}

	// nil and empty stay apart (selectors is null or [] on the wire).
	if got := apiEntry(state.Entry{}); got.Selectors != nil || got.DNSNames != nil {
		t.Fatalf("nil slices became %#v, %#v", got.Selectors, got.DNSNames)
	}
	if got := stateEntry(api.Entry{Selectors: []api.Selector{}}); got.Selectors == nil {
		t.Fatal("empty selectors became nil")
	}

	// The response does not share memory with the state.
	a.DNSNames[0] = "changed"
	a.Selectors[0].Value = "changed"
	if e.DNSNames[0] != "web.example.org" || e.Selectors[0].Value != "uid:1000" {
		t.Fatal("apiEntry aliases the state's slices")
	}
}

func TestConvertAgentAndBundle(t *testing.T) {
	t.Run("agent", func(t *testing.T) {
		s := fullAgent()
		allSet(t, s)
		got := apiAgent(s)
		// SeenBy, LastSeen and Connected are the answering node's view
		// (agentseen.go), not the state's: the admin service adds them.
		view := got
		view.SeenBy, view.LastSeen, view.Connected = "node-1", convTime(3), true
		allSet(t, view)
		want := api.Agent{ID: s.ID, AttestationType: "tpm", Facts: map[string]string{"ek_hash": "ab12", "ak_name": "cd34"},
			SerialNumber: "0a1b", ExpiresAt: convTime(2), Banned: true, JoinedAt: convTime(0), UpdatedAt: convTime(1), Revision: 7, BundleAck: 5,
			Job: &api.JobRun{Rule: "gh", Run: "1-1", SPIFFEID: "spiffe://example.org/ci/x", UID: 1000, TTL: 600}}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("got %+v\nwant %+v", got, want)
		}
		got.Facts["ek_hash"] = "changed"
		if s.Facts["ek_hash"] != "ab12" {
			t.Fatal("apiAgent aliases the state's facts")
		}
		if l := apiAgents([]state.Agent{s, s}); len(l) != 2 || !reflect.DeepEqual(l[1], want) {
			t.Fatalf("apiAgents: %+v", l)
		}
	})
	t.Run("bundle", func(t *testing.T) {
		s := fullBundle()
		allSet(t, s)
		got := apiBundle(s)
		allSet(t, got)
		want := api.Bundle{TrustDomain: "example.org", Roots: [][]byte{{1, 2, 3}, {4, 5}},
			JWTKeys:  []api.JWTKey{{KID: "k1", Node: "node-1", PublicKey: []byte{6, 7}, NotAfter: convTime(2), CA: []byte{8}}},
			Revoked:  []api.Revocation{{Serial: "0ff1ce", Node: "node-2", NotAfter: convTime(3), At: convTime(1)}},
			Sequence: 9, RootCRLs: [][]byte{{10, 11}}}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("got %+v\nwant %+v", got, want)
		}
		got.Roots[0][0] = 99
		if s.Roots[0][0] != 1 {
			t.Fatal("apiBundle aliases the state's roots")
		}
		if e := apiBundle(state.Bundle{}); e.Roots != nil || e.JWTKeys != nil || e.Revoked != nil || e.RootCRLs != nil {
			t.Fatalf("empty bundle: %+v", e)
		}
	})
	t.Run("ekca", func(t *testing.T) {
		s := state.EKCA{ID: "abcd", Subject: "CN=TPM CA", DER: []byte{1, 2}}
		allSet(t, s)
		if got := apiEKCAs([]state.EKCA{s}); !reflect.DeepEqual(got, []api.EKCA{{ID: "abcd", Subject: "CN=TPM CA", DER: []byte{1, 2}}}) {
			t.Fatalf("got %+v", got)
		}
	})
}

func TestConvertPCRPolicy(t *testing.T) {
	if statePCRPolicy(nil) != nil {
		t.Fatal("no policy must stay nil (it clears the policy)")
	}
	p := &api.PCRPolicy{Bank: "sha256", PCRs: map[string]string{"7": "00ff", "23": "abcd"}}
	allSet(t, p)
	got := statePCRPolicy(p)
	allSet(t, got)
	if want := (&state.PCRPolicy{Bank: "sha256", PCRs: map[string]string{"7": "00ff", "23": "abcd"}}); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}

// jsonKeys returns the object keys v marshals to.
func jsonKeys(t *testing.T, v any) []string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func wantKeys(s string) []string {
	k := strings.Fields(s)
	slices.Sort(k)
	return k
}

// The API's JSON names are the wire format that agents and
// sigilctl --output json scripts read: they must not drift.
func TestEntryJSONWireNames(t *testing.T) {
	full := apiEntry(fullEntry())
	if got, want := jsonKeys(t, full), wantKeys("id spiffe_id parent_id selectors x509_ttl jwt_ttl dns_names ip_addresses federates_with hint created_at updated_at revision effective_x509_ttl effective_jwt_ttl"); !slices.Equal(got, want) {
		t.Errorf("api.Entry JSON keys %v, want %v", got, want)
	}
	if got, want := jsonKeys(t, api.Entry{}), wantKeys("id spiffe_id parent_id selectors created_at updated_at revision"); !slices.Equal(got, want) {
		t.Errorf("empty api.Entry JSON keys %v, want %v (omitempty)", got, want)
	}
	if got, want := jsonKeys(t, full.Selectors[0]), wantKeys("type value"); !slices.Equal(got, want) {
		t.Errorf("api.Selector JSON keys %v, want %v", got, want)
	}
	b, _ := json.Marshal(full)
	for _, frag := range []string{`"x509_ttl":3600`, `"jwt_ttl":300`, `"selectors":[{"type":"unix","value":"uid:1000"}`, `"created_at":"2025-01-02T03:04:05Z"`} {
		if !strings.Contains(string(b), frag) {
			t.Errorf("api.Entry JSON %s lacks %s", b, frag)
		}
	}
	var back api.Entry
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, full) {
		t.Errorf("api.Entry does not survive JSON: %v\n got %+v\nwant %+v", err, back, full)
	}

	// The other types agents and scripts read.
	for _, c := range []struct {
		v    any
		want string
	}{
		{apiAgent(fullAgent()), "id attestation_type facts serial_number expires_at banned job joined_at updated_at revision bundle_ack"},
		{*apiAgent(fullAgent()).Job, "rule run spiffe_id uid ttl"},
		{apiBundle(fullBundle()), "trust_domain roots jwt_keys revoked root_crls sequence"},
		{apiBundle(fullBundle()).JWTKeys[0], "kid node ca public_key not_after"},
		{apiBundle(fullBundle()).Revoked[0], "serial node not_after at"},
		{api.EKCA{ID: "x"}, "id subject der"},
		{api.PCRPolicy{}, "bank pcrs"},
		{api.JoinPolicy{EKCAs: []api.EKCA{{}}, EKAllow: []string{"x"}, PCRPolicy: &api.PCRPolicy{}, JoinTokensDisabled: true},
			"ek_cas ek_allow pcr_policy join_tokens_disabled"},
	} {
		if got, want := jsonKeys(t, c.v), wantKeys(c.want); !slices.Equal(got, want) {
			t.Errorf("%T JSON keys %v, want %v", c.v, got, want)
		}
	}
}
