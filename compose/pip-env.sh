#!/bin/sh
# Runs a command (pip) in the image build with the `ca` build secret, when one was passed, as the
# CA bundle for pip and Python's TLS: it lives at /run/secrets/ca only while that RUN step runs.
if [ -s /run/secrets/ca ]; then
  export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca REQUESTS_CA_BUNDLE=/run/secrets/ca
fi
exec "$@"
