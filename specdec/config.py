"""Typed settings for every specdec process, read from CLI flags and ``SPECDEC_*`` variables.

One dataclass per process; each field is a flag ``--field-name`` and an environment variable
``SPECDEC_FIELD_NAME`` (a flag wins over the variable, the variable over the default). The local
launcher, docker compose and Kubernetes all use these same names: the launcher builds each child's
settings object and passes it on with :func:`to_argv`, the inverse of :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, get_type_hints

from specdec.records import MODE_NAMES

EMBEDDED_TARGET = "qwen2.5-coder-1.5b-instruct"
EMBEDDED_DRAFT = "qwen2.5-coder-0.5b-instruct"
QUANTIZE_MODES = ("auto", "none", "int8", "int4", "w8a8")  # --draft-quantize (specdec/quantize.py); auto: the fastest measured at start-up
TARGET_QUANTIZE_MODES = ("auto", "none", "int8", "int4", "w8a8")  # --target-quantize


# Variables that are not settings of a dataclass here but that specdec reads (the CLI's orchestrator
# address, the model store, compose's certificate directory, the example clients, the fuzz tests).
OTHER_VARIABLES = ("SPECDEC_ORCHESTRATOR", "SPECDEC_MODEL_DIR", "SPECDEC_CERTS_DIR", "SPECDEC_PROTO_DIR",
                   "SPECDEC_JSON", "SPECDEC_FUZZ_EXAMPLES")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
DTYPES = ("float32", "bfloat16", "float16", "auto")
PORT = {"min": 0, "max": 65535}


class SettingError(Exception):
    """A setting given a value it does not accept, or an unknown ``SPECDEC_*`` variable close to a
    known one. The message is one line naming the setting and what it accepts; the entry points print
    it and exit with status 2. (Not a ValueError: argparse would turn that into its own message.)"""


def _setting(default: Any, help: str, **extra: Any) -> Any:
    """A field with its help and what it accepts: ``min`` and ``max`` (inclusive), ``choices``,
    ``at_most`` (the name of another field it may not exceed, where the settings have both),
    ``model`` (names a model: a path given must exist) and ``secret`` (never shown)."""
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
    port: int = _setting(0, "port to listen on (0 = pick a free one and print it)", **PORT)
    max_message_mb: int = _setting(64, "largest gRPC message accepted or sent, MiB", min=1)
    trace_file: str = _setting("", "append every span to this JSON-lines file ('' = off; OTLP export is set by the OTEL_* variables)")
    metrics_port: int = _setting(0, "serve Prometheus metrics on this port at /metrics (0 = off)", **PORT)
    shutdown_grace_s: float = _setting(30.0, "on SIGTERM: report NOT_SERVING, refuse new calls, and give the calls in flight this long to finish", min=0)


@dataclass
class ModelServiceSettings(ServerSettings):
    device: str = _setting("cpu", "cpu, cuda or cuda:N")
    dtype: str = _setting("auto", "float32, bfloat16, float16 or auto: the verify service loads each exact path (bfloat16, float32), checks it and times it, and keeps the one whose round is fastest here; a draft takes float32 on a CPU, bfloat16 elsewhere", choices=DTYPES)
    max_sessions: int = _setting(64, "KV caches kept at once; least recently used evicted first", min=1)
    kv_cache_mb: int = _setting(4096, "KV-cache memory budget over all sessions, MiB", min=1)
    threads: int = _setting(0, "torch CPU threads (0 = torch's default)", min=0)
    session_ttl_s: int = _setting(600, "a session's KV cache unused this long is dropped (0 = never)", min=0)
    max_concurrent_rpcs: int = _setting(64, "calls in progress or queued at once; beyond, RESOURCE_EXHAUSTED at once", min=1)
    calibrate: bool = _setting(True, "before serving, time one forward of 1 to 64 rows (reported in GetInfo for the orchestrator's cost model, which prices rounds at the batch they join; also warms the model); restart to measure again")
    max_batch_rows: int = _setting(256, "rows one forward pass feeds at most, over every session batched in it; a longer context is fed in passes of this many, so that it never holds the others up for more than one pass", min=1)
    batch_wait_ms: float = _setting(10.0, "once a call arrives, wait up to this long (until calls stop arriving) for more to share the forward pass", min=0)


@dataclass
class SpeculationLimits:
    """The largest speculation a request may ask for, in one place: the orchestrator checks a
    generation's settings against it, the draft and verify services each call's."""

    max_beam_width: int = _setting(8, "largest beam width (beams per draft) a request may ask for", min=1)
    max_beam_depth: int = _setting(16, "largest beam depth or draft length a request may ask for", min=1)
    max_tree_nodes_limit: int = _setting(1024, "largest token tree a request may ask for or the verify service checks", min=1)


@dataclass
class VerifySettings(ModelServiceSettings, SpeculationLimits):
    target_model: str = _setting(EMBEDDED_TARGET, "target model: embedded alias, local path or hub id", model=True)
    target_quantize: str = _setting("auto", "the target's engine: int4 (4-bit weights in groups of 32, multiplied in bfloat16 by torch's packed int4 product; a target converted from a GGUF runs that file's own Q4_K levels, its other tensors int8), int8 (int8 weights, one scale per output channel, multiplied in bfloat16) or w8a8 (int8 weights and int8 activations with one scale per token, oneDNN's integer product); each exact against its own one-token decoding; auto: a target converted from a 4-bit GGUF (the embedded ones) also measures int4 beside the float dtypes at start-up and keeps the fastest round, any other target none", choices=TARGET_QUANTIZE_MODES)


@dataclass
class DraftSettings(ModelServiceSettings, SpeculationLimits):
    draft_model: str = _setting(EMBEDDED_DRAFT, "draft model: embedded alias, local path or hub id", model=True)
    draft_vocab: int = _setting(0, "greedy drafting scores only token ids below this (0 = the whole vocabulary): a cheaper output layer; the first ids of byte-level BPE vocabularies are the most frequent", min=0)
    draft_quantize: str = _setting("auto", "quantize the draft model's linear layers and output head: int8 (int8 weights, multiplied in bfloat16), int4 (4-bit weights in groups of 32, its head int8) or w8a8 (int8 weights and per-token int8 activations, oneDNN's integer product): a faster draft on a CPU, never a different output (the target decides); auto: on a CPU whichever of none, int8, int4 and w8a8 is measured fastest at start-up, none elsewhere", choices=QUANTIZE_MODES)


@dataclass
class SpeculationDefaults:
    mode: str = _setting("tree", "default decoding mode: " + ", ".join(MODE_NAMES), choices=MODE_NAMES)
    draft_length: int = _setting(2, "sequential mode: tokens per draft chain (2 measured best on CPU fp32; raise on GPUs)", min=1, at_most="max_beam_depth")
    beam_width: int = _setting(2, "tree mode: beams per draft", min=1, at_most="max_beam_width")
    beam_depth: int = _setting(4, "tree mode: tokens per beam", min=1, at_most="max_beam_depth")
    max_tree_nodes: int = _setting(64, "cap on the merged token tree's size", min=1, at_most="max_tree_nodes_limit")
    adaptive: bool = _setting(True, "cost-aware speculation: each round takes the shape (chain length; tree: beams x depth, or none) with the most expected tokens per second from the services' measured forward costs and the acceptance seen so far, within the values set; false = those values every round")
    prompt_lookup: bool = _setting(True, "prompt lookup: each round the orchestrator also proposes what followed the context's last few tokens where they occurred earlier in it (no model; microseconds), a chain the cost model takes as much of as pays; what makes code edits and quoting answers fast")
    send_ahead: str = _setting("auto", "rounds sent ahead: while the verify service checks a round, the orchestrator drafts the next one on the path that round most likely accepts whole and sends it at once, so the service finds it waiting instead of a link's delay later; its answer is kept only when the verdict confirms that path (lossless either way). auto: when the verify link's measured delay makes it pay (a far verify service); on: every round after the first; off: never", choices=("auto", "on", "off"))
    lookup_depth: int = _setting(16, "prompt lookup: most tokens of its chain one round verifies (adaptive rounds; fixed shapes take their own depth)", min=1, at_most="max_tree_nodes")
    lookup_max_ngram: int = _setting(4, "prompt lookup: longest suffix of the context searched for earlier in it", min=1)
    lookup_min_ngram: int = _setting(2, "prompt lookup: shortest suffix searched; shorter ones match more often and are accepted less", min=1, at_most="lookup_max_ngram")
    max_new_tokens: int = _setting(128, "default max_new_tokens when a request sets none", min=1, at_most="max_new_tokens_limit")
    max_new_tokens_limit: int = _setting(4096, "largest max_new_tokens a request may ask for", min=1)


@dataclass
class DoorLimits:
    """What the orchestrator's front doors allow one client: the bounds that keep a careless or
    hostile one from holding what others need (README, "Threat model")."""

    max_active_generations: int = _setting(8, "generations running at once", min=1)
    max_queued_generations: int = _setting(32, "generations waiting for a slot; beyond, RESOURCE_EXHAUSTED at once", min=0)
    generation_timeout_s: float = _setting(1800.0, "every generation's deadline, counted from its arrival; a client's X-Request-Timeout or gRPC deadline may only shorten it (0 = none)", min=0)
    stall_timeout_s: float = _setting(30.0, "a streaming client that takes none of its output for this long is cut off: its generation stops and its slot and caches are freed (0 = never)", min=0)
    max_queue_wait_s: float = _setting(60.0, "longest a generation waits for a slot; then it is refused as at capacity (429 / RESOURCE_EXHAUSTED, with a retry hint) (0 = until its deadline)", min=0)
    max_connections: int = _setting(256, "HTTP connections, and gRPC calls in progress, at once (each door); beyond, 503 / RESOURCE_EXHAUSTED at once", min=1)
    http_read_timeout_s: float = _setting(10.0, "an HTTP request's head must arrive within this many seconds of the connection (or of the last response), and its body within as many again; else the connection is closed, or 408", min=0.1)
    max_chat_messages: int = _setting(1024, "most messages one chat request may hold", min=1)
    max_choices: int = _setting(16, "most choices one HTTP request may ask for (n, and best_of on completions): each is a generation of its own, sharing the prompt's cache and batched with the others", min=1)
    http_ignore_unknown_fields: bool = _setting(False, "the HTTP door's answer to a request field it does not know: false = a 400 naming it (as OpenAI's API answers, so that a misspelt or unsupported parameter never passes unnoticed); true = ignore it (for clients that send vendor extras)")
    http_allowed_hosts: list[str] = _setting(lambda: ["localhost", "127.0.0.1", "::1"], "with no bearer token: the HTTP door answers only requests whose Host (and Origin, when a browser sends one) names one of these, comma-separated, so a web page cannot reach it through DNS rebinding or a cross-site form")
    allow_open: bool = _setting(False, "serve on an address beyond loopback with neither a bearer token nor TLS (behind a proxy that checks callers, or with the port published on loopback only); refused at start-up otherwise")
    log_max_mb: int = _setting(256, "the run log (--log-dir) is kept under this many MiB: the oldest files go first", min=1)


@dataclass
class OrchestratorSettings(ServerSettings, SpeculationDefaults, SpeculationLimits, DoorLimits, TlsClientSettings, AuthSettings):
    target_model: str = _setting(EMBEDDED_TARGET, "target model, for its tokenizer (must match the verify service)", model=True)
    verify_address: str = _setting("127.0.0.1:50052", "verify service, host:port; comma-separate replicas to fail over between")
    draft_addresses: list[str] = _setting(list, "draft services, comma-separated host:port")
    draft_timeout_ms: int = _setting(10000, "per-round deadline for each draft; a late draft is skipped", min=1)
    verify_timeout_ms: int = _setting(60000, "deadline for one round's VerifyTree, retries on UNAVAILABLE included", min=1)
    log_dir: str = _setting("logs", "one JSON statistics file per generation goes here ('' = off)")
    log_text: bool = _setting(False, "also write the prompt's and the output's text and token ids into those files (per round too); off: statistics and token counts only")
    trace_text: bool = _setting(False, "also put the prompt's and the output's text on each generation's span (gen_ai.input.messages, gen_ai.output.messages); off: spans carry token counts only")
    http_port: int = _setting(0, "also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) on this port, with the same TLS and bearer token as the gRPC port (0 = off)", **PORT)
    chat_template: str = _setting("", "Jinja file that renders /v1/chat/completions messages into the prompt ('' = the target tokenizer's own chat template)")


@dataclass
class ClusterSettings(SpeculationDefaults, SpeculationLimits, DoorLimits, TlsServerSettings, TlsClientSettings, AuthSettings):
    target_model: str = _setting(EMBEDDED_TARGET, "target model for the verify service", model=True)
    draft_models: list[str] = _setting(lambda: [EMBEDDED_DRAFT], "draft models, comma-separated, one service each", model=True)
    port: int = _setting(50051, "orchestrator port (drafts and verifier take free ports)", **PORT)
    verify_device: str = _setting("cpu", "device of the verify service")
    verify_replicas: int = _setting(1, "verify service replicas; the orchestrator spreads sessions over them and fails over", min=1)
    verify_link_rtt_ms: float = _setting(0.0, "put this round trip (half each way) between the orchestrator and the verify service, through a delaying proxy (specdec.tools.delay_proxy): the cluster as it would run with the target in a far datacenter and the drafts beside the orchestrator (0 = none)", min=0)
    draft_devices: list[str] = _setting(lambda: ["cpu"], "devices of the draft services, comma-separated (one, or one each)")
    dtype: str = _setting("auto", "model dtype for every service (auto: the verify service measures and keeps the fastest exact one; see specdec serve verify -- --help)", choices=DTYPES)
    draft_vocab: int = _setting(0, "draft services score only token ids below this (0 = all); see specdec serve draft -- --help", min=0)
    draft_quantize: str = _setting("auto", "draft models' weights: auto (the fastest measured on a CPU), none, int8, int4 or w8a8 (see specdec serve draft -- --help)", choices=QUANTIZE_MODES)
    target_quantize: str = _setting("auto", "the target's engine: auto (int4 measured beside the float dtypes for a target converted from a 4-bit GGUF), none, int8, int4 or w8a8 (see specdec serve verify -- --help)", choices=TARGET_QUANTIZE_MODES)
    log_dir: str = _setting("logs", "orchestrator statistics directory")
    log_text: bool = _setting(False, "the orchestrator also logs prompt and output text and token ids (see specdec serve orchestrator -- --help)")
    trace_text: bool = _setting(False, "the orchestrator also puts prompt and output text on its generation spans (see specdec serve orchestrator -- --help)")
    startup_timeout_s: int = _setting(600, "how long to wait for every service to report SERVING", min=1)
    trace_file: str = _setting("", "every service appends its spans to this JSON-lines file ('' = off)")
    metrics_port: int = _setting(0, "first Prometheus metrics port: orchestrator, then verify, then each draft on the next ports (0 = off)", **PORT)
    tls_client_ca: str = _setting("", "CA bundle, PEM file: the draft and verify services require client certificates signed by it (mutual TLS with the orchestrator)")
    # 0 here, for every launcher that embeds a cluster (tests, benchmarks, generate --local); `specdec cluster up` defaults it to 8000.
    http_port: int = _setting(0, "the orchestrator's OpenAI-compatible HTTP API port (0 = off)", **PORT)
    chat_template: str = _setting("", "Jinja file for the HTTP API's chat prompts ('' = the target tokenizer's own chat template)")


def env_name(name: str) -> str:
    return "SPECDEC_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _names(name: str) -> str:
    """A setting as a user sets it: ``draft_length (--draft-length / SPECDEC_DRAFT_LENGTH)``."""
    return f"{name} ({flag_name(name)} / {env_name(name)})"


def _parse(kind: type, raw: str, f: dataclasses.Field | None = None, where: str = "") -> Any:
    """``raw`` as a value of the setting ``f`` (of type ``kind``), checked against what it accepts.
    ``where`` says where the text came from (``SPECDEC_X=...`` or ``--x ...``) for the message."""
    meta = f.metadata if f is not None else {}
    name = f.name if f is not None else "value"

    def refuse(accepts: str) -> SettingError:
        shown = "(not shown)" if meta.get("secret") else (shlex.quote(raw) if raw.strip() else repr(raw))
        return SettingError(f"{where or name}{'=' if where.startswith('SPECDEC_') else ' '}{shown}: {name} {accepts}")

    text = raw.strip()
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise refuse("is true or false: write true/false, 1/0, yes/no or on/off (any case)")
    if kind == list[str]:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if kind is str:
        value = raw
    else:
        try:
            value = kind(text)
        except ValueError:
            raise refuse(f"takes {_accepts(kind, meta)}") from None
    if _problem(value, meta) is not None:
        raise refuse(f"takes {_accepts(kind, meta)}")
    return value


def _accepts(kind: type, meta: Mapping[str, Any]) -> str:
    """What a setting accepts, in words: ``an integer from 0 to 65535``, ``one of tree, sequential``."""
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    what = {int: "an integer", float: "a number"}.get(kind, "a value")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and high is not None:
        return f"{what} from {low} to {high}"
    if low is not None:
        return f"{what} of at least {low}"
    return what + (f" of at most {high}" if high is not None else "")


def _problem(value: Any, meta: Mapping[str, Any]) -> str | None:
    """Why ``value`` is not accepted by a setting with ``meta``; None when it is."""
    choices, low, high = meta.get("choices"), meta.get("min"), meta.get("max")
    if choices and value not in choices:
        return "choices"
    if low is not None and not low <= value:  # written so that NaN is refused too
        return "min"
    if high is not None and not value <= high:
        return "max"
    return None


def _known_variables() -> dict[str, str]:
    """Every ``SPECDEC_*`` name specdec reads, by its part after ``SPECDEC_``."""
    names = set(OTHER_VARIABLES)
    for value in globals().values():
        if isinstance(value, type) and dataclasses.is_dataclass(value):
            names.update(env_name(f.name) for f in dataclasses.fields(value))
    return {name.removeprefix("SPECDEC_"): name for name in names}


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a ``SPECDEC_*`` variable that specdec does not read but that is close to one it
    does (a typo would otherwise be ignored in silence). Names close to none are left alone."""
    environ = os.environ if environ is None else environ
    known = _known_variables()
    for name in sorted(environ):
        if name.startswith("SPECDEC_") and name.removeprefix("SPECDEC_") not in known:
            close = difflib.get_close_matches(name.removeprefix("SPECDEC_").upper(), known, n=1, cutoff=0.8)
            if close:
                raise SettingError(f"{name} is not a specdec setting; did you mean {known[close[0]]}?")


