"""specdec: speculative decoding served as gRPC microservices.

This package is the pure library all three services share: the token trie and tree
attention mask, the acceptance rules, KV-cache bookkeeping, model loading and fetching,
settings and telemetry. It holds no gRPC server code; `specdec.v1` holds the protobuf
stubs generated from `protos/specdec/v1/*.proto` by `make protos` or when the package is built,
and `specdec.client` is the client other Python services call the cluster with.

`pip install specdec` installs the client alone (grpcio and protobuf): this module, `specdec.v1`
and `specdec.client` import nothing else. The library's model code and the services need the
`server` extra (torch, transformers, OpenTelemetry, ...), the dashboard and plots the `tools` one.
"""

__version__ = "0.1.0"
