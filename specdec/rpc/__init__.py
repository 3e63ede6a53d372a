"""The gRPC edge shared by the three services; the algorithm library (the rest of ``specdec``)
never imports it. Each module imports only those above it here:

- ``interceptors``: the one way to wrap a method handler; the shutdown gate (``Admission``) and
  its interceptor; refusing undecodable requests; the health/reflection methods left alone.
- ``status``: errors to gRPC status codes, and ``rpc_method``, which answers with them.
- ``convert``: protobuf messages to the library's values and back.
- ``security``: TLS on servers and channels, bearer tokens on the public API.
- ``metrics``: Prometheus metrics and the interceptor that counts RPCs.
- ``tracing``: OpenTelemetry's gRPC instrumentation, set up for specdec.
- ``channels``: channel options, and the orchestrator's channel to a draft or verify service.
- ``server``: a process's server from start-up (logging, telemetry, health, reflection) to
  graceful shutdown; the whole ``main`` of a model service.
"""
