package node

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
)

func (j *joinSvc) Job(ctx context.Context, r *api.JoinJobRequest) (*api.JobSVID, error) {
	return nil, status.Error(codes.Unimplemented, "job joins are not built yet")
}

func (s *agentSvc) RunEnd(ctx context.Context, r *api.RunEndRequest) (*api.Empty, error) {
	return nil, status.Error(codes.Unimplemented, "run end is not built yet")
}

func (a *admin) JoinRuleCreate(ctx context.Context, r *api.JoinRule) (*api.JoinRule, error) {
	return nil, status.Error(codes.Unimplemented, "join rules are not built yet")
}

func (a *admin) JoinRuleList(ctx context.Context, r *api.Empty) (*api.JoinRuleList, error) {
	return nil, status.Error(codes.Unimplemented, "join rules are not built yet")
}

func (a *admin) JoinRuleShow(ctx context.Context, r *api.IDRequest) (*api.JoinRule, error) {
	return nil, status.Error(codes.Unimplemented, "join rules are not built yet")
}

func (a *admin) JoinRuleDelete(ctx context.Context, r *api.IDRequest) (*api.Empty, error) {
	return nil, status.Error(codes.Unimplemented, "join rules are not built yet")
}
