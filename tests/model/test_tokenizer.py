"""Tokenizer: round trips, Gemma's special ids, the chat template, loading from fsspec URIs."""

from __future__ import annotations

import pickle
import re
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from model.tokenizer import Tokenizer
from testkit.tiny_tokenizer import train_tiny_tokenizer

TEXTS = [
    "The council voted 7 to 2 on Tuesday to expand the bus network.",
    "Summary: more buses, longer hours; 40,000 riders a day!",
    "  leading and trailing spaces, and\ttabs\nand newlines  ",
]
NON_ASCII = [
    "Café déjà vu — naïve façade",
    "東京で会いましょう",
    "Emoji: 🚌🌧️ and math: ∑ x² ≤ π",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "nested" / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Tokenizer:
    return Tokenizer(model_path)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RGBATCH_CACHE_DIR", str(cache))
    return cache


def test_training_writes_requested_path(model_path: Path) -> None:
    assert model_path.is_file()
    assert model_path.parent.name == "nested"


def test_training_is_deterministic(tmp_path: Path, model_path: Path) -> None:
    a = train_tiny_tokenizer(tmp_path / "a.model")
    b = train_tiny_tokenizer(tmp_path / "b" / "b.model")
    assert a.read_bytes() == b.read_bytes() == model_path.read_bytes()


def test_special_ids_match_gemma(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.start_of_turn_id is not None and tok.end_of_turn_id is not None
    assert len({tok.start_of_turn_id, tok.end_of_turn_id, 0, 1, 2, 3}) == 6
    assert tok.processor.id_to_piece(tok.start_of_turn_id) == "<start_of_turn>"
    assert tok.processor.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"


@pytest.mark.parametrize("text", TEXTS + NON_ASCII + [""])
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == text


def test_non_ascii_uses_byte_fallback(tok: Tokenizer) -> None:
    ids = tok.encode("東京")
    pieces = [tok.processor.id_to_piece(i) for i in ids]
    assert len(ids) == 6 and all(p.startswith("<0x") for p in pieces)


def test_digits_are_split(tok: Tokenizer) -> None:
    pieces = [tok.processor.id_to_piece(i) for i in tok.encode("in 2026")]
    assert pieces[-4:] == ["2", "0", "2", "6"]


def test_bos_eos_and_pad_handling(tok: Tokenizer) -> None:
    plain = tok.encode(TEXTS[0])
    both = tok.encode(TEXTS[0], add_bos=True, add_eos=True)
    assert both == [tok.bos_id, *plain, tok.eos_id]
    padded = np.array([tok.pad_id] * 3 + both + [tok.pad_id] * 2)
    assert tok.decode(padded) == TEXTS[0]
    assert tok.decode([]) == ""


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = TEXTS + NON_ASCII
    assert tok.encode_batch(texts, add_bos=True) == [tok.encode(t, add_bos=True) for t in texts]
    assert tok.encode_batch(iter(texts)) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_chat_template(tok: Tokenizer) -> None:
    user = "Summarize: the bridge opened 2 weeks early."
    prompt = Tokenizer.chat_prompt(user)
    assert prompt == ("<start_of_turn>user\n" + user + "<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode_prompt(user, chat=True)
    assert ids[0] == tok.bos_id
    assert ids.count(tok.start_of_turn_id) == prompt.count("<start_of_turn>") == 2
    assert ids.count(tok.end_of_turn_id) == 1
    assert ids[1] == tok.start_of_turn_id
    assert ids == tok.encode(prompt, add_bos=True)
    assert tok.decode(ids) == prompt
    # A single marker in plain text encodes to its single id too.
    assert tok.encode("<start_of_turn>") == [tok.start_of_turn_id]
    assert tok.encode("<end_of_turn>") == [tok.end_of_turn_id]


def test_encode_prompt_without_chat(tok: Tokenizer) -> None:
    assert tok.encode_prompt("hello", chat=False) == [tok.bos_id, *tok.encode("hello")]
    assert tok.encode_prompt("hello", chat=False, add_bos=False) == tok.encode("hello")
    assert tok.start_of_turn_id not in tok.encode_prompt("hello", chat=False)


def test_bytes_and_pickle(tok: Tokenizer, model_path: Path) -> None:
    from_bytes = Tokenizer(model_path.read_bytes())
    clone = pickle.loads(pickle.dumps(tok))
    for other in (from_bytes, clone):
        assert other.vocab_size == tok.vocab_size
        assert other.start_of_turn_id == tok.start_of_turn_id
        assert other.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_encode_rejects_non_str(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match="expects str, got bytes"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expects str, got int"):
        tok.encode(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at index 1"):
        tok.encode_batch(["ok", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="iterable of str"):
        tok.encode_batch("not a list")
    with pytest.raises(TypeError, match="expects str"):
        tok.encode_prompt(None, chat=True)  # type: ignore[arg-type]


def test_decode_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"token id 512 at position 1 is outside \[0, 512\)"):
        tok.decode([5, 512, 9999])
    with pytest.raises(ValueError, match="token id -1 at position 2"):
        tok.decode(np.array([5, 6, -1, 700]))
    with pytest.raises(TypeError, match="integer ids"):
        tok.decode(np.array([1.0, 2.0]))


def test_missing_and_invalid_files(tmp_path: Path, cache_dir: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.load(str(missing))
    with pytest.raises(FileNotFoundError, match="memory://"):
        Tokenizer.load(f"memory://{uuid.uuid4().hex}/absent.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer(junk)


def test_load_from_memory_uri(tok: Tokenizer, model_path: Path, cache_dir: Path) -> None:
    uri = f"memory://{uuid.uuid4().hex}/tokenizer.model"
    with fsspec.open(uri, "wb") as f:
        f.write(model_path.read_bytes())
    remote = Tokenizer.load(uri)
    texts = TEXTS + NON_ASCII
    assert remote.encode_batch(texts) == tok.encode_batch(texts)
    assert remote.encode_prompt(texts[0], chat=True) == tok.encode_prompt(texts[0], chat=True)
    assert any(cache_dir.rglob("*tokenizer.model")), "remote model should be cached locally"


def test_load_from_s3(
    s3_bucket: tuple[str, dict], tok: Tokenizer, model_path: Path, cache_dir: Path
) -> None:
    import s3fs

    bucket, storage_options = s3_bucket
    fs = s3fs.S3FileSystem(**storage_options)
    fs.put(str(model_path), f"{bucket}/tokenizer.model")
    remote = Tokenizer.load(f"s3://{bucket}/tokenizer.model", storage_options=storage_options)
    assert remote.vocab_size == tok.vocab_size
    assert remote.encode_batch(TEXTS + NON_ASCII) == tok.encode_batch(TEXTS + NON_ASCII)
    assert remote.start_of_turn_id == tok.start_of_turn_id
    assert any(cache_dir.rglob("*tokenizer.model"))
    with pytest.raises(FileNotFoundError, match=r"absent\.model"):
        Tokenizer.load(f"s3://{bucket}/absent.model", storage_options=storage_options)
