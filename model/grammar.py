"""Structured output: constraints compiled against the tokenizer, per-row matchers, packed masks.

A :class:`Constraint` says what a row's output must be: a JSON schema, any JSON object
(``json_object``), a regular expression, or one of a list of choices. It is a small frozen value
(the spec travels as a string), so requests and caches can key on it.

The grammar library is llguidance (chosen by measurement: ``python -m benchmarks.grammar`` and
``benchmarks/README.md``): no dependencies beyond its 3 MB wheel, compiles a JSON schema in about
a millisecond and computes a 256k-token mask in tens of microseconds, lazily (no ahead-of-time
walk of the vocabulary per grammar). It needs each token's bytes: :func:`token_bytes` reads them
from the SentencePiece model (``▁`` is a space, byte-fallback pieces ``<0xNN>`` are that byte,
control and unknown pieces are special tokens that no grammar allows except EOS at the end).

:class:`GrammarCache` compiles a constraint once per (constraint, tokenizer): a batch of 10k rows
with one schema compiles it once. Each row then gets a :class:`Matcher` that writes its packed
allowed-token mask (int32 words, bit ``i % 32`` of word ``i // 32`` for token ``i``) and accepts
the drawn token. Once the grammar is complete and admits nothing more, only EOS is allowed, so a
constrained row ends with finish reason ``stop``; a row cut by its token limit ends ``length``
(its text is then an unfinished prefix of a valid output).

Nothing here imports JAX (the scheduler runs it on the host).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from model.controls import bitmask_words

if TYPE_CHECKING:
    import llguidance

    from model.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "choice")
# JSON as json.dumps writes it by default: ", " between items, ": " after keys, no other
# whitespace (free whitespace lets a small model pad its output with newlines up to the limit).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
WORD_BITS = 32
_TURN_PIECES = ("<start_of_turn>", "<end_of_turn>")


class ConstraintError(ValueError):
    """A constraint that does not compile (an invalid schema or regex); the message says why."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a row's output must match.

    ``kind`` is one of :data:`KINDS`; ``spec`` is the JSON schema as JSON text (``json_schema``),
    the regex (``regex``), a JSON list of strings (``choice``) or empty (``json_object``).
    Build them with :meth:`json_schema`, :meth:`json_object`, :meth:`regex`, :meth:`choice`.
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"constraint kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        """Output is JSON valid against ``schema`` (a dict or its JSON text)."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> Constraint:
        """Output is any JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Output matches ``pattern`` as a whole."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> Constraint:
        """Output is exactly one of ``choices``."""
        return cls("choice", json.dumps(list(choices)))

    def to_json(self) -> str:
        """This constraint as JSON text (how it travels in a row's settings)."""
        return json.dumps({"kind": self.kind, "spec": self.spec})

    @classmethod
    def from_json(cls, text: str) -> Constraint:
        """The constraint of :meth:`to_json`'s text."""
        value = json.loads(text)
        return cls(value["kind"], value.get("spec", ""))

    def check(self) -> None:
        """Raises ConstraintError if the constraint does not compile (no tokenizer needed)."""
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(self.grammar())
        if error and not error.startswith("WARNING"):
            raise ConstraintError(f"{self.kind} does not compile: {error}")

    def grammar(self) -> str:
        """The llguidance grammar text of this constraint."""
        import llguidance

        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except json.JSONDecodeError as err:
                raise ConstraintError(f"the JSON schema is not valid JSON: {err}") from err
            if not isinstance(schema, dict | bool):
                raise ConstraintError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_OPTIONS)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        choices = json.loads(self.spec)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError("choices must be a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(c) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(lark)


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """Each token's bytes as the decoder writes them, and the special ids (control, unknown and
    user-defined ``<...>`` pieces such as ``<start_of_turn>``: they get an empty byte string and
    no grammar admits them; EOS is allowed by the matcher where the grammar may end)."""
    sp = tokenizer.processor
    out: list[bytes] = []
    special: list[int] = []
    for i in range(tokenizer.vocab_size):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or piece in _TURN_PIECES:
            out.append(b"")
            special.append(i)
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out, special


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS/BOS ids and an encoder."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokens, self.special_token_ids = token_bytes(tokenizer)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of ``tokenizer`` (builds the byte table: ~1 s at 256k pieces)."""
    import llguidance

    vocab = _Vocabulary(tokenizer)
    for token_id in vocab.special_token_ids:
        # llguidance marks special tokens by a leading 0xFF byte followed by their name.
        vocab.tokens[token_id] = b"\xff" + tokenizer.processor.id_to_piece(token_id).encode()
    wrapper = llguidance.TokenizerWrapper(vocab)
    return llguidance.LLTokenizer(wrapper, n_vocab=tokenizer.vocab_size)


class CompiledGrammar:
    """A constraint validated against one tokenizer; :meth:`matcher` starts a row on it."""

    def __init__(self, constraint: Constraint, tokenizer: llguidance.LLTokenizer) -> None:
        import llguidance

        self.constraint = constraint
        self.grammar = constraint.grammar()
        self._tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token)
        self.vocab_size = int(tokenizer.vocab_size)
        error = llguidance.LLMatcher.validate_grammar(self.grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise ConstraintError(f"{constraint.kind} does not compile: {error}")
        self._root = llguidance.LLMatcher(tokenizer, self.grammar, log_level=0)
        if self._root.is_error():
            raise ConstraintError(f"{constraint.kind} does not compile: {self._root.get_error()}")

    def matcher(self) -> Matcher:
        """A fresh per-row matcher (a copy of the compiled start state)."""
        return Matcher(self._root.deep_copy(), self._tokenizer.vocab_size)


class Matcher:
    """One row's grammar state: :meth:`fill_mask` writes its allowed tokens, :meth:`accept`
    advances on the drawn one. Once the grammar is done, only EOS is allowed."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size

    def fill_mask(self, row: np.ndarray) -> None:
        """Writes the packed mask into ``row`` (int32 [ceil(vocab / 32)], C-contiguous)."""
        assert row.dtype == np.int32 and row.flags["C_CONTIGUOUS"]
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token_id: int) -> bool:
        """Advances on ``token_id``; False if the grammar did not allow it."""
        return bool(self._m.consume_token(int(token_id)))

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows only EOS."""
        return bool(self._m.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed)."""
        return bool(self._m.is_accepting())

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


def words(vocab_size: int) -> int:
    """int32 words of one packed mask (the layout of :func:`model.controls.pack_tokens`)."""
    return bitmask_words(vocab_size)


class GrammarCache:
    """Compiled grammars by (constraint, tokenizer), least recently used dropped past
    ``max_entries``; thread-safe. The llguidance tokenizer is built once per tokenizer."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._grammars: OrderedDict[tuple[Constraint, int], CompiledGrammar] = OrderedDict()
        self._tokenizers: dict[int, tuple[Tokenizer, llguidance.LLTokenizer]] = {}
        self._lock = threading.Lock()
        self.compiled = 0  # how many compilations ran (tests and benchmarks read it)

    def tokenizer(self, tokenizer: Tokenizer) -> llguidance.LLTokenizer:
        key = id(tokenizer)
        with self._lock:
            held = self._tokenizers.get(key)
            if held is None or held[0] is not tokenizer:
                held = (tokenizer, ll_tokenizer(tokenizer))
                self._tokenizers[key] = held
            return held[1]

    def get(self, constraint: Constraint, tokenizer: Tokenizer) -> CompiledGrammar:
        """The compiled grammar of ``constraint``; raises ConstraintError if it does not compile."""
        ll = self.tokenizer(tokenizer)
        key = (constraint, id(tokenizer))
        with self._lock:
            found = self._grammars.get(key)
            if found is not None:
                self._grammars.move_to_end(key)
                return found
        compiled = CompiledGrammar(constraint, ll)
        with self._lock:
            self.compiled += 1
            self._grammars[key] = compiled
            while len(self._grammars) > self.max_entries:
                self._grammars.popitem(last=False)
        return compiled


class GrammarSlots:
    """The matchers of an engine's constrained slots and the packed masks they give.

    Host only. A slot holds a matcher from :meth:`start` until :meth:`release`; :meth:`accept`
    advances it on each token the device emitted; :meth:`decode_mask` is the [slots, words]
    mask of the next decode call (all ones for unconstrained slots), computed only while some
    constrained slot is live.
    """

    def __init__(self, slots: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = words(vocab_size)
        self.matchers: list[Matcher | None] = [None] * slots
        self.errors: list[str | None] = [None] * slots
        self._mask = np.full((slots, self.words), -1, np.int32)
        self.eos_ids: list[int] = [-1] * slots

    @property
    def any(self) -> bool:
        """Whether a slot holds a matcher."""
        return any(m is not None for m in self.matchers)

    def start(self, slot: int, grammar: CompiledGrammar) -> None:
        self.matchers[slot] = grammar.matcher()
        self.errors[slot] = None
        self.eos_ids[slot] = grammar.eos_id

    def release(self, slot: int) -> str | None:
        """Drops the slot's matcher; the grammar error it met, if any."""
        self.matchers[slot] = None
        self._mask[slot] = -1
        return self.errors[slot]

    def accept(self, slot: int, tokens: Sequence[int]) -> None:
        """Advances the slot's matcher on ``tokens`` (emitted in order)."""
        m = self.matchers[slot]
        if m is None or self.errors[slot] is not None:
            return
        for token in tokens:
            if not m.accept(token):
                self.errors[slot] = m.error or f"token {token} is outside the grammar"
                return

    def fill(self, slot: int, row: np.ndarray) -> None:
        """Writes the slot's next mask into ``row``: EOS only once its grammar failed."""
        m = self.matchers[slot]
        assert m is not None
        if self.errors[slot] is None:
            m.fill_mask(row)
            if row.any():
                return
            self.errors[slot] = m.error or "the grammar allows no token"
        row[:] = 0
        eos = self.eos_ids[slot]
        row[eos // WORD_BITS] = np.int32(np.uint32(1 << (eos % WORD_BITS)).view(np.int32))

    def decode_mask(self, live: np.ndarray) -> np.ndarray | None:
        """The next decode call's mask, or None when no live slot is constrained."""
        slots = [s for s, m in enumerate(self.matchers) if m is not None and live[s]]
        if not slots:
            return None
        for slot in slots:
            self.fill(slot, self._mask[slot])
        return self._mask
