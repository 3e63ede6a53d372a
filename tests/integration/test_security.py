"""Security over real gRPC: TLS on every hop, mutual TLS between the orchestrator and the draft and
verify services, a bearer token on the public GenerationService, and no secret in any log or trace.

One local cluster (verify, one draft, orchestrator as separate processes on loopback) runs with
development certificates from ``specdec.tools.certs``; each test is a client that should be let in or
turned away.
"""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specdec import config
from specdec.rpc import security
from specdec.tools.certs import make_dev_certs
from specdec.v1 import common_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc, verify_pb2_grpc
from tiny_models import tiny_tokenizer

RPC_TIMEOUT_S = 60
REFUSED_TIMEOUT_S = 10
WRONG_TOKEN = "not-the-token-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """Certificates from another CA: the same names, signed by a key the cluster does not trust."""
    return make_dev_certs(tmp_path_factory.mktemp("stranger"), common_name="another CA")


def tls(ca=None, cert=None, key=None):
    return types.SimpleNamespace(tls_ca=str(ca or ""), tls_client_cert=str(cert or ""), tls_client_key=str(key or ""))


def orchestrator_client(certs):
    return tls(certs.ca)


def mtls_client(certs):
    return tls(certs.ca, certs.client_cert, certs.client_key)


@pytest.fixture(scope="module")
def secure_cluster(tiny_dirs, certs, tmp_path_factory):
    from specdec.tools.cluster import LocalCluster, free_port

    work = tmp_path_factory.mktemp("secure")
    settings = config.from_env(
        config.ClusterSettings,
        target_model=str(tiny_dirs["target"]),
        draft_models=[str(tiny_dirs["draft"])],
        port=0,
        log_dir=str(work / "logs"),
        trace_file=str(work / "trace.jsonl"),
        startup_timeout_s=120,
        tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_client_ca=str(certs.ca),
        tls_ca=str(certs.ca), tls_client_cert=str(certs.client_cert), tls_client_key=str(certs.client_key),
        auth_token_file=str(certs.token),
        http_port=free_port(),  # the OpenAI-compatible HTTP API: the same TLS and token
    )
    # Spans reach the trace file within 100 ms of ending, so the secrets test can read them.
    with LocalCluster(settings, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as cluster:
        yield cluster


def token(certs) -> str:
    return Path(certs.token).read_text().strip()


def health_status(address: str, client) -> int:
    with security.client_channel(address, client) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=REFUSED_TIMEOUT_S).status


def model_info(address: str, client, stub_class):
    with security.client_channel(address, client) as channel:
        return stub_class(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=REFUSED_TIMEOUT_S)


def internal_services(cluster):
    return [(cluster.verify_address, verify_pb2_grpc.VerifyServiceStub),
            *[(address, draft_pb2_grpc.DraftServiceStub) for address in cluster.draft_addresses]]


def generate(cluster, client, metadata=(), max_new_tokens: int = 12, stream: bool = False):
    request = generation_pb2.GenerateRequest(prompt="def hello(x):", max_new_tokens=max_new_tokens,
                                             mode=generation_pb2.DECODING_MODE_TREE)
    with security.client_channel(cluster.orchestrator_address, client) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        if stream:
            return list(stub.GenerateStream(request, timeout=RPC_TIMEOUT_S, metadata=metadata))
        return stub.Generate(request, timeout=RPC_TIMEOUT_S, metadata=metadata)


# --------------------------------------------------------------------------- certificates


def test_dev_certificates_name_every_service_and_keep_keys_private(certs):
    from cryptography import x509

    server = x509.load_pem_x509_certificate(Path(certs.server_cert).read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName)) | {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "127.0.0.1", "verify", "draft-0", "draft-1", "orchestrator"} <= names
    for path in (certs.ca_key, certs.server_key, certs.client_key, certs.token):
        assert Path(path).stat().st_mode & 0o077 == 0, f"{path} is readable by others"


# --------------------------------------------------------------------------- TLS on every hop


def test_plaintext_client_is_refused_by_every_service(secure_cluster):
    for address in [secure_cluster.orchestrator_address, *[a for a, _ in internal_services(secure_cluster)]]:
        with pytest.raises(grpc.RpcError) as refused:
            health_status(address, None)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, address


def test_internal_services_refuse_a_client_without_certificate(secure_cluster, certs):
    for address, stub in internal_services(secure_cluster):
        with pytest.raises(grpc.RpcError) as refused:
            model_info(address, tls(certs.ca), stub)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, address
        with pytest.raises(grpc.RpcError):
            health_status(address, tls(certs.ca))  # not even health checks: the handshake fails


def test_internal_services_refuse_a_certificate_from_another_ca(secure_cluster, certs, stranger):
    for address, stub in internal_services(secure_cluster):
        with pytest.raises(grpc.RpcError) as refused:
            model_info(address, tls(certs.ca, stranger.client_cert, stranger.client_key), stub)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, address


def test_clients_refuse_a_server_they_do_not_trust(secure_cluster, stranger):
    """A client that trusts another CA does not talk to these servers (no man in the middle)."""
    with pytest.raises(grpc.RpcError) as refused:
        health_status(secure_cluster.orchestrator_address, tls(stranger.ca))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    address, stub = internal_services(secure_cluster)[0]
    with pytest.raises(grpc.RpcError):
        model_info(address, tls(stranger.ca, stranger.client_cert, stranger.client_key), stub)


def test_internal_services_accept_the_client_certificate(secure_cluster, certs):
    for address, stub in internal_services(secure_cluster):
        assert health_status(address, mtls_client(certs)) == health_pb2.HealthCheckResponse.SERVING
        assert model_info(address, mtls_client(certs), stub).vocab_size > 0


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_generation_over_tls_is_correct(secure_cluster, certs, reference, stream):
    """Client → orchestrator over TLS with the token; orchestrator → drafts and verifier over mutual TLS."""
    prompt_ids = tiny_tokenizer().encode("def hello(x):")
    metadata = security.token_metadata(token(certs))
    if stream:
        tokens = [t for chunk in generate(secure_cluster, orchestrator_client(certs), metadata, stream=True) for t in chunk.token_ids]
    else:
        tokens = list(generate(secure_cluster, orchestrator_client(certs), metadata).token_ids)
    assert tokens == reference(prompt_ids, 12)


# --------------------------------------------------------------------------- bearer token


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("metadata, code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Basic dXNlcjpwYXNz"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", f"Bearer {WRONG_TOKEN}"),), grpc.StatusCode.PERMISSION_DENIED),
], ids=["missing", "not-bearer", "empty", "wrong"])
def test_generation_service_refuses_without_the_right_token(secure_cluster, certs, metadata, code, stream):
    with pytest.raises(grpc.RpcError) as refused:
        generate(secure_cluster, orchestrator_client(certs), metadata, stream=stream)
    assert refused.value.code() == code
    assert WRONG_TOKEN not in (refused.value.details() or "")


def test_get_info_needs_the_token_too(secure_cluster, certs):
    with security.client_channel(secure_cluster.orchestrator_address, orchestrator_client(certs)) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetInfo(common_pb2.GetInfoRequest(), timeout=REFUSED_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=REFUSED_TIMEOUT_S,
                            metadata=security.token_metadata(token(certs)))
        assert info.vocab_size > 0


def test_health_and_reflection_stay_open_without_a_token(secure_cluster, certs):
    address = secure_cluster.orchestrator_address
    assert health_status(address, orchestrator_client(certs)) == health_pb2.HealthCheckResponse.SERVING
    with security.client_channel(address, orchestrator_client(certs)) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=REFUSED_TIMEOUT_S)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "specdec.v1.GenerationService" in names and "grpc.health.v1.Health" in names


def test_generate_command_speaks_tls_and_sends_the_token(secure_cluster, certs, reference, capsys):
    from specdec.tools.cli import main

    argv = ["generate", "--orchestrator", secure_cluster.orchestrator_address, "--prompt", "def hello(x):",
            "--max-tokens", "12", "--json", "--tls-ca", str(certs.ca), "--auth-token-file", str(certs.token)]
    assert main(argv) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["token_ids"] == reference(tiny_tokenizer().encode("def hello(x):"), 12)
    assert main([*argv[:-2]]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_client_package_speaks_tls_and_sends_the_token(secure_cluster, certs, reference):
    import asyncio

    from specdec.client import AsyncClient, Client

    address, want = secure_cluster.orchestrator_address, reference(tiny_tokenizer().encode("def hello(x):"), 12)
    with Client(address, tls=str(certs.ca), token_file=str(certs.token), timeout_s=RPC_TIMEOUT_S) as client:
        assert list(client.generate("def hello(x):", max_new_tokens=12, mode="tree").token_ids) == want
        assert [t for chunk in client.stream("def hello(x):", max_new_tokens=12) for t in chunk.token_ids] == want
    with Client(address, tls=str(certs.ca), token=WRONG_TOKEN, timeout_s=REFUSED_TIMEOUT_S) as wrong:
        with pytest.raises(grpc.RpcError) as refused:
            wrong.info()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with Client(address, tls=str(certs.ca), timeout_s=REFUSED_TIMEOUT_S) as anonymous:
        with pytest.raises(grpc.RpcError) as refused:
            anonymous.generate("def hello(x):", max_new_tokens=4)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def calls():
        async with AsyncClient(address, tls=str(certs.ca), token=token(certs), timeout_s=RPC_TIMEOUT_S) as client:
            reply = await client.generate("def hello(x):", max_new_tokens=12)
            return list(reply.token_ids), [t async for c in client.stream("def hello(x):", max_new_tokens=12) for t in c.token_ids]

    assert asyncio.run(calls()) == (want, want)
    with Client(address, timeout_s=REFUSED_TIMEOUT_S) as plaintext:  # the port speaks TLS only
        with pytest.raises(grpc.RpcError) as refused:
            plaintext.info()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------- the HTTP API


def http_call(cluster, certs, path: str, body=None, bearer: str | None = None, tls: bool = True):
    """(status, JSON body) of one call to the HTTP API; ``tls=False`` speaks plaintext to it."""
    import ssl
    import urllib.error
    import urllib.request

    url = cluster.http_url if tls else cluster.http_url.replace("https://", "http://")
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {bearer}"} if bearer is not None else {})
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None, headers=headers)
    context = ssl.create_default_context(cafile=str(certs.ca)) if tls else None
    try:
        with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S, context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_api_speaks_tls_and_wants_the_token(secure_cluster, certs, reference):
    import ssl

    import openai

    assert secure_cluster.http_url.startswith("https://")
    body = {"prompt": "def hello(x):", "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    for bearer, words in [(None, "missing"), (WRONG_TOKEN, "not valid"), ("", "Bearer <token>")]:
        status, reply = http_call(secure_cluster, certs, "/v1/completions", body, bearer)
        assert status == 401 and reply["error"]["type"] == "authentication_error" and words in reply["error"]["message"]
    assert http_call(secure_cluster, certs, "/v1/models", bearer=WRONG_TOKEN)[0] == 401
    assert http_call(secure_cluster, certs, "/health") == (200, {"status": "SERVING"})  # open, as gRPC health is
    with pytest.raises(OSError):  # the port speaks TLS only
        http_call(secure_cluster, certs, "/health", tls=False)

    want = reference(tiny_tokenizer().encode("def hello(x):"), 12)
    client = openai.OpenAI(base_url=secure_cluster.http_url + "/v1", api_key=token(certs), max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(certs.ca))))
    with client:
        model = client.models.list().data[0].id
        completion = client.completions.create(model=model, prompt="def hello(x):", max_tokens=12, temperature=0,
                                               extra_body={"return_token_ids": True})
        assert completion.choices[0].token_ids == want
        streamed = client.completions.create(model=model, prompt="def hello(x):", max_tokens=12, temperature=0, stream=True,
                                             extra_body={"return_token_ids": True})
        assert [t for chunk in streamed for t in chunk.choices[0].token_ids] == want


# --------------------------------------------------------------------------- secrets


def test_secrets_appear_in_no_log_and_no_trace(secure_cluster, certs):
    """After good and refused calls, neither the token (right or wrong) nor a private key is in any
    service's log or in the trace file, and no span records the call metadata."""
    good = security.token_metadata(token(certs))
    generate(secure_cluster, orchestrator_client(certs), good)
    for metadata in [(), (("authorization", f"Bearer {WRONG_TOKEN}"),)]:
        with pytest.raises(grpc.RpcError):
            generate(secure_cluster, orchestrator_client(certs), metadata)
    for bearer in (token(certs), WRONG_TOKEN):  # the HTTP API's calls too
        http_call(secure_cluster, certs, "/v1/completions", {"prompt": "def hello(x):", "max_tokens": 4}, bearer)
    trace_file = Path(secure_cluster.settings.trace_file)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the generation's spans, exported within OTEL_BSP_SCHEDULE_DELAY
        if trace_file.exists() and "text_completion" in trace_file.read_text():
            break
        time.sleep(0.2)
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert any(s["name"].startswith("text_completion") for s in spans)
    assert {s["service"] for s in spans} >= {"specdec-orchestrator", "specdec-verify"}
    for span in spans:
        assert not any(k.lower().startswith(("authorization", "rpc.grpc.request.metadata")) for k in span["attributes"]), span

    secrets = [token(certs), WRONG_TOKEN]
    for key in (certs.server_key, certs.client_key, certs.ca_key):
        # Every base64 line of each private key: a leak of any part of it is a leak.
        secrets += [line for line in Path(key).read_text().splitlines() if line and not line.startswith("-----")]
    texts = {"trace file": trace_file.read_text()}
    texts.update({f"{p.name} log": p.log_path.read_text() for p in secure_cluster.processes})
    assert any("TLS" in text for text in texts.values()), "the services say what their ports demand"
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into the {where}"


