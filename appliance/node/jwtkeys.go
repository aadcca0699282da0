package node

import (
	"context"

	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// jwtBundle is the replicated trust bundle as the CA's JWT key rotation
// (ca.JWTKeys) publishes into it: keys are added and withdrawn by raft
// commands in this node's name.
type jwtBundle struct {
	state interface{ Bundle() state.Bundle }
	apply applier
	actor string
}

var _ ca.JWTPublisher = jwtBundle{}

func (b jwtBundle) Published() []ca.PublishedJWTKey {
	keys := b.state.Bundle().JWTKeys
	out := make([]ca.PublishedJWTKey, len(keys))
	for i, k := range keys {
		out[i] = ca.PublishedJWTKey{KID: k.KID, Node: k.Node, PublicKey: k.PublicKey, NotAfter: k.NotAfter, CA: k.CA}
	}
	return out
}

func (b jwtBundle) Publish(ctx context.Context, k ca.PublishedJWTKey) error {
	_, err := b.apply.apply(ctx, b.actor, state.CmdJWTKeyAdd, &state.JWTKey{KID: k.KID, Node: k.Node, PublicKey: k.PublicKey, NotAfter: k.NotAfter, CA: k.CA})
	return err
}

func (b jwtBundle) Withdraw(ctx context.Context, kid string) error {
	_, err := b.apply.apply(ctx, b.actor, state.CmdJWTKeyRemove, state.JWTKeyRemove{KID: kid})
	return err
}

// jwtKeyURI addresses a JWT key in the token of the issuing CA key
// (issuingKey, a pkcs11: URI), by a label made from its kid.
func jwtKeyURI(issuingKey string) func(kid string) (string, error) {
	return func(kid string) (string, error) {
		u, err := pkcs11.ParseURI(issuingKey)
		if err != nil {
			return "", err
		}
		u.Object, u.ID = "sigil-jwt-"+kid, nil
		return u.String(), nil
	}
}
