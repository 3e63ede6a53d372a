"""specdec: speculative decoding served as gRPC microservices.

This package is the pure library all three services share: the token trie and tree
attention mask, the acceptance rules, KV-cache bookkeeping, model loading and fetching,
settings and telemetry. It holds no gRPC server code; `specdec.v1` holds the protobuf
stubs generated from `protos/specdec/v1/*.proto` by `make protos` or when the package is built,
and `specdec.client` is the client other Python services call the cluster with.
"""

__version__ = "0.1.0"
