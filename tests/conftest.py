"""Shared fixtures: tiny models on disk for the services, and a running local cluster over them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Every service the tests start runs in float32 as loaded, the numerics the reference models decode
# in: with --dtype auto and --target-quantize auto (the defaults) a verify service keeps whichever
# exact engine is faster here (int4 too, for a model converted from a GGUF), which for a tiny model
# is a coin toss. The choice itself is tested in tests/unit/test_precision.py and test_int4.py.
os.environ.setdefault("SPECDEC_DTYPE", "float32")
os.environ.setdefault("SPECDEC_TARGET_QUANTIZE", "none")

from tiny_models import EOS, save_tiny, tiny_qwen2, truncated_copy  # noqa: E402


@pytest.fixture(scope="session")
def tiny_target():
    return tiny_qwen2(seed=0, layers=3, eos_token_id=EOS)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_target):
    """Saved tiny target, a layer-truncated draft, and a draft with different weights."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "target": save_tiny(root / "target", tiny_target),
        "draft": save_tiny(root / "draft", truncated_copy(tiny_target, 1)),
        "other": save_tiny(root / "other", tiny_qwen2(seed=7, layers=1, eos_token_id=EOS)),
    }


# Printable ASCII only: every other character is the tiny tokenizer's unknown token.
TINY_CHAT_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_cluster(tiny_dirs, tmp_path_factory):
    """verify + two drafts + orchestrator as real processes over the tiny models."""
    from specdec.tools.cluster import LocalCluster, free_port
    from specdec import config

    # The tiny tokenizer has no chat template: the HTTP API's chat route reads this one (--chat-template).
    chat_template = tmp_path_factory.mktemp("chat") / "template.jinja"
    chat_template.write_text(TINY_CHAT_TEMPLATE)
    settings = config.from_env(
        config.ClusterSettings,
        target_model=str(tiny_dirs["target"]),
        draft_models=[str(tiny_dirs["draft"]), str(tiny_dirs["other"])],
        port=0,
        http_port=free_port(),  # the OpenAI-compatible HTTP API (tests/integration/test_http_api.py)
        chat_template=str(chat_template),
        log_dir=str(tmp_path_factory.mktemp("logs")),
        log_text=True,  # the run-log and dashboard tests read the tokens and text (off by default: test_private_logs)
        startup_timeout_s=120,
        # A tiny draft's forward costs about what the tiny target's does, so cost-aware speculation
        # would rightly turn drafting off; these tests check the settings as asked.
        adaptive=False,
        # The model drafts' proposals as asked, and nothing else (the prompt lookup, on by default,
        # is tested on a cluster of its own: test_prompt_lookup_cluster.py).
        prompt_lookup=False,
        draft_quantize="none",  # acceptance figures here are the float drafts' (int8 drafts: test_quantize)
    )
    with LocalCluster(settings) as cluster:
        yield cluster


# --------------------------------------------------------------------------- gRPC test helpers
# Stubs on the session cluster and the target-alone reference, shared by the integration tests.


@pytest.fixture(scope="session")
def reference_model(tiny_dirs):
    """The tiny target loaded back from disk, as the verify service loads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dirs["target"]).eval()


@pytest.fixture(scope="session")
def reference(reference_model):
    """``reference(prompt_ids, max_new_tokens)``: the target alone, greedy (memoised)."""
    from tiny_models import reference_greedy

    cache: dict[tuple, list[int]] = {}

    def run(prompt_ids, max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in cache:
            cache[key] = reference_greedy(reference_model, list(prompt_ids), max_new_tokens)
        return cache[key]

    return run


@pytest.fixture(scope="session")
def grpc_stubs(tiny_cluster):
    """Stubs on every service of the session cluster: generation, verify, drafts (a list)."""
    import grpc

    from specdec.v1 import draft_pb2_grpc, generation_pb2_grpc, verify_pb2_grpc

    channels = []

    def channel(address):
        channels.append(grpc.insecure_channel(address))
        return channels[-1]

    stubs = {
        "generation": generation_pb2_grpc.GenerationServiceStub(channel(tiny_cluster.orchestrator_address)),
        "verify": verify_pb2_grpc.VerifyServiceStub(channel(tiny_cluster.verify_address)),
        "drafts": [draft_pb2_grpc.DraftServiceStub(channel(a)) for a in tiny_cluster.draft_addresses],
    }
    yield stubs
    for c in channels:
        c.close()
