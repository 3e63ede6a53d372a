"""What a model service reports about itself (GetInfo), computed once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec import __version__


@dataclass
class ModelDescription:
    service: str
    model: str
    vocab_size: int
    tokenizer_fingerprint: str
    device: str
    dtype: str
    max_context: int
    eos_token_ids: list[int] = field(default_factory=list)
    version: str = __version__
    forward_costs: list[tuple[int, float]] = field(default_factory=list)  # (rows, ms) from the start-up calibration
    precision: str = ""  # with --dtype auto: what was measured and why this dtype (specdec.precision)
    host: str = field(default_factory=lambda: host_id())  # the machine (GetInfo.host)


def host_id() -> str:
    """An opaque id of this machine: a hash of the kernel's boot id, which every process and
    container of one machine reads alike (its host name differs per container), else of the host
    name."""
    import hashlib
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            source = f.read().strip()
    except OSError:
        source = socket.gethostname()
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def describe_model(service: str, name: str, model, tokenizer) -> ModelDescription:
    from specdec.model_store import tokenizer_fingerprint

    return ModelDescription(
        service=service,
        model=name,
        vocab_size=model.get_output_embeddings().weight.shape[0],
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        max_context=int(getattr(model.config, "max_position_embeddings", 0) or 0),
        eos_token_ids=eos_token_ids(model, tokenizer),
    )


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generation, as transformers' generate would use them."""
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in found:
                found.append(int(token))
        if found:
            break
    return found
