package api

import (
	"context"
	"fmt"
	"net"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/sigil-appliance/sigil/internal/unixsock"
)

// LocalCredentials are the transport credentials of the node-local admin
// socket: no TLS (the socket is 0600 root), and on the server the caller's
// uid, gid and pid come from the kernel (SO_PEERCRED), never from the
// client.
func LocalCredentials() credentials.TransportCredentials { return localCreds{} }

// LocalAuth is a local caller as the kernel reports it.
type LocalAuth struct {
	UID, GID uint32
	PID      int32
}

func (LocalAuth) AuthType() string { return "unix-peercred" }

// LocalPeer returns the kernel-reported caller of a local-socket request.
func LocalPeer(ctx context.Context) (LocalAuth, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return LocalAuth{}, false
	}
	la, ok := p.AuthInfo.(LocalAuth)
	return la, ok && la.UID != ^uint32(0)
}

type localCreds struct{}

func (localCreds) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, LocalAuth{UID: ^uint32(0)}, nil
}

func (localCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("local socket: not a unix connection")
	}
	cred, err := unixsock.PeerCred(uc)
	if err != nil {
		return nil, nil, err
	}
	return c, LocalAuth{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid}, nil
}

func (localCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "local"}
}
func (localCreds) Clone() credentials.TransportCredentials { return localCreds{} }
func (localCreds) OverrideServerName(string) error         { return nil }
