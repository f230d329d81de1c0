"""SentencePiece tokenizer for RecurrentGemma checkpoints, with Gemma's chat template.

A :class:`Tokenizer` loads from a local path, an fsspec URI (remote files are copied once into
the local cache by :func:`model.storage.localize`) or the serialized model bytes. It pickles as
those bytes, so it can be shipped to Ray workers as is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from model.storage import localize

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

IdsLike = Sequence[int] | np.ndarray


class Tokenizer:
    """A SentencePiece model with Gemma's special ids and chat template.

    ``path_or_bytes`` is a local path, an fsspec URI (``s3://``, ``gs://``, ``memory://``...) or
    the serialized model itself. ``storage_options`` go to fsspec for remote URIs.
    """

    def __init__(
        self,
        path_or_bytes: str | os.PathLike[str] | bytes,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(path_or_bytes, bytes | bytearray | memoryview):
            proto = bytes(path_or_bytes)
            source = "<bytes>"
        elif isinstance(path_or_bytes, str | os.PathLike):
            path = localize(path_or_bytes, storage_options=storage_options)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer model is not a file: {path}")
            proto = path.read_bytes()
            source = os.fspath(path_or_bytes)
        else:
            raise TypeError(
                "Tokenizer expects a path, an fsspec URI or the model bytes, "
                f"got {type(path_or_bytes).__name__}"
            )
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except RuntimeError as err:
            raise ValueError(f"not a valid sentencepiece model: {source}") from err
        self._proto = proto
        self._source = source
        self._sp = sp
        self._vocab_size = int(sp.vocab_size())
        self._start_of_turn_id = self._piece_id(START_OF_TURN)
        self._end_of_turn_id = self._piece_id(END_OF_TURN)

    @classmethod
    def load(
        cls, uri: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
    ) -> Tokenizer:
        """Loads the model at a local path or fsspec URI; raises FileNotFoundError if missing."""
        return cls(uri, storage_options=storage_options)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._proto,))

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self._vocab_size})"

    def _piece_id(self, piece: str) -> int | None:
        idx = int(self._sp.piece_to_id(piece))
        return idx if self._sp.id_to_piece(idx) == piece else None

    # ----------------------------------------------------------------------------- properties

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The underlying ``SentencePieceProcessor``."""
        return self._sp

    @property
    def serialized_model(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """Padding id (-1 if the model has none; 0 for Gemma)."""
        return int(self._sp.pad_id())

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (-1 if the model has none; 1 for Gemma)."""
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (-1 if the model has none; 2 for Gemma)."""
        return int(self._sp.bos_id())

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (3 for Gemma)."""
        return int(self._sp.unk_id())

    @property
    def start_of_turn_id(self) -> int | None:
        """Id of ``<start_of_turn>``, or None if the model lacks the piece."""
        return self._start_of_turn_id

    @property
    def end_of_turn_id(self) -> int | None:
        """Id of ``<end_of_turn>``, or None if the model lacks the piece."""
        return self._end_of_turn_id

    # ------------------------------------------------------------------------------- encoding

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with BOS in front and EOS at the end."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: Iterable[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Token ids of each text in ``texts`` (see :meth:`encode`)."""
        if isinstance(texts, str | bytes):
            raise TypeError(
                f"Tokenizer.encode_batch expects an iterable of str, got {type(texts).__name__}"
            )
        batch = list(texts)
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise TypeError(
                    f"Tokenizer.encode_batch expects str items, got {type(text).__name__} "
                    f"at index {i}"
                )
        if not batch:
            return []
        return self._sp.encode(batch, add_bos=add_bos, add_eos=add_eos)

    @staticmethod
    def chat_prompt(user_text: str) -> str:
        """Wraps one user turn in Gemma's chat template, ending where the model's turn begins."""
        if not isinstance(user_text, str):
            raise TypeError(f"Tokenizer.chat_prompt expects str, got {type(user_text).__name__}")
        return f"{START_OF_TURN}user\n{user_text}{END_OF_TURN}\n{START_OF_TURN}model\n"

    def encode_prompt(self, text: str, *, chat: bool, add_bos: bool = True) -> list[int]:
        """Ids of a generation prompt; ``chat=True`` applies the template (for "-it" checkpoints)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode_prompt expects str, got {type(text).__name__}")
        if chat and (self._start_of_turn_id is None or self._end_of_turn_id is None):
            raise ValueError(
                f"chat=True needs the pieces {START_OF_TURN} and {END_OF_TURN}, "
                f"which the tokenizer {self._source} lacks"
            )
        prompt = self.chat_prompt(text) if chat else text
        return self.encode(prompt, add_bos=add_bos)

    # ------------------------------------------------------------------------------- decoding

    def _check_ids(self, ids: IdsLike) -> list[int]:
        arr = np.asarray(ids)
        if arr.size == 0:
            return []
        if arr.ndim != 1:
            raise ValueError(
                f"Tokenizer.decode expects a 1-D sequence of ids, got shape {arr.shape}"
            )
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"Tokenizer.decode expects integer ids, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= self._vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"token id {int(arr[i])} at position {i} is outside [0, {self._vocab_size})"
            )
        if self.pad_id >= 0:
            arr = arr[arr != self.pad_id]
        return arr.tolist()

    def decode(self, ids: IdsLike) -> str:
        """Text of ``ids`` (a list or 1-D integer array); pad ids are skipped."""
        return self._sp.decode(self._check_ids(ids))

    def decode_batch(self, batch: Iterable[IdsLike]) -> list[str]:
        """Text of each id sequence in ``batch`` (rows of a 2-D array work too)."""
        return [self.decode(ids) for ids in batch]