def validate(settings) -> None:
    """Check a settings object as a whole: each field's range and choices (so also the defaults and
    values given in code), each ``at_most`` against the field it names where ``settings`` has it
    (the speculation defaults against the limits the orchestrator holds every request to), and that
    a model given as a path exists. Raises :class:`SettingError`."""
    for f in dataclasses.fields(settings):
        value, meta = getattr(settings, f.name), f.metadata
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and _problem(value, meta) is not None:
            kind = type(value) if not meta.get("choices") else str
            raise SettingError(f"{_names(f.name)} = {value!r}: {f.name} takes {_accepts(kind, meta)}")
        limit = meta.get("at_most")
        if limit and hasattr(settings, limit) and value > getattr(settings, limit):
            raise SettingError(
                f"{_names(f.name)} = {value} is more than {_names(limit)} = {getattr(settings, limit)}: "
                f"lower {f.name} or raise {limit}")
        if meta.get("model"):
            from specdec.model_store import ModelStoreError, check_model_name

            for name in value if isinstance(value, list) else [value]:
                try:
                    check_model_name(name)
                except ModelStoreError as exc:
                    raise SettingError(f"{_names(f.name)}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                  environ: Mapping[str, str] | None = None) -> None:
    """Add one flag per field of ``cls``; defaults come from the environment (``environ``, this
    process's when None), then the dataclass."""
    environ = os.environ if environ is None else environ
    check_environment(environ)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        raw = environ.get(env_name(f.name))
        if raw is not None:
            default = _parse(kind, raw, f, env_name(f.name))
        choices = f.metadata.get("choices")
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            # Checked here rather than by argparse (choices=): a refused value raises SettingError, one line.
            type=(lambda s, k=kind, f=f: _parse(k, s, f, flag_name(f.name))),
            default=default,
            metavar="{" + ",".join(choices) + "}" if choices else None,
            help=f"{f.metadata.get('help', '')} [{env_name(f.name)}; default: {_show(default, f.metadata.get('secret', False))}]",
        )