def test_help_never_shows_a_token_from_the_environment(monkeypatch):
    import argparse

    monkeypatch.setenv("SPECDEC_AUTH_TOKEN", "s3cret-from-env")
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.OrchestratorSettings)
    assert "s3cret-from-env" not in parser.format_help()
    assert parser.parse_args([]).auth_token == "s3cret-from-env"


# --------------------------------------------------------------------------- settings that cannot work


def test_half_a_tls_setting_is_refused_clearly(certs, tmp_path):
    server = types.SimpleNamespace(tls_cert=str(certs.server_cert), tls_key="", tls_client_ca="")
    with pytest.raises(security.SecurityConfigError, match="--tls-key"):
        security.server_credentials(server)
    with pytest.raises(security.SecurityConfigError, match="--tls-client-key"):
        security.channel_credentials(tls(certs.ca, certs.client_cert))
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(security.SecurityConfigError, match="empty"):
        security.load_token(types.SimpleNamespace(auth_token_file=str(empty), auth_token=""))
    missing = types.SimpleNamespace(tls_cert=str(tmp_path / "nope.pem"), tls_key=str(certs.server_key), tls_client_ca="")
    with pytest.raises(security.SecurityConfigError, match="nope.pem"):
        security.server_credentials(missing)
    assert security.server_credentials(types.SimpleNamespace(tls_cert="", tls_key="", tls_client_ca="")) is None
    assert security.channel_credentials(tls()) is None
