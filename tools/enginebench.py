"""``specdec enginebench``: the target's candidate engines on this CPU, side by side: what one pass
of N rows costs, and whether every row of it has the bits it gets alone.

Exact speculation needs a verify pass whose rows are batch-invariant (docs/speculation.md,
Exactness), and it pays only where a pass of a few rows costs little more than one. Both are
measured here, on the target's own GGUF file, for

- ``int4``: the verify service's int4 engine (torch's packed 4-bit product on the GGUF's own Q4_K
  levels, made batch-invariant as the service makes it);
- ``llama.cpp``: llama-cpp-python (``make llama-cpp``) on the same file, in each setting that
  changes the kernels its pass takes: weights repacked for the CPU's wide products (its default)
  or not (``use_extra_bufts``), flash attention on or off.

Each engine reads ``--context`` random tokens, then a chain of N random tokens in one pass for each
N in ``--rows`` (the fastest of ``--reps``); each row of the widest pass is compared bit for bit
with the same token fed one at a time. The table gives ms per pass by rows and the first row count
whose pass changed a row; ``--plot FILE.png`` draws the curves. All engines use torch's thread count.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from specdec import config

DEFAULT_ROWS = (1, 2, 3, 4, 5, 8, 16)
_QUIET = None  # llama.cpp's log callback while it runs (its loading chatter is not the report)


@dataclass
class EngineResult:
    engine: str
    setting: str
    ms_by_rows: dict[int, float] = field(default_factory=dict)
    first_variant_rows: int | None = None  # the smallest pass in which a row differs from one-token decoding
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.engine} ({self.setting})" if self.setting else self.engine


def _tokens(vocab: int, count: int, seed: int) -> list[int]:
    """Random ordinary tokens (not the first ids, often special or byte tokens; none past 30,000)."""
    return np.random.default_rng(seed).integers(min(100, vocab // 2), min(vocab, 30000), size=count).tolist()


def _first_variant(passes: dict[int, list[np.ndarray]], steps: list[np.ndarray]) -> int | None:
    """The smallest row count whose pass gave some row other bits than feeding it alone."""
    for rows in sorted(passes):
        if any(not np.array_equal(a, b) for a, b in zip(passes[rows], steps)):
            return rows
    return None


def _timed(run, reps: int) -> tuple[float, object]:
    out, best = run(), float("inf")  # one untimed run warms it
    for _ in range(reps):
        start = time.perf_counter()
        out = run()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best, out


# --------------------------------------------------------------------------- the int4 engine


def int4_engine(target: str, rows: list[int], reps: int, context_len: int) -> EngineResult:
    """The verify service's int4 engine on ``target`` (an embedded model converted from its GGUF)."""
    import torch

    from specdec.engine import tree_forward
    from specdec.gguf_weights import model_gguf
    from specdec.kernels import make_batch_invariant
    from specdec.kv_cache import SessionKV
    from specdec.model_store import load_model, resolve_model
    from specdec.quantize import MODEL_DTYPES, quantize_model

    gguf = model_gguf(resolve_model(target))
    model, _ = load_model(target, device="cpu", dtype=MODEL_DTYPES["int4"][0])
    model = quantize_model(model, "int4", gguf=gguf)
    kernel = make_batch_invariant(model)
    vocab = model.get_output_embeddings().out_features
    context, chain = _tokens(vocab, context_len, 0), _tokens(vocab, max(rows), 1)
    session = SessionKV("enginebench")
    tree_forward(model, session, context)

    def chain_pass(n: int) -> list[np.ndarray]:
        session.sync(context)
        logits = tree_forward(model, session, [], chain[:n], list(range(-1, n - 1)), logits_to_keep=n)  # a chain as tree nodes
        return [row.numpy().copy() for row in logits]

    result = EngineResult("int4", f"torch {torch.__version__}, kernel {kernel}")
    passes = {}
    for n in rows:
        result.ms_by_rows[n], passes[n] = _timed(lambda: chain_pass(n), reps)
    session.sync(context)
    steps = [tree_forward(model, session, [token])[-1].numpy().copy() for token in chain]
    result.first_variant_rows = _first_variant(passes, steps)
    return result


# --------------------------------------------------------------------------- llama.cpp