def from_args(cls: type, namespace: argparse.Namespace):
    """The settings the parsed flags give, checked (:func:`validate`)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    settings = cls(**values)
    validate(settings)
    return settings


def from_env(cls: type, environ: Mapping[str, str] | None = None, **overrides: Any):
    """Settings from the environment (``environ``, this process's when None) and defaults, then
    ``overrides`` (for launchers, tests and embedding); checked as a whole once the overrides are in."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls, environ=environ)
    namespace = parser.parse_args([])
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
    settings = cls(**(values | overrides))
    validate(settings)
    return settings


def env_setting(cls: type, name: str, default: Any, environ: Mapping[str, str] | None = None) -> Any:
    """One setting of ``cls`` from its ``SPECDEC_*`` variable, checked as :func:`add_arguments`
    checks it, or ``default`` when the variable is not set (for flags a command declares itself)."""
    environ = os.environ if environ is None else environ
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    raw = environ.get(env_name(name))
    return default if raw is None else _parse(get_type_hints(cls)[name], raw, f, env_name(name))


def parse_or_exit(parser: argparse.ArgumentParser, cls: type, argv: list[str] | None, service: str):
    """A service's settings from its flags and the environment; a refused setting ends the process
    with one line on stderr, naming it and what it accepts, and exit status 2."""
    try:
        add_arguments(parser, cls)
        return from_args(cls, parser.parse_args(argv))
    except SettingError as exc:
        print(f"specdec {service}: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


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
