"""The optserve shard: holds parameter and optimizer-state shards and applies Steps.

Follow one Step: `servicer.OptimizerServicer.Step` (translation only) -> `store.ShardStore`
-> `job.Job.step` -> `admission` (checks, the gradient received) -> `barrier` (sync) ->
`stepper` (the mean, the `optserve.kernels` backend call) -> `reply` (the parameters back).
"""
from optserve.server.app import ShardServer, serve
from optserve.server.config import Limits, ShardConfig, TLSFiles

__all__ = ["Limits", "ShardConfig", "ShardServer", "TLSFiles", "serve"]
