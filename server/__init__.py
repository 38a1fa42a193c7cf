"""The optserve shard: holds parameter and optimizer-state shards and applies Steps.

Follow one Step: `servicer.OptimizerServicer.Step` (translation only) ->
`job.Job.step` (validate, receive, barrier, average) -> `optserve.kernels` backend.
"""
from optserve.server.app import ShardServer, serve

__all__ = ["ShardServer", "serve"]
