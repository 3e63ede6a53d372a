"""Settings that refuse nonsense: a value a setting does not accept (from a ``SPECDEC_*`` variable, a
flag or the code), an unknown variable close to a known one, a speculation default beyond the
limits the orchestrator holds every request to, or a model path that does not exist stops start-up
with one line naming the setting and what it accepts (exit status 2 from every entry point)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import get_type_hints

import pytest

from specdec import config, model_store
from specdec.config import SettingError

SETTINGS_CLASSES = [v for v in vars(config).values() if isinstance(v, type) and dataclasses.is_dataclass(v)]


def refused(cls, **environ) -> str:
    with pytest.raises(SettingError) as caught:
        config.from_env(cls, environ=environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- values from the environment


@pytest.mark.parametrize("word,value", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("On", True), (" on ", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("OFF", False),
])
def test_boolean_spellings(word, value):
    assert config.from_env(config.OrchestratorSettings, environ={"SPECDEC_ADAPTIVE": word}).adaptive is value


@pytest.mark.parametrize("word", ["maybe", "ture", "", "2", "y"])
def test_other_boolean_words_are_refused(word):
    message = refused(config.OrchestratorSettings, SPECDEC_ADAPTIVE=word)
    assert message.startswith("SPECDEC_ADAPTIVE=")
    assert "true/false, 1/0, yes/no or on/off" in message


@pytest.mark.parametrize("cls,variable,value,accepts", [
    (config.OrchestratorSettings, "SPECDEC_DRAFT_LENGTH", "-3", "an integer of at least 1"),
    (config.ClusterSettings, "SPECDEC_DRAFT_LENGTH", "0", "an integer of at least 1"),
    (config.OrchestratorSettings, "SPECDEC_DRAFT_LENGTH", "abc", "an integer of at least 1"),
    (config.OrchestratorSettings, "SPECDEC_BEAM_WIDTH", "1.5", "an integer of at least 1"),
    (config.VerifySettings, "SPECDEC_MAX_SESSIONS", "-1", "an integer of at least 1"),
    (config.DraftSettings, "SPECDEC_KV_CACHE_MB", "0", "an integer of at least 1"),
    (config.VerifySettings, "SPECDEC_SESSION_TTL_S", "-5", "an integer of at least 0"),
    (config.VerifySettings, "SPECDEC_BATCH_WAIT_MS", "nan", "a number of at least 0"),
    (config.VerifySettings, "SPECDEC_PORT", "70000", "an integer from 0 to 65535"),
    (config.VerifySettings, "SPECDEC_DTYPE", "float8", "one of float32, bfloat16, float16, auto"),
    (config.OrchestratorSettings, "SPECDEC_MODE", "bogus", "one of autoregressive, sequential, tree"),
    (config.ClusterSettings, "SPECDEC_DRAFT_QUANTIZE", "int2", "one of auto, none, int8, int4, w8a8"),
    (config.VerifySettings, "SPECDEC_TARGET_QUANTIZE", "int2", "one of auto, none, int8, int4, w8a8"),
])
def test_out_of_range_values_are_refused(cls, variable, value, accepts):
    message = refused(cls, **{variable: value})
    name = variable.removeprefix("SPECDEC_").lower()
    assert message == f"{variable}={value}: {name} takes {accepts}"


def test_a_variable_close_to_a_setting_is_a_typo():
    message = refused(config.OrchestratorSettings, SPECDEC_DRAFT_LENGHT="3")
    assert message == "SPECDEC_DRAFT_LENGHT is not a specdec setting; did you mean SPECDEC_DRAFT_LENGTH?"
    assert "did you mean SPECDEC_MAX_NEW_TOKENS?" in refused(config.ClusterSettings, SPECDEC_MAX_TOKENS="5")
    assert "did you mean SPECDEC_ADAPTIVE?" in refused(config.VerifySettings, SPECDEC_adaptive="true")


def test_other_variables_are_left_alone():
    # Another process's settings, the variables specdec reads elsewhere, and names close to none.
    environ = {"SPECDEC_DRAFT_MODEL": "x", "SPECDEC_ORCHESTRATOR": "h:1", "SPECDEC_MODEL_DIR": "/m",
               "SPECDEC_CERTS_DIR": "c", "SPECDEC_PROTO_DIR": "p", "SPECDEC_JSON": "1", "SPECDEC_FUZZ_EXAMPLES": "5",
               "SPECDEC_SOMETHING_ELSE_ENTIRELY": "1"}
    config.check_environment(environ)
    assert config.from_env(config.OrchestratorSettings, environ=environ).draft_length == 2


# --------------------------------------------------------------------------- values from the command line


def parse(cls, *argv: str):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, cls, environ={})
    return config.from_args(cls, parser.parse_args(list(argv)))


@pytest.mark.parametrize("argv,message", [
    (["--draft-length", "-3"], "--draft-length -3: draft_length takes an integer of at least 1"),
    (["--adaptive", "maybe"], "--adaptive maybe: adaptive is true or false: write true/false, 1/0, yes/no or on/off (any case)"),
    (["--mode", "bogus"], "--mode bogus: mode takes one of autoregressive, sequential, tree"),
    (["--max-queued-generations", "-1"], "--max-queued-generations -1: max_queued_generations takes an integer of at least 0"),
])
def test_flags_are_checked_as_variables_are(argv, message):
    with pytest.raises(SettingError) as caught:
        parse(config.OrchestratorSettings, *argv)
    assert str(caught.value) == message


def test_flags_within_range_pass():
    s = parse(config.OrchestratorSettings, "--draft-length", "16", "--adaptive", "no", "--mode", "sequential")
    assert (s.draft_length, s.adaptive, s.mode) == (16, False, "sequential")


# --------------------------------------------------------------------------- settings as a whole


@pytest.mark.parametrize("cls", [config.OrchestratorSettings, config.ClusterSettings])
@pytest.mark.parametrize("name,limit", [
    ("draft_length", "max_beam_depth"), ("beam_width", "max_beam_width"), ("beam_depth", "max_beam_depth"),
    ("max_tree_nodes", "max_tree_nodes_limit"), ("max_new_tokens", "max_new_tokens_limit"),
])
def test_speculation_defaults_are_held_to_the_request_limits(cls, name, limit):
    """What the orchestrator checks every request against (controller.check) is checked at start-up."""
    highest = getattr(cls(), limit)
    with pytest.raises(SettingError) as caught:
        config.from_env(cls, environ={config.env_name(name): str(highest + 1)})
    assert str(caught.value) == (
        f"{name} (--{name.replace('_', '-')} / {config.env_name(name)}) = {highest + 1} is more than "
        f"{limit} (--{limit.replace('_', '-')} / {config.env_name(limit)}) = {highest}: lower {name} or raise {limit}")
    raised = config.from_env(cls, environ={config.env_name(name): str(highest + 1), config.env_name(limit): str(highest + 1)})
    assert getattr(raised, name) == highest + 1


def test_overrides_in_code_are_checked_too():
    with pytest.raises(SettingError, match=r"max_sessions \(--max-sessions / SPECDEC_MAX_SESSIONS\) = 0"):
        config.from_env(config.VerifySettings, environ={}, max_sessions=0)
    with pytest.raises(SettingError, match="lookup_min_ngram"):
        config.from_env(config.OrchestratorSettings, environ={}, lookup_min_ngram=5, lookup_max_ngram=4)


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda c: c.__name__)
def test_the_defaults_are_accepted(cls):
    config.validate(cls())


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda c: c.__name__)
def test_every_number_says_its_range(cls):
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] in (int, float):
            assert "min" in f.metadata, f"{cls.__name__}.{f.name}: give _setting a min (and a max where there is one)"


# --------------------------------------------------------------------------- model paths


def test_a_model_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(SettingError) as caught:
        config.from_env(config.VerifySettings, environ={}, target_model=str(missing))
    assert str(caught.value).startswith(
        f"target_model (--target-model / SPECDEC_TARGET_MODEL): model path {missing} does not exist (and is not a model name")
    with pytest.raises(SettingError, match="draft_models .* model path ./nowhere/x does not exist"):
        config.from_env(config.ClusterSettings, environ={}, draft_models=["qwen2.5-coder-0.5b-instruct", "./nowhere/x"])
    # Aliases, existing paths and hub ids pass (whether the hub knows an id shows when it is loaded).
    for name in ("qwen2.5-coder-0.5b-instruct", str(tmp_path), "Qwen/Qwen2.5-0.5B", "gpt2"):
        model_store.check_model_name(name)


def test_a_model_the_hub_cannot_give_is_one_line(monkeypatch):
    import transformers

    def unavailable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unavailable)
    with pytest.raises(model_store.ModelNotFoundError) as caught:
        model_store.load_model("someone/no-such-model")
    assert str(caught.value) == "model someone/no-such-model could not be loaded: We couldn't connect to 'https://huggingface.co' to load the files."


def test_the_launcher_shows_a_child_s_one_line_refusal(tmp_path):
    from specdec.tools.cluster import LocalCluster, Process, free_port

    log = tmp_path / "verify.log"
    line = "specdec verify: cannot start: model someone/x could not be loaded: not found"
    with open(log, "w") as out:
        popen = subprocess.Popen([sys.executable, "-c", f"print('loading ...'); print({line!r}); raise SystemExit(2)"],
                                 stdout=out, stderr=subprocess.STDOUT)
    popen.wait(30)
    cluster = LocalCluster(config.from_env(config.ClusterSettings, environ={}, startup_timeout_s=30))
    with pytest.raises(RuntimeError) as caught:
        cluster._wait(Process("verify", f"127.0.0.1:{free_port()}", popen, log))
    assert str(caught.value) == f"verify did not start (exit status 2): {line}"


# --------------------------------------------------------------------------- the entry points: one line, status 2


def specdec_command() -> list[str]:
    script = Path(sys.executable).parent / "specdec"
    return [str(script)] if script.exists() else [sys.executable, "-m", "specdec.tools.cli"]


def run(command: list[str], **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECDEC_")} | variables
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("variable,value,named", [
    ("SPECDEC_DRAFT_LENGTH", "-3", "SPECDEC_DRAFT_LENGTH=-3: draft_length takes an integer of at least 1"),
    ("SPECDEC_DRAFT_LENGTH", "abc", "SPECDEC_DRAFT_LENGTH=abc: draft_length takes an integer of at least 1"),
    ("SPECDEC_ADAPTIVE", "maybe", "true/false, 1/0, yes/no or on/off"),
    ("SPECDEC_ADAPTIVE", "ture", "SPECDEC_ADAPTIVE=ture"),
    ("SPECDEC_MODE", "bogus", "SPECDEC_MODE=bogus: mode takes one of"),
    ("SPECDEC_DRAFT_LENGHT", "3", "did you mean SPECDEC_DRAFT_LENGTH?"),
])
def test_cli_help_refuses_a_bad_variable_in_one_line(variable, value, named):
    line = one_line(run([*specdec_command(), "cluster", "up", "--help"], **{variable: value}))
    assert line.startswith("specdec: ") and named in line and "Traceback" not in line


@pytest.mark.parametrize("variables,named", [
    ({"SPECDEC_MAX_SESSIONS": "-1"}, "SPECDEC_MAX_SESSIONS=-1: max_sessions takes an integer of at least 1"),
    ({"SPECDEC_KV_CACHE_MB": "0"}, "SPECDEC_KV_CACHE_MB=0: kv_cache_mb takes an integer of at least 1"),
    ({"SPECDEC_SESSION_TTL_S": "-5"}, "SPECDEC_SESSION_TTL_S=-5: session_ttl_s takes an integer of at least 0"),
    ({"SPECDEC_DRAFT_LENGTH": "17"}, "draft_length (--draft-length / SPECDEC_DRAFT_LENGTH) = 17 is more than max_beam_depth"),
    ({"SPECDEC_TARGET_MODEL": "/nonexistent/model"}, "model path /nonexistent/model does not exist"),
])
def test_cluster_up_refuses_before_any_service_starts(variables, named):
    """Settings only the services read are checked by the launcher too, before it starts any."""
    line = one_line(run([*specdec_command(), "cluster", "up", "--port", "0"], **variables))
    assert line.startswith("specdec: ") and named in line


@pytest.mark.parametrize("module,variables,named", [
    ("specdec.verify_service", {"SPECDEC_MAX_SESSIONS": "-1"}, "specdec verify: cannot start: SPECDEC_MAX_SESSIONS=-1"),
    ("specdec.verify_service", {"SPECDEC_TARGET_MODEL": "/nonexistent/model"}, "model path /nonexistent/model does not exist"),
    ("specdec.draft_service", {"SPECDEC_KV_CACHE_MB": "0"}, "specdec draft: cannot start: SPECDEC_KV_CACHE_MB=0"),
    ("specdec.orchestrator", {"SPECDEC_DRAFT_LENGTH": "-3"}, "specdec orchestrator: cannot start: SPECDEC_DRAFT_LENGTH=-3"),
    ("specdec.orchestrator", {"SPECDEC_LOG_TEXT": "sometimes"}, "specdec orchestrator: cannot start: SPECDEC_LOG_TEXT=sometimes"),
])
def test_each_service_refuses_in_one_line(module, variables, named):
    assert named in one_line(run([sys.executable, "-m", module, "--port", "0"], **variables))
