"""The orchestrator's safe defaults, without a cluster: no open door beyond loopback, no internal
detail in an error a caller sees, and a run log that stays under its size."""

from __future__ import annotations

import logging
import os
import time

import grpc
import pytest

from specdec import config
from specdec.orchestrator.generations import prune
from specdec.orchestrator.server import open_door
from specdec.rpc.status import status_of


def settings(**values):
    return config.from_env(config.OrchestratorSettings, environ={}, **values)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"])
def test_loopback_needs_nothing(host):
    assert open_door(settings(host=host)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "orchestrator"])
def test_beyond_loopback_needs_a_token_tls_or_an_explicit_choice(host, tmp_path):
    refusal = open_door(settings(host=host))
    assert refusal and host in refusal and "--auth-token-file" in refusal and "--allow-open" in refusal
    assert open_door(settings(host=host, auth_token="secret")) is None
    assert open_door(settings(host=host, allow_open=True)) is None
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x"), key.write_text("x")
    assert open_door(settings(host=host, tls_cert=str(cert), tls_key=str(key))) is None


class Upstream(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connect to 10.0.0.7:50052 failed: /opt/specdec/verify_service/secret_path.py"


def test_internal_detail_stays_in_the_log(caplog):
    with caplog.at_level(logging.WARNING):
        code, message = status_of(Upstream())
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "10.0.0.7" not in message and "UNAVAILABLE" in message
        incident = message.split("[")[1].split("]")[0]
        assert any(incident in r.getMessage() and "10.0.0.7" in r.getMessage() for r in caplog.records)
        code, message = status_of(KeyError("/etc/secret"))
        assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "[" in message


def test_the_run_log_keeps_under_its_size(tmp_path):
    for i in range(10):
        (tmp_path / f"20261206T0000{i:02d}-x.json").write_bytes(b"x" * 1000)
    (tmp_path / "notes.txt").write_text("kept")
    assert prune(tmp_path, 4500) == 6
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"20261206T0000{i:02d}-x.json" for i in range(6, 10)]
    assert (tmp_path / "notes.txt").exists()
    assert prune(tmp_path, 4500) == 0


def test_a_huge_prompt_is_counted_in_pieces_and_refused_early():
    import threading
    import types

    from specdec.errors import InvalidRequest
    from specdec.orchestrator.generations import PIECE_CHARS, Generations
    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    calls = []

    def counting(text, **kwargs):
        calls.append(len(text))
        return tokenizer(text, **kwargs)

    servicer = types.SimpleNamespace(target_info=types.SimpleNamespace(max_context=512), tokenizer=counting,
                                     _tokenizing=threading.BoundedSemaphore(1))
    short = "def f(x): return x"
    assert Generations.tokenize(servicer, short, "prompt") == tokenizer(short).input_ids
    assert calls == [len(short)]
    calls.clear()
    with pytest.raises(InvalidRequest, match="prompt has more than 512 tokens"):
        Generations.tokenize(servicer, "ab" * 2_000_000, "prompt")
    assert calls == [PIECE_CHARS]  # one piece counted, not four million characters
