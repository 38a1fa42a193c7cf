"""The worker side of optserve: `RemoteOptimizer`, a torch.optim.Optimizer backed by shards.

Needs torch, grpcio and protobuf; never cupy, numba or prometheus-client.
"""
from optserve.client.optimizer import RemoteOptimizer, RolledBack
from optserve.client.transport import delete_job
from optserve.proto.errors import (Aborted, DeadlineExceeded, FailedPrecondition, Internal,
                                   InvalidArgument, NotFound, OptserveError, PermissionDenied,
                                   ResourceExhausted, Unauthenticated, Unavailable)

__all__ = ["RemoteOptimizer", "RolledBack", "delete_job", "OptserveError", "NotFound", "InvalidArgument",
           "FailedPrecondition", "Unauthenticated", "PermissionDenied", "ResourceExhausted",
           "DeadlineExceeded", "Aborted", "Unavailable", "Internal"]
