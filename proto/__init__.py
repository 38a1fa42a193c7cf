"""The optserve API: the versioned proto contract (`optserve.proto.v1`), the error table,
the optimizer registry and the job spec helpers that client and shard share."""
