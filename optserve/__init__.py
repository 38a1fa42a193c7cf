"""optserve: optimizer-as-a-service.

A gRPC parameter server whose shards hold parameter and optimizer-state shards and apply
fused AdamW, Adam, AdamP, Adafactor and Lion steps to gradients streamed by PyTorch workers.

Subpackages: `optserve.proto` (the API), `optserve.server` (the shard),
`optserve.client` (the torch worker library), `optserve.kernels` (the optimizer math).
"""
__version__ = "0.1.0"