class LlamaContext:
    """One llama.cpp model and context through llama-cpp-python's C API: a pass of several tokens
    as one batch with the logits of every row, and the cache cut back to a length after it. (The
    high-level ``Llama`` class does not expose the repacking setting.)"""

    def __init__(self, llama_cpp, path: str, threads: int, repack: bool, flash_attention: bool, n_ctx: int) -> None:
        self.lib = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = repack
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_ctx, n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = 1 if flash_attention else 0
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def feed(self, tokens: list[int], start: int, logits: bool = True) -> list[np.ndarray]:
        """Feed ``tokens`` at positions ``start``..; the logits of every row (else none)."""
        lib, n = self.lib, len(tokens)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = int(logits)
            batch.n_tokens = n
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return [np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).copy()
                    for i in range(n)] if logits else []
        finally:
            lib.llama_batch_free(batch)

    def cut(self, length: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, 0, length, -1)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def llama_engine(gguf: str, threads: int, repack: bool, flash_attention: bool, rows: list[int], reps: int,
                 context_len: int) -> EngineResult:
    import llama_cpp

    llm = LlamaContext(llama_cpp, gguf, threads, repack, flash_attention, n_ctx=context_len + max(rows) + 8)
    setting = f"{'repacked' if repack else 'not repacked'}, flash attention {'on' if flash_attention else 'off'}"
    try:
        context, chain = _tokens(llm.vocab, context_len, 0), _tokens(llm.vocab, max(rows), 1)
        llm.feed(context, 0, logits=False)
        result, passes = EngineResult("llama.cpp", setting), {}

        def chain_pass(n: int) -> list[np.ndarray]:
            llm.cut(context_len)
            return llm.feed(chain[:n], context_len)

        for n in rows:
            result.ms_by_rows[n], passes[n] = _timed(lambda: chain_pass(n), reps)
        llm.cut(context_len)
        steps = [llm.feed([token], context_len + i)[0] for i, token in enumerate(chain)]
        result.first_variant_rows = _first_variant(passes, steps)
        return result
    finally:
        llm.close()


# --------------------------------------------------------------------------- report


def report(results: list[EngineResult], rows: list[int]) -> str:
    width = max(len(r.label) for r in results)
    lines = [f"{'engine':<{width}}  " + "  ".join(f"{n:>6}" for n in rows) + "   ms per pass by rows; row-invariant"]
    for r in results:
        exact = "yes" if r.first_variant_rows is None else f"no: rows differ at {r.first_variant_rows} rows"
        if r.note:
            lines.append(f"{r.label:<{width}}  {r.note}")
            continue
        lines.append(f"{r.label:<{width}}  " + "  ".join(f"{r.ms_by_rows[n]:>6.1f}" for n in rows) + f"   {exact}")
    return "\n".join(lines)


def plot(results: list[EngineResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.ms_by_rows:
            style = "-" if r.first_variant_rows is None else "--"
            ax.plot(list(r.ms_by_rows), list(r.ms_by_rows.values()), style, marker="o",
                    label=r.label + ("" if r.first_variant_rows is None else " (not row-invariant)"))
    ax.set_xlabel("rows in one pass")
    ax.set_ylabel("ms per pass")
    ax.set_title("Cost of one pass of the target by rows (dashed: not row-invariant)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args) -> list[EngineResult]:
    import torch

    from specdec.gguf_weights import model_gguf
    from specdec.model_store import resolve_model

    threads = torch.get_num_threads()
    gguf = model_gguf(resolve_model(args.target_model))
    if gguf is None:
        raise SystemExit(f"{args.target_model} has no GGUF file beside its weights (`specdec models fetch` keeps one)")
    print(f"{gguf.name}, {threads} threads, context {args.context} tokens, rows {args.rows}", file=sys.stderr, flush=True)
    results = []
    if "int4" in args.engines:
        print("int4 engine ...", file=sys.stderr, flush=True)
        results.append(int4_engine(args.target_model, args.rows, args.reps, args.context))
    if "llama.cpp" in args.engines:
        try:
            import llama_cpp
        except ImportError:
            results.append(EngineResult("llama.cpp", "", note="skipped: llama-cpp-python is not installed (make llama-cpp)"))
        else:
            llama_cpp.llama_backend_init()
            global _QUIET  # llama.cpp keeps the pointer: the callback must outlive every call
            _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
            llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
            for repack in (True, False):
                for flash in (False, True):
                    print(f"llama.cpp {llama_cpp.__version__}, repack {repack}, flash attention {flash} ...",
                          file=sys.stderr, flush=True)
                    results.append(llama_engine(str(gguf), threads, repack, flash, args.rows, args.reps, args.context))
    return results


def _ints(text: str) -> list[int]:
    return sorted({int(t) for t in text.split(",") if t})


def add_parser(commands) -> None:
    bench = commands.add_parser("enginebench", help="the target's engines: cost of a pass by rows, and row invariance",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--target-model", default=config.EMBEDDED_TARGET)
    bench.add_argument("--engines", type=lambda t: t.split(","), default=["int4", "llama.cpp"],
                       help="comma-separated, of int4 and llama.cpp [default: both]")
    bench.add_argument("--rows", type=_ints, default=list(DEFAULT_ROWS), help="row counts, comma-separated")
    bench.add_argument("--reps", type=int, default=3, help="timed passes per row count (the fastest is kept)")
    bench.add_argument("--context", type=int, default=128, help="context tokens before each pass")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw ms per pass against rows")
    bench.set_defaults(func=main)


def main(args) -> int:
    results = run(args)
    print(report(results, args.rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0
