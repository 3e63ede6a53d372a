"""The sweep file of ``specdec bench`` and the plan of runs it makes.

:func:`load_sweep_config` reads and checks a sweep file (YAML; ``benchmarks/bench.yaml`` explains
every key) into a :class:`SweepConfig`; :func:`sweep_plan` turns it into the :class:`RunSpec` of each
run, in the order they go, each with the name its log is written under. Nothing here loads a model
or starts a service, so a plan can be listed (``specdec bench --dry-run``) and checked on its own;
:mod:`specdec.tools.bench` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from specdec import config
from specdec.lookup import NAME as LOOKUP
from specdec.records import MODE_NAMES
from specdec.tools import analyze
from specdec.tools.prompts import PROMPT_CLASSES, Prompt, PromptFileError, load_prompts, prompt_from

TARGET_ONLY, ASSISTED, LLAMA_CPP = analyze.TARGET_ONLY, analyze.ASSISTED, analyze.LLAMA_CPP
WARMUP_TOKENS = 8  # enough for a few rounds: every code path runs once before timing starts


class BenchError(RuntimeError):
    """A failure to report in one message (with the services' logs) rather than a traceback."""


@dataclass
class Method:
    mode: str  # target-only, assisted, or a DecodingMode value
    settings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.mode if self.mode in analyze.BASELINES else f"specdec-{self.mode}"

    @property
    def label(self) -> str:
        return analyze.configuration_label(self.mode, self.settings)


SWEEP_KEYS = {
    "name", "target_model", "draft_model_sets", "max_new_tokens", "modes", "baselines", "sequential", "tree",
    "prompt_files", "prompts", "classes", "prompts_per_class", "repetitions", "dtype", "devices", "output_dir",
    "warmup_tokens", "startup_timeout_s", "adaptive", "baseline_dtypes", "default", "llama_cpp_draft_lengths",
}
#: The dtypes stock decoding is timed in (target-only and assisted with ``dtype: auto``; the demo's
#: comparison): whichever is faster on the machine is what a user already has.
STOCK_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelSet:
    name: str
    models: tuple[str, ...]  # draft models; ``prompt-lookup`` among them turns the orchestrator's lookup on
    # The services' quantization (``--target-quantize``, ``--draft-quantize``); "" = their defaults. A
    # quantized target is another model: its runs are held to its own one-token decoding.
    target_quantize: str = ""
    draft_quantize: str = ""

    @property
    def drafts(self) -> list[str]:
        """The model drafts, one service each."""
        return [m for m in self.models if m != LOOKUP]

    @property
    def lookup(self) -> bool:
        """Whether the orchestrator's prompt lookup runs beside them (``specdec.lookup``)."""
        return LOOKUP in self.models


@dataclass
class SweepConfig:
    path: Path
    name: str
    target_model: str
    model_sets: list[ModelSet]
    max_new_tokens: list[int]
    modes: list[str]  # speculative modes, through the cluster
    baselines: list[str]  # target-only always; assisted unless left out
    draft_lengths: list[int]
    tree_shapes: list[tuple[int, int]]  # (beam_width, beam_depth)
    max_tree_nodes: int
    prompts: list[Prompt]
    repetitions: int
    dtype: str
    verify_device: str
    draft_devices: list[str]
    baseline_device: str
    output_dir: Path
    warmup_tokens: int
    startup_timeout_s: int
    # The cluster's default: true lets the cost model shape each round within the settings a run
    # names (they become upper bounds); false runs the settings as given.
    adaptive: bool = True
    # target-only runs once in each; the first is ``dtype``, the reference every run must equal.
    # Speedups are over the fastest of them. With ``dtype: auto`` every one carries its dtype.
    baseline_dtypes: list[str] = field(default_factory=list)
    # llama.cpp's own draft-model speculation (each set's first draft, its GGUF) at these draft lengths,
    # beside llama.cpp target-only, when ``llama-cpp`` is among the baselines.
    llama_cpp_draft_lengths: list[int] = field(default_factory=list)
    # Also run tree mode with the orchestrator's own defaults and the cost model on (``default``),
    # beside the grid of shapes (which run as ``adaptive`` says: false makes them fixed shapes).
    default: bool = False

    @property
    def reference_mode(self) -> str:
        """The run every other's tokens must equal. With ``dtype: auto`` the verify service picks its
        dtype at start-up, so the reference is its own one-token decoding (``autoregressive``
        through the cluster), which speculation equals by construction; stock ``generate`` in each
        dtype is then a speed figure only. Otherwise stock ``generate`` in ``dtype``."""
        return "autoregressive" if self.dtype == "auto" else TARGET_ONLY

@dataclass(frozen=True)
class RunSpec:
    method: Method
    model_set: ModelSet | None  # None for the baselines
    prompt: Prompt
    max_new_tokens: int
    repeat: int

    @property
    def set_name(self) -> str:
        if self.method.mode in (TARGET_ONLY, LLAMA_CPP) and "draft_model" not in self.method.settings:
            return "-"
        if self.method.mode in (ASSISTED, LLAMA_CPP):
            return self.method.settings["draft_model"]
        return self.model_set.name

    @property
    def draft_models(self) -> list[str]:
        if self.method.mode in (ASSISTED, LLAMA_CPP) and "draft_model" in self.method.settings:
            return [self.method.settings["draft_model"]]
        return list(self.model_set.models) if self.model_set and self.method.mode != "autoregressive" else []

    @property
    def run_id(self) -> str:
        s = self.method.settings
        what = {
            TARGET_ONLY: "-".join(["target-only", *([s["dtype"]] if "dtype" in s else [])]),
            LLAMA_CPP: "-".join(["llama-cpp", *([f"k{s['draft_length']}", slug(s["draft_model"])] if {"draft_model", "draft_length"} <= s.keys() else [])]),
            ASSISTED: "-".join(["assisted", slug(s.get("draft_model", "")), *([s["dtype"]] if "dtype" in s else [])]),
            "autoregressive": "autoregressive",
            "sequential": f"sequential-k{s.get('draft_length')}",
            "tree": f"tree-w{s.get('beam_width')}-d{s.get('beam_depth')}-n{s.get('max_tree_nodes')}" if "beam_width" in s else "default",
        }[self.method.mode]
        where = "baseline" if self.model_set is None else slug(self.model_set.name)
        return f"{where}--{what}--n{self.max_new_tokens}--{slug(self.prompt.id)}--r{self.repeat}"


def slug(text: str) -> str:
    """A file-name-safe form: a model path keeps its last part."""
    text = text.rstrip("/").rsplit("/", 1)[-1] if "/" in text else text
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in text) or "x"


