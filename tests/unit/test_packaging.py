"""What each install brings: `pip install specdec` is the client (grpcio, protobuf, the stubs,
``specdec.client``), the services come with the ``server`` extra, the dashboard and plots with
``tools``; `make setup` installs all of it, the container image only the client and ``server``.

The client-only install is simulated in a subprocess: every module of the extras is made
unimportable (a ``sys.meta_path`` finder refuses them) and their distributions absent from
``importlib.metadata``, which is what the ``specdec`` command checks before it runs a command.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]

# What a client must never pull in.
HEAVY = {"torch", "transformers", "accelerate", "streamlit", "pandas", "altair", "matplotlib", "numpy", "scipy"}
# Modules of the server and tools extras (and what they bring) that the client runs without.
BLOCKED_MODULES = (
    "torch", "transformers", "accelerate", "gguf", "safetensors", "tokenizers", "huggingface_hub", "numpy", "tqdm",
    "grpc_reflection", "opentelemetry", "prometheus_client", "starlette", "uvicorn", "pydantic", "cryptography", "yaml",
    "streamlit", "pandas", "altair", "matplotlib", "scipy",
)


def name_of(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def names(requirements: list[str]) -> set[str]:
    return {name_of(r) for r in requirements}


def test_the_base_install_is_the_client():
    base = names(PROJECT["dependencies"])
    assert not base & HEAVY, f"pip install specdec would pull {sorted(base & HEAVY)}"
    assert not {n for n in base if n.startswith(("opentelemetry", "prometheus", "streamlit"))}
    assert {"grpcio", "protobuf"} <= base


def test_the_extras_hold_what_the_services_and_the_tools_need():
    server, tools = names(EXTRAS["server"]), names(EXTRAS["tools"])
    assert {"torch", "transformers", "accelerate", "gguf", "safetensors", "numpy", "grpcio-reflection",
            "opentelemetry-sdk", "opentelemetry-instrumentation-grpc", "prometheus-client", "starlette", "uvicorn",
            "pydantic", "cryptography", "pyyaml", "tqdm"} <= server
    assert {"streamlit", "pandas", "altair", "matplotlib"} <= tools
    assert not server & {"streamlit", "pandas", "altair", "matplotlib"}, "the dashboard's dependencies stay out of the services"
    assert EXTRAS["all"] == ["specdec[server,tools]"]


def test_development_installs_everything_and_the_image_only_the_server():
    setup = re.search(r"^\$\(VENV\)/\.installed:.*?^\ttouch \$@$", (ROOT / "Makefile").read_text(), re.MULTILINE | re.DOTALL)
    assert setup, "the Makefile's install target"
    lines = setup.group(0).splitlines()
    torch_line = next(i for i, line in enumerate(lines) if "$(TORCH_SPEC)" in line)
    project_line = next(i for i, line in enumerate(lines) if "pip install" in line and "-e " in line)
    assert torch_line < project_line, "torch first"
    extras = set(re.search(r"-e '\.\[([^\]]*)\]'", lines[project_line]).group(1).split(","))
    assert "test" in extras and ("all" in extras or {"server", "tools"} <= extras)

    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    (requirements,) = [line for line in dockerfile.splitlines() if "requirements.txt" in line and "tomllib" in line]
    assert "['dependencies']" in requirements and "['optional-dependencies']['server']" in requirements
    assert "'tools'" not in requirements and "'all'" not in requirements and "'test'" not in requirements


# Runs in a fresh interpreter: blocks the extras' modules and hides their distributions, then
# imports the client and runs `specdec` command lines, printing what happened as JSON.
CLIENT_ONLY = r"""
import contextlib, importlib.abc, importlib.metadata, io, json, re, sys

blocked, absent, argvs = json.loads(sys.argv[1])

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (client-only install)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
real_distribution = importlib.metadata.distribution

def distribution(name):
    if re.sub(r"[-_.]+", "-", name).lower() in absent:
        raise importlib.metadata.PackageNotFoundError(name)
    return real_distribution(name)

importlib.metadata.distribution = distribution

import specdec, specdec.client
from specdec.v1 import generation_pb2, generation_pb2_grpc
assert specdec.client.SERVICE_CONFIG.is_file()
from specdec.tools import cli

runs = []
for argv in argvs:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    runs.append({"argv": argv, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
heavy = sorted({m.partition(".")[0] for m in sys.modules} & set(blocked))
print(json.dumps({"runs": runs, "heavy": heavy}))
"""

SERVER_LINE = "needs the server extra: pip install 'specdec[server]'"
COMMANDS = [
    (["serve", "verify"], 2, f"specdec serve {SERVER_LINE}"),
    (["serve", "orchestrator", "--", "--port", "0"], 2, f"specdec serve {SERVER_LINE}"),
    (["models", "fetch"], 2, f"specdec models fetch {SERVER_LINE}"),
    (["cluster", "up"], 2, f"specdec cluster up {SERVER_LINE}"),
    (["generate", "--prompt", "x", "--local"], 2, f"specdec generate --local {SERVER_LINE}"),
    (["bench"], 2, "specdec bench needs the server and tools extras: pip install 'specdec[server,tools]'"),
    (["bench", "--help"], 2, "specdec bench needs the server and tools extras: pip install 'specdec[server,tools]'"),
    (["dashboard", "."], 2, "specdec dashboard needs the tools extra: pip install 'specdec[tools]'"),
    # Client-side commands run: an address nobody answers on is a gRPC error, not a missing module.
    (["health", "--address", "127.0.0.1:9", "--timeout-s", "2"], 1, "127.0.0.1:9: UNAVAILABLE"),
    (["generate", "--prompt", "x", "--orchestrator", "127.0.0.1:9", "--max-tokens", "1"], 1, "specdec: UNAVAILABLE"),
]


@pytest.fixture(scope="module")
def client_only() -> dict:
    absent = sorted(names(EXTRAS["server"]) | names(EXTRAS["tools"]))
    argvs = [["--help"], *[argv for argv, _, _ in COMMANDS]]
    done = subprocess.run([sys.executable, "-c", CLIENT_ONLY, json.dumps([BLOCKED_MODULES, absent, argvs])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_client_imports_without_the_extras(client_only):
    assert client_only["heavy"] == [], "the client and the CLI's client side loaded modules of the extras"


def test_the_command_lists_every_subcommand_without_the_extras(client_only):
    help_run = client_only["runs"][0]
    assert help_run["rc"] == 0, help_run["stderr"]
    for command in ("generate", "serve", "models", "health", "bench", "analyze", "traces", "dashboard", "loadtest"):
        assert re.search(rf"^\s+{command}\s", help_run["stdout"], re.MULTILINE), command
    assert re.search(r"^\s+bench\s+\(needs pip install 'specdec\[server,tools\]'\)", help_run["stdout"], re.MULTILINE)


@pytest.mark.parametrize("argv, rc, line", COMMANDS, ids=[" ".join(argv) for argv, _, _ in COMMANDS])
def test_server_commands_say_which_extra_they_need(client_only, argv, rc, line):
    (run,) = [r for r in client_only["runs"][1:] if r["argv"] == argv]
    assert run["rc"] == rc, run
    assert "Traceback" not in run["stderr"], run["stderr"]
    lines = run["stderr"].strip().splitlines()
    assert lines and lines[-1].startswith(line), run["stderr"]
    if rc == 2:
        assert len(lines) == 1, "one line"
