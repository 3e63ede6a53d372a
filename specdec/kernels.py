"""Which kernels a model's forward runs on: fast linear products, and a verify pass in which every
row gets the same bits whatever else shares it (batch invariance).

Why this matters (measured on 2 cores, float32, one 1536x8960 product, README "Exactness"):

- torch's default CPU product (MKL) gives row 0 of an M-row product other bits than the same row
  alone, for every M > 1, and costs 2 to 4 times a one-row product from 2 rows up on CPUs where MKL
  takes its generic path. A verify pass over a tree would then neither match one-token decoding bit
  for bit nor cost about one token step.
- oneDNN's product over a weight packed once (``torch.ops.mkldnn._reorder_linear_weight`` /
  ``_linear_pointwise``, what torch's own compiler emits for CPU linears) gave the same bits for
  every M from 1 to 64 and every row position, at 1.0 to 1.7 times a one-row product for up to 16
  rows. It exists for float32 on any x86 CPU, and for bfloat16 where the CPU has native bfloat16.
  On some CPUs (AMD EPYC with AVX-512) it takes a matrix-vector path for one row whose bits differ
  from every M >= 2, which all agree: a one-row product padded to two rows is then invariant, at
  the same cost (:func:`invariant_min_rows` finds the padding on the model's own weights).

So :func:`make_batch_invariant` packs the linears through oneDNN when :func:`rows_invariant`
confirms on the model's own weights that the product is row-invariant here, and otherwise (GPUs,
CPUs without the packed path) cuts every product into blocks of exactly ``INVARIANT_ROWS`` rows, so
a row's product never depends on how many rows the pass has. Attention runs one query row at a
time over exactly the keys that row sees (:func:`rowwise_attention`). :func:`pack_linears` gives a
draft model the fast product without the check (a draft need not be exact: the target decides).
"""

from __future__ import annotations

import functools

import torch

#: Rows per linear product where no row-invariant kernel exists: every product is cut into blocks of
#: exactly this many rows (the last one padded), whatever number of rows the forward carries.
INVARIANT_ROWS = 16
#: Row counts at which :func:`rows_invariant` compares a row with the same row computed alone: every
#: count a tree pass takes, then prefill-sized ones. Passes longer than the last are cut into blocks
#: of that many rows, so no product runs at an unchecked count beyond it.
CHECKED_ROWS = (*range(2, 34), 48, 64, 100, 128)
PACKED_MAX_ROWS = CHECKED_ROWS[-1]
_ROWWISE = "specdec_rowwise"


def onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` packed for oneDNN's product, or None where torch has no such kernel for its device
    and dtype (GPUs; bfloat16 on CPUs without native bfloat16)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


class PackedProduct:
    """``x @ weight.T + bias`` with the weight packed for oneDNN. Copies of a model share it (the
    packed weight is read-only, and torch cannot copy it)."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed, self.bias = packed, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        # The bias is added apart: fused into the product, one-row results got other bits than rows
        # of a larger product (measured: Qwen2.5-0.5B's 896x896 query projection).
        return out if self.bias is None else out + self.bias

    def __deepcopy__(self, memo) -> PackedProduct:
        return self


def _blocked(product, rows: int, x: torch.Tensor, pad: bool, min_rows: int = 1) -> torch.Tensor:
    """``product`` over ``x``'s rows in blocks of ``rows`` (``pad``: the last block padded to that
    size); a block of fewer than ``min_rows`` rows is padded to ``min_rows``."""
    flat = x.reshape(-1, x.shape[-1])
    m = flat.shape[0]
    if m <= rows and not pad:
        out = product(torch.nn.functional.pad(flat, (0, 0, 0, min_rows - m)) if m < min_rows else flat)[:m]
    else:
        if pad:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, -m % rows))
        blocks = flat.split(rows)
        if blocks[-1].shape[0] < min_rows:
            blocks = (*blocks[:-1], torch.nn.functional.pad(blocks[-1], (0, 0, 0, min_rows - blocks[-1].shape[0])))
        out = torch.cat([product(block) for block in blocks])[:m]
    return out.reshape(*x.shape[:-1], out.shape[-1])


#: Smallest row counts a packed product may be run at, tried in this order: on some CPUs oneDNN
#: takes another path for a single row (a matrix-vector kernel, with its own summation order) than
#: for two or more, which all agree (measured: AMD EPYC with AVX-512, float32 and bfloat16). A
#: one-row product padded to two costs the same there, so padding restores invariance for free.
MIN_ROWS_TRIED = (1, 2, 4, 8)


def invariant_min_rows(product, in_features: int, dtype: torch.dtype, counts=CHECKED_ROWS) -> int | None:
    """The smallest row count in :data:`MIN_ROWS_TRIED` from which ``product`` is row-invariant: run
    with every pass of fewer rows padded to it, each row gets the bits it gets alone at every count
    in ``counts``; None when padding does not help."""
    for min_rows in MIN_ROWS_TRIED:
        padded = functools.partial(_blocked, product, max(counts), pad=False, min_rows=min_rows)
        if rows_invariant(padded, in_features, dtype, counts):
            return min_rows
    return None


def rows_invariant(product, in_features: int, dtype: torch.dtype, counts=CHECKED_ROWS, seed: int = 0) -> bool:
    """Whether ``product(x)`` gives every row of ``x`` the bits it gets alone, at each row count."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(max(counts), in_features, generator=generator).to(dtype)
    alone = torch.cat([product(x[r : r + 1]) for r in range(max(counts))])
    return all(torch.equal(product(x[:m]), alone[:m]) for m in counts)


def _linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not hasattr(m, "_specdec_kernel")]


def _use_packed(model, module: torch.nn.Linear, packed: torch.Tensor, max_rows: int | None,
                keep_head: bool = True, min_rows: int = 1) -> None:
    product = PackedProduct(packed, module.bias)
    module._specdec_kernel = "onednn"
    module._specdec_min_rows = min_rows
    module.forward = product if max_rows is None else functools.partial(_blocked, product, max_rows, pad=False, min_rows=min_rows)
    head = module is model.get_output_embeddings()
    tied = head and module.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if not head or not (keep_head or tied):
        # The packed copy replaces the weight; a shape-only stand-in stays for code that reads its
        # shape. (A draft's output head keeps its weight: a draft scores a slice of it; so does a
        # head tied to the input embedding.)
        module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)


def own_memory(model) -> None:
    """Copy the CPU tensors ``model`` still reads straight from its checkpoint file into memory of its
    own. ``from_pretrained`` maps safetensors files: once the linears are packed, the embedding, the
    norms and the output head still point into that mapping, which keeps the whole file (every weight
    packed since) resident, doubling the process's resident size (13 GB instead of 7 GB for the
    1.5B target in float32). Copies keep ties (the same Parameter object is updated in place)."""
    copies: dict[tuple, torch.Tensor] = {}  # tensors sharing memory (tied weights) share the copy
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu" or tensor.is_meta:
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.data.clone()
        with torch.no_grad():
            tensor.data = copies[key]


def pack_linears(model) -> str:
    """Route ``model``'s linear layers through oneDNN's packed product where torch has it (faster from
    one row up, and flatter in rows, on the CPUs measured); returns the kernel used, "onednn" or
    "default". The packed copy is kept beside the weight (which other code reads)."""
    linears = _linears(model)
    packed = [onednn_packed(m.weight) for m in linears]
    kernel = "onednn" if linears and None not in packed else "default"
    if kernel == "onednn":
        for module, weight in zip(linears, packed):
            _use_packed(model, module, weight, None)
    own_memory(model)
    return kernel


def make_batch_invariant(model, rows: int = INVARIANT_ROWS, kernel: str = "auto") -> str:
    """Make every row of ``model``'s forward the same bits whatever else shares the pass; returns the
    linear kernel used: "onednn" (packed, checked row-invariant on every distinct weight shape of
    the model) or "fixed-rows" (blocks of exactly ``rows`` rows; ``kernel="fixed-rows"`` asks for
    it); for quantized layers (``specdec.quantize``), "int8", "int4" or "w8a8" (their own kernel,
    checked the same way) or "int8-fixed-rows" and so on. Changes the model in place."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model, "_specdec_kernel", None):
        return model._specdec_kernel  # made batch-invariant before
    AttentionInterface.register(_ROWWISE, segmented(rowwise_attention))
    AttentionMaskInterface.register(_ROWWISE, sdpa_mask)
    model.config._attn_implementation = _ROWWISE
    linears = _linears(model)
    packed = [onednn_packed(m.weight) for m in linears] if kernel == "auto" else []
    kernel = "onednn" if linears and len(packed) == len(linears) and None not in packed else "fixed-rows"
    min_rows: dict[tuple, int | None] = {}  # per weight shape: the fewest rows a product runs at
    if kernel == "onednn":
        for module, weight in zip(linears, packed):
            shape = tuple(module.weight.shape)
            if shape not in min_rows:
                product = PackedProduct(weight, module.bias)
                # The output head is large: its check stops at tree sizes (prefill keeps one row of it).
                counts = CHECKED_ROWS if shape[0] * shape[1] < 64 << 20 else CHECKED_ROWS[:32]
                min_rows[shape] = invariant_min_rows(product, shape[1], module.weight.dtype, counts)
            if min_rows[shape] is None:
                kernel = "fixed-rows"
                break
    for module, weight in zip(linears, packed or [None] * len(linears)):
        if kernel == "onednn":
            _use_packed(model, module, weight, PACKED_MAX_ROWS, keep_head=False, min_rows=min_rows[tuple(module.weight.shape)])
        else:
            module._specdec_kernel = "fixed-rows"
            product = functools.partial(torch.nn.functional.linear, weight=module.weight, bias=module.bias)
            module.forward = functools.partial(_blocked, product, rows, pad=True)
    if _quantized_rows_invariant(model, rows) is not None:
        quantized = sorted({m._specdec_kernel for m in model.modules() if not isinstance(m, torch.nn.Linear)
                            and hasattr(m, "_specdec_kernel")})
        kernel = "+".join(([kernel] if linears else []) + quantized)
    model._specdec_kernel = kernel
    own_memory(model)
    return kernel


def _quantized_rows_invariant(model, rows: int) -> bool | None:
    """Quantized layers (``specdec.quantize``: int8 and int4 weight-only, w8a8) keep their kernel where it is
    row-invariant (checked per weight shape, as the packed product is), else they run on ``rows``-row
    blocks too. None when the model has none."""
    from specdec.quantize import Int4Linear, Int8Linear, W8A8Linear

    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear, W8A8Linear))
              and not hasattr(m, "_specdec_kernel")]
    if not layers:
        return None
    checked: dict[tuple, bool] = {}
    for module in layers:
        shape = (type(module), module.out_features, module.in_features)
        if shape not in checked:
            counts = CHECKED_ROWS if shape[1] * shape[2] < 64 << 20 else CHECKED_ROWS[:32]
            dtype = (module.scales.dtype if isinstance(module, Int8Linear) else torch.bfloat16 if isinstance(module, Int4Linear)
                     else torch.float32)
            checked[shape] = rows_invariant(module.forward, module.in_features, dtype, counts)
    invariant = all(checked.values())
    for module in layers:
        name = "int8" if isinstance(module, Int8Linear) else "int4" if isinstance(module, Int4Linear) else "w8a8"
        module._specdec_kernel = name if invariant else f"{name}-fixed-rows"
        if not invariant:
            module.forward = functools.partial(_blocked, module.forward, rows, pad=True)
    return invariant


class Segments:
    """What one flattened pass carries per session (its row count and its attention mask, None =
    causal over its own cache), handed to the attention function in place of a mask."""

    def __init__(self, lengths: list[int], masks: list[torch.Tensor | None]) -> None:
        self.lengths, self.masks = lengths, masks


class SegmentedKeys(list):
    """Each session's whole key (or value) sequence for one layer, as :class:`BatchCache` returns it."""


class BatchCache:
    """The ``cache`` a flattened pass over several sessions runs with: each layer's new keys and values
    are split by session and appended to that session's own DynamicCache, and the attention function
    gets each session's whole sequence (:class:`SegmentedKeys`), never a concatenation of them."""

    def __init__(self, caches: list, lengths: list[int]) -> None:
        self.caches, self.lengths = caches, lengths

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = SegmentedKeys(), SegmentedKeys()
        for cache, k, v in zip(self.caches, key_states.split(self.lengths, 2), value_states.split(self.lengths, 2)):
            k, v = cache.update(k, v, layer_idx)
            keys.append(k)
            values.append(v)
        return keys, values


def segmented(attention):
    """An attention function that runs ``attention`` once per session of a flattened pass (its own
    queries, keys, values and mask: exactly the call the session alone would make) and plain
    ``attention`` otherwise."""

    @functools.wraps(attention)
    def run(module, query, key, value, attention_mask, *args, **kwargs):
        if not isinstance(key, SegmentedKeys):
            return attention(module, query, key, value, attention_mask, *args, **kwargs)
        outputs = [
            attention(module, q, k, v, mask, *args, **kwargs)[0]
            for q, k, v, mask in zip(query.split(attention_mask.lengths, 2), key, value, attention_mask.masks)
        ]
        return torch.cat(outputs, 1), None

    return run


def segmented_attention(model) -> None:
    """Let ``model``'s attention take flattened passes over several sessions
    (:func:`specdec.engine.forward_batch`): its attention function, wrapped by :func:`segmented`."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    impl = model.config._attn_implementation or "sdpa"
    if impl.startswith("specdec_"):
        return
    # Eager attention is each model's own function; any model's sdpa path serves every session alike.
    attention = AttentionInterface._global_mapping.get(impl, sdpa_attention_forward)
    name = f"specdec_segmented_{impl}"
    AttentionInterface.register(name, segmented(attention))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl, sdpa_mask))
    model.config._attn_implementation = name


def rowwise_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention one query row at a time: row ``r`` of batch item ``b`` attends to the keys its
    mask row allows (``attention_mask`` ``[batch, 1, q, kv]`` bool; None = causal), gathered into
    a contiguous sequence, with no mask. A one-token step whose cache holds exactly those keys makes
    the same call on the same data, so the row's output cannot depend on the other rows, the tree
    around it, or masked-out cache entries."""
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    out = []
    for b in range(batch):
        rows = []
        for r in range(q_len):
            if attention_mask is None:
                k, v = key[b : b + 1, :, : kv_len - q_len + r + 1], value[b : b + 1, :, : kv_len - q_len + r + 1]
            else:
                visible = attention_mask[b if attention_mask.shape[0] > 1 else 0, 0, r].nonzero().squeeze(-1)
                k, v = key[b : b + 1].index_select(2, visible), value[b : b + 1].index_select(2, visible)
            rows.append(torch.nn.functional.scaled_dot_product_attention(
                query[b : b + 1, :, r : r + 1].contiguous(), k.contiguous(), v.contiguous(), scale=scaling, enable_gqa=True))
        out.append(torch.cat(rows, 2))
    return torch.cat(out, 0).transpose(1, 2).contiguous(), None