def _list(value, kind, key: str, where: Path) -> list:
    items = value if isinstance(value, list) else [value]
    try:
        return [kind(v) for v in items]
    except (TypeError, ValueError):
        raise BenchError(f"{where}: {key} must be a {kind.__name__} or a list of them, got {value!r}") from None


def load_sweep_config(path: Path) -> SweepConfig:
    """Read and check a sweep file (see benchmarks/bench.yaml for every key, with comments)."""
    raw = _read_settings(path)
    defaults = config.SpeculationDefaults()
    name = str(raw.get("name") or path.stem)
    model_sets = _model_sets(raw.get("draft_model_sets") or [[config.EMBEDDED_DRAFT]], path)
    modes, baselines = _modes_and_baselines(raw, path)
    sequential, tree = raw.get("sequential") or {}, raw.get("tree") or {}
    draft_lengths = _list(sequential.get("draft_lengths", defaults.draft_length), int, "sequential.draft_lengths", path)
    shapes = _tree_shapes(tree, defaults, path)
    max_new_tokens = _list(raw.get("max_new_tokens", 64), int, "max_new_tokens", path)
    llama_cpp_draft_lengths = _list(raw.get("llama_cpp_draft_lengths", []), int, "llama_cpp_draft_lengths", path)
    numbers = [*draft_lengths, *(v for shape in shapes for v in shape), *max_new_tokens, *llama_cpp_draft_lengths]
    if any(n < 1 for n in numbers):
        raise BenchError(f"{path}: draft lengths, beam widths and depths and max_new_tokens must be at least 1")
    prompts = _prompts(raw, path)
    devices = raw.get("devices") or {}
    verify_device = str(devices.get("verify", "cpu"))
    repetitions = int(raw.get("repetitions", 1))
    if repetitions < 1:
        raise BenchError(f"{path}: repetitions must be at least 1")
    return SweepConfig(
        path=path, name=name, target_model=str(raw.get("target_model") or config.EMBEDDED_TARGET), model_sets=model_sets,
        max_new_tokens=max_new_tokens, modes=modes, baselines=baselines, draft_lengths=draft_lengths,
        llama_cpp_draft_lengths=llama_cpp_draft_lengths,
        tree_shapes=shapes, max_tree_nodes=int(tree.get("max_tree_nodes", defaults.max_tree_nodes)), prompts=prompts,
        repetitions=repetitions, dtype=str(raw.get("dtype", "float32")), verify_device=verify_device,
        draft_devices=_list(devices.get("drafts", verify_device), str, "devices.drafts", path),
        baseline_device=str(devices.get("baselines", verify_device)),
        output_dir=Path(raw.get("output_dir") or Path("bench_results") / slug(name)),
        warmup_tokens=int(raw.get("warmup_tokens", WARMUP_TOKENS)),
        startup_timeout_s=int(raw.get("startup_timeout_s", 600)),
        adaptive=_flag(raw.get("adaptive", True), "adaptive", path),
        baseline_dtypes=_baseline_dtypes(raw, path),
        default=_flag(raw.get("default", False), "default", path),
    )


