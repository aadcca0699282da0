package node

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
)

func (a *admin) RootRotate(ctx context.Context, r *api.RootRotateRequest) (*api.RootRotationStatus, error) {
	return nil, status.Error(codes.Unimplemented, "root rotation")
}

func (a *admin) RootRotation(ctx context.Context, _ *api.Empty) (*api.RootRotationStatus, error) {
	return nil, status.Error(codes.Unimplemented, "root rotation")
}

func (s *agentSvc) BundleAck(ctx context.Context, r *api.BundleAckRequest) (*api.Empty, error) {
	return &api.Empty{}, nil
}
