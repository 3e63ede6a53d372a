"""Protobuf and gRPC stubs for package `specdec.v1`, generated from `protos/` by `make protos` or when the
package is built (setup.py); never edited, never committed."""