def _baseline_dtypes(raw: dict, path: Path) -> list[str]:
    dtype = str(raw.get("dtype", "float32"))
    if dtype not in config.DTYPES:
        raise BenchError(f"{path}: dtype: unknown dtype {dtype!r} ({', '.join(config.DTYPES)})")
    extra = _list(raw.get("baseline_dtypes", []), str, "baseline_dtypes", path)
    bad = [d for d in extra if d not in ("float32", "bfloat16", "float16")]
    if bad:
        raise BenchError(f"{path}: baseline_dtypes: unknown dtype {bad[0]!r} (float32, bfloat16, float16)")
    if dtype == "auto":
        return list(dict.fromkeys(extra or STOCK_DTYPES))
    return list(dict.fromkeys([dtype, *extra]))


def _flag(value, key: str, path: Path) -> bool:
    if not isinstance(value, bool):
        raise BenchError(f"{path}: {key} must be true or false, not {value!r}")
    return value


def _read_settings(path: Path) -> dict:
    """The file's mapping of settings, every key a known one."""
    import yaml

    if not path.is_file():
        raise BenchError(f"no sweep config at {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: expected a mapping of settings")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise BenchError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SWEEP_KEYS))}")
    return raw


def _model_sets(items: list, path: Path) -> list[ModelSet]:
    """``draft_model_sets``: each a list of models (or a comma-separated string), or ``{name, models}``
    with optional ``target_quantize`` and ``draft_quantize`` (the services' settings of that name)."""
    model_sets = []
    for i, item in enumerate(items):
        item = item if isinstance(item, dict) else {"models": item}
        models, set_name = item.get("models"), item.get("name")
        models = [m.strip() for m in (models.split(",") if isinstance(models, str) else models or []) if str(m).strip()]
        if not models:
            raise BenchError(f"{path}: draft_model_sets[{i}] names no draft model")
        quantize = {}
        for key, modes in (("target_quantize", config.TARGET_QUANTIZE_MODES), ("draft_quantize", config.QUANTIZE_MODES)):
            value = str(item.get(key, ""))
            if value and value not in modes:
                raise BenchError(f"{path}: draft_model_sets[{i}].{key}: {value!r} is not one of {', '.join(modes)}")
            quantize[key] = value
        model_sets.append(ModelSet(str(set_name or "+".join(slug(m) for m in models)), tuple(models), **quantize))
    if len({m.name for m in model_sets}) != len(model_sets):
        raise BenchError(f"{path}: draft_model_sets need distinct names")
    return model_sets


def _modes_and_baselines(raw: dict, path: Path) -> tuple[list[str], list[str]]:
    """The speculative modes, in DecodingMode's order, and the baselines: target-only first, always."""
    modes = _list(raw.get("modes", ["sequential", "tree"]), str, "modes", path)
    bad = [m for m in modes if m not in MODE_NAMES]
    baselines = _list(raw.get("baselines", [TARGET_ONLY, ASSISTED]), str, "baselines", path)
    bad += [b for b in baselines if b not in analyze.BASELINES]
    if bad:
        raise BenchError(f"{path}: unknown mode(s) {', '.join(bad)}; modes: {', '.join(MODE_NAMES)}; "
                         f"baselines: {', '.join(analyze.BASELINES)}")
    # target-only is the reference every run is checked against, so it is never left out.
    return [m for m in MODE_NAMES if m in modes], [TARGET_ONLY] + [b for b in analyze.BASELINES[1:] if b in baselines]


