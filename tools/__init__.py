"""Tools apart from the services: the ``specdec`` command, the local launcher, benchmarks,
analysis, traces, load tests and the dashboard. The services never import them."""
