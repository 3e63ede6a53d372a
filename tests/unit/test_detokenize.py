"""The detokeniser: per-token texts and the streamed text join to exactly what
``tokenizer.decode(ids, skip_special_tokens=True)`` gives, multi-byte characters split over tokens
and special tokens included; stop strings end the text at the first token that completes one."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdec import config
from specdec.detokenize import TextStream, token_texts
from specdec.model_store import is_fetched, model_path
from tiny_models import tiny_tokenizer

TEXT = "héllo wörld, 你好 🎉!<|end|> après<|end|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, so every non-ASCII character is split."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", additional_special_tokens=["<|end|>"])


def tokenizers():
    found = [("bytes", byte_tokenizer()), ("tiny", tiny_tokenizer())]
    if is_fetched(config.EMBEDDED_DRAFT):  # the real byte-level BPE, when the embedded models are here
        from transformers import AutoTokenizer

        found.append(("qwen", AutoTokenizer.from_pretrained(model_path(config.EMBEDDED_DRAFT))))
    return found


@pytest.fixture(scope="module", params=tokenizers(), ids=lambda p: p[0])
def tokenizer(request):
    return request.param[1]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_token_texts_join_to_decode(tokenizer):
    ids = tokenizer(TEXT).input_ids
    pieces = token_texts(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == decode(tokenizer, ids)
    # Each piece is what its token adds: the prefixes agree wherever a character is complete.
    for n in range(1, len(ids) + 1):
        so_far = decode(tokenizer, ids[:n])
        if not so_far.endswith("\ufffd"):
            assert "".join(pieces[:n]) == so_far


def test_split_characters_wait_for_their_last_byte():
    tokenizer = byte_tokenizer()
    ids = tokenizer("a🎉b").input_ids
    assert len(ids) == 6  # a, four bytes of the emoji, b
    assert token_texts(tokenizer, ids) == ["a", "", "", "", "🎉", "b"]
    # Cut inside the character: the held bytes render at the end as decode renders them.
    assert "".join(token_texts(tokenizer, ids[:3])) == decode(tokenizer, ids[:3]) == "a\ufffd"
    assert token_texts(tokenizer, []) == []


def test_special_tokens_add_nothing():
    tokenizer = byte_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids = [end] + tokenizer("ok").input_ids + [end]
    assert token_texts(tokenizer, ids) == ["", "o", "k", ""]


@pytest.mark.parametrize("round_size", [1, 2, 5])
def test_stream_joins_to_decode(tokenizer, round_size):
    ids = tokenizer(TEXT).input_ids
    stream = TextStream(tokenizer, stop=["never there"])
    pieces = [stream.push(ids[i : i + round_size]) for i in range(0, len(ids), round_size)]
    pieces.append(stream.finish())
    assert not stream.stopped
    assert "".join(pieces) == stream.text == decode(tokenizer, ids)


@pytest.mark.parametrize("stop", ["wörld", "ö", "你好 🎉", "🎉", "!", "s<|end|>"])
def test_stop_string_ends_the_text_at_the_token_that_completes_it(tokenizer, stop):
    ids = tokenizer(TEXT).input_ids
    full = decode(tokenizer, ids)
    stream = TextStream(tokenizer, stop=[stop, "never there"])
    pieces = []
    for n, token in enumerate(ids, 1):
        pieces.append(stream.push([token]))
        if stream.stopped:
            break
    if stop not in full:  # a stop string made of text that special tokens left out never completes
        assert not stream.stopped
        return
    # The first token whose text completes the stop string; the text ends where the stop string starts.
    assert n == next(n for n in range(1, len(ids) + 1) if stop in decode(tokenizer, ids[:n]))
    assert "".join(pieces) == stream.text == full[: full.find(stop)]
    assert stream.finish() == "" and stream.push(ids[n:]) == ""


def test_a_possible_stop_string_is_held_back_until_it_is_not():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("abcabd").input_ids
    stream = TextStream(tokenizer, stop=["abd!", "xyz"])
    assert [stream.push([t]) for t in ids] == ["", "", "abc", "", "", ""]  # "ab", then "abd" may begin "abd!"
    assert stream.finish() == "abd" and stream.text == "abcabd"


def test_the_first_stop_string_completed_wins():
    tokenizer = tiny_tokenizer()
    # "cd" completes first ("bcde" would start earlier, but is not complete yet).
    stream = TextStream(tokenizer, stop=["bcde", "cd"])
    assert stream.push(tokenizer("abcdef").input_ids) == "ab"
    assert stream.stopped and stream.text == "ab"
    # Completed by the same token, the one that starts first cuts the text.
    stream = TextStream(tokenizer, stop=["cd", "bcd"])
    assert stream.push(tokenizer("abcdef").input_ids) == "a"
    assert stream.stopped and stream.text == "a"