def _tree_shapes(tree: dict, defaults: config.SpeculationDefaults, path: Path) -> list[tuple[int, int]]:
    """(beam_width, beam_depth) pairs: ``tree.shapes`` as given, else every width with every depth."""
    if "shapes" in tree:
        shapes = [tuple(_list(shape, int, "tree.shapes", path)) for shape in tree["shapes"]]
        if any(len(shape) != 2 for shape in shapes):
            raise BenchError(f"{path}: tree.shapes holds [beam_width, beam_depth] pairs")
        return shapes
    widths = _list(tree.get("beam_widths", defaults.beam_width), int, "tree.beam_widths", path)
    depths = _list(tree.get("beam_depths", defaults.beam_depth), int, "tree.beam_depths", path)
    return [(w, d) for w in widths for d in depths]


def _prompts(raw: dict, path: Path) -> list[Prompt]:
    """The prompt files' prompts (relative to the sweep file) and the inline ones, of the chosen
    classes, at most ``prompts_per_class`` of each."""
    prompts: list[Prompt] = []
    try:
        for file in _list(raw.get("prompt_files", []), str, "prompt_files", path):
            prompts += load_prompts(path.parent / file)
        for i, item in enumerate(raw.get("prompts") or []):
            prompts.append(prompt_from(item, f"{path}: prompts[{i}]"))
    except PromptFileError as exc:
        raise BenchError(str(exc)) from None
    classes = _list(raw.get("classes", list(PROMPT_CLASSES)), str, "classes", path)
    prompts = [p for p in prompts if p.cls in classes]
    per_class = raw.get("prompts_per_class")
    if per_class:
        prompts = [p for p in prompts if [q.id for q in prompts if q.cls == p.cls].index(p.id) < int(per_class)]
    if not prompts:
        raise BenchError(f"{path}: no prompts (set prompt_files or prompts; check classes)")
    if len({p.id for p in prompts}) != len(prompts):
        raise BenchError(f"{path}: prompt ids must be unique across files")
    return prompts


def sweep_plan(cfg: SweepConfig) -> list[RunSpec]:
    """Every run, in the order they go: target-only, assisted, then each model set's modes on its own cluster."""
    def each(method: Method, model_set: ModelSet | None) -> list[RunSpec]:
        return [RunSpec(method, model_set, prompt, n, repeat)
                for n in cfg.max_new_tokens for repeat in range(cfg.repetitions) for prompt in cfg.prompts]

    # The first baseline dtype is the sweep's own (the reference) and goes unnamed; with dtype auto
    # every baseline names its dtype.
    first_named = 0 if cfg.dtype == "auto" else 1
    plan = [] if cfg.dtype == "auto" else each(Method(TARGET_ONLY), None)
    for dtype in cfg.baseline_dtypes[first_named:]:
        plan += each(Method(TARGET_ONLY, {"dtype": dtype}), None)
    if ASSISTED in cfg.baselines:
        for draft in dict.fromkeys(s.drafts[0] for s in cfg.model_sets if s.drafts):  # assisted takes one draft: each set's first
            for i, dtype in enumerate(cfg.baseline_dtypes or [cfg.dtype]):
                plan += each(Method(ASSISTED, {"draft_model": draft, **({"dtype": dtype} if i >= first_named else {})}), None)
    if LLAMA_CPP in cfg.baselines:
        plan += each(Method(LLAMA_CPP), None)
        for draft in dict.fromkeys(s.drafts[0] for s in cfg.model_sets if s.drafts):  # its own speculation: each set's first draft
            for k in cfg.llama_cpp_draft_lengths:
                plan += each(Method(LLAMA_CPP, {"draft_model": draft, "draft_length": k}), None)
    modes = list(cfg.modes)
    if cfg.reference_mode not in (TARGET_ONLY, *modes):
        modes.insert(0, cfg.reference_mode)  # it runs first on each cluster: the reference of the runs after it
    for model_set in cfg.model_sets:
        for mode in modes:
            fixed = {} if cfg.adaptive else {"adaptive": False}  # named, so that the tables say "fixed"
            if mode == "sequential":
                methods = [Method(mode, {"draft_length": k, **fixed}) for k in cfg.draft_lengths]
            elif mode == "tree":
                methods = [Method(mode, {"beam_width": w, "beam_depth": d, "max_tree_nodes": cfg.max_tree_nodes, **fixed})
                           for w, d in cfg.tree_shapes]
            else:
                methods = [Method(mode)]
            for method in methods:
                plan += each(method, model_set)
        if cfg.default:  # after the reference, so that it is checked too
            plan += each(Method("tree", {"adaptive": True}), model_set)
    return plan

