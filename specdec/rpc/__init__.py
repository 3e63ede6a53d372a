"""The gRPC edge shared by the three services: server start-up and shutdown, interceptors,
error-to-status mapping, tracing and metrics of RPCs, TLS. The algorithm library (the rest of
``specdec``) never imports it."""
