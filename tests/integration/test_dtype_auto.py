"""``--dtype auto`` through real services: the verify service measures its exact paths, says in
GetInfo (and the orchestrator's, and /v1/models) which it chose and why, and speculation equals the
services' own one-token decoding in that dtype, token for token."""

from __future__ import annotations

from specdec import config
from specdec.client import Client
from specdec.precision import CANDIDATES
from specdec.tools.cluster import LocalCluster
from tiny_models import EOS, save_tiny_gguf, tiny_qwen2


def test_the_chosen_dtype_is_reported_and_speculation_equals_its_one_token_decoding(tiny_dirs, tmp_path):
    settings = config.from_env(
        config.ClusterSettings, target_model=str(tiny_dirs["target"]), draft_models=[str(tiny_dirs["draft"])],
        port=0, dtype="auto", log_dir=str(tmp_path), startup_timeout_s=120, adaptive=False, draft_quantize="none",
    )
    with LocalCluster(settings) as cluster, Client(cluster.orchestrator_address, timeout_s=120) as client:
        info = client.info()
        assert info.dtype in CANDIDATES
        assert info.precision.startswith(f"{info.dtype}, the fastest exact round measured here")
        assert all(dtype in info.precision for dtype in CANDIDATES)  # every candidate's figures: the why
        assert info.forward_costs  # the chosen path's curve, measured while choosing
        for prompt in ("def hello(x):", "The quick brown fox"):
            alone = client.generate(prompt, max_new_tokens=24, mode="autoregressive", ignore_eos=True)
            for mode in ("sequential", "tree"):
                reply = client.generate(prompt, max_new_tokens=24, mode=mode, ignore_eos=True)
                assert list(reply.token_ids) == list(alone.token_ids), (prompt, mode)


def test_a_target_converted_from_a_gguf_also_measures_the_int4_engine(tmp_path):
    """--target-quantize auto (the default) beside a GGUF: the int4 engine is a candidate like the
    dtypes, GetInfo says what was measured, and whatever is kept, speculation equals its own
    one-token decoding."""
    target = save_tiny_gguf(tmp_path / "target", tiny_qwen2(seed=0, layers=2, hidden=256, sharpness=1.5, eos_token_id=EOS))
    settings = config.from_env(
        config.ClusterSettings, target_model=str(target), draft_models=[str(target)],
        port=0, dtype="auto", target_quantize="auto", log_dir=str(tmp_path), startup_timeout_s=120, adaptive=False,
        draft_quantize="int4",
    )
    with LocalCluster(settings) as cluster, Client(cluster.orchestrator_address, timeout_s=120) as client:
        info = client.info()
        assert info.dtype in (*CANDIDATES, "int4")
        assert all(engine in info.precision for engine in (*CANDIDATES, "int4 (int4"))
        alone = client.generate("def hello(x):", max_new_tokens=24, mode="autoregressive", ignore_eos=True)
        for mode in ("sequential", "tree"):
            reply = client.generate("def hello(x):", max_new_tokens=24, mode=mode, ignore_eos=True)
            assert list(reply.token_ids) == list(alone.token_ids), mode
