"""Typed settings for every specdec process, read from CLI flags and ``SPECDEC_*`` variables.

One dataclass per process; each field is a flag ``--field-name`` and an environment variable
``SPECDEC_FIELD_NAME`` (a flag wins over the variable, the variable over the default). The local
launcher, docker compose and Kubernetes all use these same names: the launcher builds each child's
settings object and passes it on with :func:`to_argv`, the inverse of :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, get_type_hints

from specdec.records import MODE_NAMES

EMBEDDED_TARGET = "qwen2.5-coder-1.5b-instruct"
EMBEDDED_DRAFT = "qwen2.5-coder-0.5b-instruct"
QUANTIZE_MODES = ("auto", "none", "int8")  # --draft-quantize (specdec/quantize.py); auto: int8 on a CPU
PROMPT_LOOKUP = "prompt-lookup"  # the --draft-model of the model-free draft (draft_service/prompt_lookup.py)


def _setting(default: Any, help: str, **extra: Any) -> Any:
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **extra}, **kwargs)


@dataclass
class TlsServerSettings:
    """What a server presents and whom it lets in (see specdec/rpc/security.py)."""

    tls_cert: str = _setting("", "this server's certificate chain, PEM file; with --tls-key turns TLS on ('' = plaintext)")
    tls_key: str = _setting("", "private key of --tls-cert, PEM file")
    tls_client_ca: str = _setting("", "CA bundle, PEM file: every client must present a certificate signed by it (mutual TLS; '' = none asked)")


@dataclass
class TlsClientSettings:
    """How a process calls a TLS server: the CA it trusts and the certificate it presents."""

    tls_ca: str = _setting("", "CA bundle, PEM file, that the servers this process calls must chain to; set turns TLS on for those calls")
    tls_client_cert: str = _setting("", "certificate chain, PEM file, this process presents to the servers it calls (mutual TLS)")
    tls_client_key: str = _setting("", "private key of --tls-client-cert, PEM file")


@dataclass
class AuthSettings:
    auth_token: str = _setting("", "bearer token every GenerationService call must carry ('' = no check; prefer the variable or a file)", secret=True)
    auth_token_file: str = _setting("", "file holding the bearer token (wins over --auth-token)")


@dataclass
class ServerSettings(TlsServerSettings):
    host: str = _setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = _setting(0, "port to listen on (0 = pick a free one and print it)")
    max_message_mb: int = _setting(64, "largest gRPC message accepted or sent, MiB")
    trace_file: str = _setting("", "append every span to this JSON-lines file ('' = off; OTLP export is set by the OTEL_* variables)")
    metrics_port: int = _setting(0, "serve Prometheus metrics on this port at /metrics (0 = off)")
    shutdown_grace_s: float = _setting(30.0, "on SIGTERM: report NOT_SERVING, refuse new calls, and give the calls in flight this long to finish")


@dataclass
class ModelServiceSettings(ServerSettings):
    device: str = _setting("cpu", "cpu, cuda or cuda:N")
    dtype: str = _setting("float32", "float32, bfloat16, float16 or auto")
    max_sessions: int = _setting(64, "KV caches kept at once; least recently used evicted first")
    kv_cache_mb: int = _setting(4096, "KV-cache memory budget over all sessions, MiB")
    threads: int = _setting(0, "torch CPU threads (0 = torch's default)")
    session_ttl_s: int = _setting(600, "a session's KV cache unused this long is dropped (0 = never)")
    max_concurrent_rpcs: int = _setting(64, "calls in progress or queued at once; beyond, RESOURCE_EXHAUSTED at once")
    calibrate: bool = _setting(True, "before serving, time one forward of 1 to 64 rows (reported in GetInfo for the orchestrator's cost model, which prices rounds at the batch they join; also warms the model); restart to measure again")
    max_batch_rows: int = _setting(256, "rows one forward pass feeds at most, over every session batched in it; a longer context is fed in passes of this many, so that it never holds the others up for more than one pass")
    batch_wait_ms: float = _setting(10.0, "once a call arrives, wait up to this long (until calls stop arriving) for more to share the forward pass")


@dataclass
class SpeculationLimits:
    """The largest speculation a request may ask for, in one place: the orchestrator checks a
    generation's settings against it, the draft and verify services each call's."""

    max_beam_width: int = _setting(8, "largest beam width (beams per draft) a request may ask for")
    max_beam_depth: int = _setting(16, "largest beam depth or draft length a request may ask for")
    max_tree_nodes_limit: int = _setting(1024, "largest token tree a request may ask for or the verify service checks")


@dataclass
class VerifySettings(ModelServiceSettings, SpeculationLimits):
    target_model: str = _setting(EMBEDDED_TARGET, "target model: embedded alias, local path or hub id")
    target_quantize: str = _setting("none", "store the target's linear layers and output head as int8 weights (one scale per output channel, multiplied in bfloat16): another model than the float one, exact against its own one-token decoding; faster on a CPU", choices=("none", "int8"))


@dataclass
class DraftSettings(ModelServiceSettings, SpeculationLimits):
    draft_model: str = _setting(EMBEDDED_DRAFT, "draft model: embedded alias, local path or hub id")
    draft_vocab: int = _setting(0, "greedy drafting scores only token ids below this (0 = the whole vocabulary): a cheaper output layer; the first ids of byte-level BPE vocabularies are the most frequent")
    draft_quantize: str = _setting("auto", "store the draft model's linear layers and output head as int8 weights (one scale per output channel, multiplied in bfloat16): a faster draft on CPU, never a different output (the target decides); auto: int8 on a CPU, none elsewhere", choices=QUANTIZE_MODES)
    tokenizer: str = _setting(EMBEDDED_TARGET, "with --draft-model prompt-lookup (a model-free draft: n-gram matching over the context): the target model whose tokenizer, vocabulary, end-of-sequence ids and context length the service reports; only its tokenizer and config files are read")
    lookup_max_ngram: int = _setting(4, "prompt-lookup: longest suffix of the context searched for earlier in it")
    lookup_min_ngram: int = _setting(2, "prompt-lookup: shortest suffix searched; shorter ones match more often and are accepted less")


@dataclass
class SpeculationDefaults:
    mode: str = _setting("tree", "default decoding mode: " + ", ".join(MODE_NAMES), choices=MODE_NAMES)
    draft_length: int = _setting(2, "sequential mode: tokens per draft chain (2 measured best on CPU fp32; raise on GPUs)")
    beam_width: int = _setting(2, "tree mode: beams per draft")
    beam_depth: int = _setting(4, "tree mode: tokens per beam")
    max_tree_nodes: int = _setting(64, "cap on the merged token tree's size")
    adaptive: bool = _setting(True, "cost-aware speculation: each round takes the shape (chain length; tree: beams x depth, or none) with the most expected tokens per second from the services' measured forward costs and the acceptance seen so far, within the values set; false = those values every round")
    max_new_tokens: int = _setting(128, "default max_new_tokens when a request sets none")
    max_new_tokens_limit: int = _setting(4096, "largest max_new_tokens a request may ask for")


@dataclass
class OrchestratorSettings(ServerSettings, SpeculationDefaults, SpeculationLimits, TlsClientSettings, AuthSettings):
    target_model: str = _setting(EMBEDDED_TARGET, "target model, for its tokenizer (must match the verify service)")
    verify_address: str = _setting("127.0.0.1:50052", "verify service, host:port; comma-separate replicas to fail over between")
    draft_addresses: list[str] = _setting(list, "draft services, comma-separated host:port")
    draft_timeout_ms: int = _setting(10000, "per-round deadline for each draft; a late draft is skipped")
    verify_timeout_ms: int = _setting(60000, "deadline for one round's VerifyTree, retries on UNAVAILABLE included")
    max_active_generations: int = _setting(8, "generations running at once")
    max_queued_generations: int = _setting(32, "generations waiting for a slot; beyond, RESOURCE_EXHAUSTED at once")
    log_dir: str = _setting("logs", "one JSON statistics file per generation goes here ('' = off)")


@dataclass
class ClusterSettings(SpeculationDefaults, SpeculationLimits, TlsServerSettings, TlsClientSettings, AuthSettings):
    target_model: str = _setting(EMBEDDED_TARGET, "target model for the verify service")
    draft_models: list[str] = _setting(lambda: [EMBEDDED_DRAFT], "draft models, comma-separated, one service each")
    port: int = _setting(50051, "orchestrator port (drafts and verifier take free ports)")
    verify_device: str = _setting("cpu", "device of the verify service")
    verify_replicas: int = _setting(1, "verify service replicas; the orchestrator spreads sessions over them and fails over")
    draft_devices: list[str] = _setting(lambda: ["cpu"], "devices of the draft services, comma-separated (one, or one each)")
    dtype: str = _setting("float32", "model dtype for every service")
    draft_vocab: int = _setting(0, "draft services score only token ids below this (0 = all); see specdec serve draft -- --help")
    draft_quantize: str = _setting("auto", "draft models' weights: auto (int8 on a CPU), none or int8 (see specdec serve draft -- --help)", choices=QUANTIZE_MODES)
    target_quantize: str = _setting("none", "the target's weights: none or int8 (see specdec serve verify -- --help)", choices=("none", "int8"))
    prompt_lookup: bool = _setting(False, "also run a model-free prompt-lookup draft service (n-gram matching over the context) beside the model drafts")
    log_dir: str = _setting("logs", "orchestrator statistics directory")
    startup_timeout_s: int = _setting(600, "how long to wait for every service to report SERVING")
    trace_file: str = _setting("", "every service appends its spans to this JSON-lines file ('' = off)")
    metrics_port: int = _setting(0, "first Prometheus metrics port: orchestrator, then verify, then each draft on the next ports (0 = off)")
    tls_client_ca: str = _setting("", "CA bundle, PEM file: the draft and verify services require client certificates signed by it (mutual TLS with the orchestrator)")


def env_name(name: str) -> str:
    return "SPECDEC_" + name.upper()


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind == list[str]:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return kind(raw)


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                  environ: Mapping[str, str] | None = None) -> None:
    """Add one flag per field of ``cls``; defaults come from the environment (``environ``, this
    process's when None), then the dataclass."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        raw = environ.get(env_name(f.name))
        if raw is not None:
            default = _parse(kind, raw)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=(lambda s, k=kind: _parse(k, s)),
            default=default,
            choices=f.metadata.get("choices"),
            help=f"{f.metadata.get('help', '')} [{env_name(f.name)}; default: {_show(default, f.metadata.get('secret', False))}]",
        )


def from_args(cls: type, namespace: argparse.Namespace):
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    return cls(**values)


def from_env(cls: type, environ: Mapping[str, str] | None = None, **overrides: Any):
    """Settings from the environment (``environ``, this process's when None) and defaults, then
    ``overrides`` (for launchers, tests and embedding)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls, environ=environ)
    settings = from_args(cls, parser.parse_args([]))
    return dataclasses.replace(settings, **overrides)


def to_argv(settings) -> list[str]:
    """The flags that give ``settings`` back through :func:`add_arguments` and :func:`from_args`:
    every field, so that neither a default nor a variable in the child's environment can differ.
    Secrets are left out (a command line is visible to every user): hand them over in ``SPECDEC_*``
    variables."""
    argv = []
    for f in dataclasses.fields(settings):
        if not f.metadata.get("secret", False):
            argv += ["--" + f.name.replace("_", "-"), _flag_value(getattr(settings, f.name))]
    return argv


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, list) else str(value)


def _show(value: Any, secret: bool = False) -> str:
    if secret and value:
        return "(set, not shown)"  # a secret from the environment must not leak into --help
    return ",".join(value) if isinstance(value, list) else str(value)
