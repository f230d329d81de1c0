"""Grammar libraries at Gemma's vocabulary size: xgrammar, llguidance, outlines-core.

Each library runs in its own fresh interpreter (so its memory is its own) over the same
vocabulary: the tiny test SentencePiece model (testkit) widened with synthetic pieces to
``--vocab`` (default 256,000, Gemma's size; no Gemma tokenizer can be downloaded here), its token
bytes read by :func:`model.grammar.token_bytes` (``▁`` as a space, ``<0xNN>`` as that byte,
control pieces special). Measured per library:

  import      seconds to import it
  vocab       seconds to build its tokenizer object from the token bytes (once per tokenizer)
  compile     seconds to compile the JSON schema below (median of 5, each a fresh compile: caches
              off or a new compiler), and for a regex and a choice list
  mask        microseconds per mask of one row (packed int32 words over the vocabulary), median
              and max over the steps of one valid output, accepting each of its tokens
  memory      resident MB added by the vocabulary and one compiled schema with one matcher
  footprint   what ``pip install`` pulls beside it (``--dry-run``, read when this was written)
              and the size on disk of the packages it needs that this project did not have

The schema: an object with a string, an integer, a number, an enum and an array of strings, all
required, no other properties. The output walked: that object as ``json.dumps`` writes it, tokenized by the
widened tokenizer.

Run:
  .venv/bin/python -m benchmarks.grammar_libraries                      # all three, 256k
  .venv/bin/python -m benchmarks.grammar_libraries --libraries llguidance --vocab 32000
  .venv/bin/python -m benchmarks.grammar_libraries --extra-path DIR     # a library installed
                                                                        # with pip --target DIR
A library that is not installed is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

LIBRARIES = ("llguidance", "xgrammar", "outlines_core")
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "rating": {"type": "number"},
        "category": {"enum": ["news", "sports", "weather", "other"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "year", "rating", "category", "tags"],
    "additionalProperties": False,
}
DOCUMENT = {
    "title": "Council expands the bus network",
    "year": 2026,
    "rating": 4.5,
    "category": "news",
    "tags": ["city", "transport", "budget"],
}
REGEX = r"[A-Z][a-z]+ [0-9]{1,4}"
CHOICES = ["positive", "negative", "neutral"]
# What `pip install --dry-run <name>` would add to this project's environment (2026-12-02).
PULLS = {
    "llguidance": ["llguidance-1.9.1 (3.1 MB wheel, no dependencies)"],
    "xgrammar": [
        "xgrammar-0.2.9",
        "apache-tvm-ffi-0.1.15.post2",
        "triton-3.9.0",
        "(requires torch, transformers, pydantic, numpy, ninja: present here)",
    ],
    "outlines_core": ["outlines_core-0.2.14 (2.3 MB wheel, no dependencies)"],
}
NEW_PACKAGES = {
    "llguidance": ["llguidance"],
    "xgrammar": ["xgrammar", "tvm_ffi", "triton"],
    "outlines_core": ["outlines_core"],
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tree_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def footprint(name: str) -> dict[str, Any]:
    import importlib.util

    sizes = {}
    for pkg in NEW_PACKAGES[name]:
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            sizes[pkg] = round(tree_mb(Path(next(iter(spec.submodule_search_locations)))), 1)
    return dict(pulls=PULLS[name], disk_mb=sizes, total_mb=round(sum(sizes.values()), 1))


def vocabulary(vocab: int) -> Any:
    from model.tokenizer import Tokenizer
    from testkit.tiny_tokenizer import train_tiny_tokenizer, widen_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = train_tiny_tokenizer(Path(tmp) / "t.model").read_bytes()
    return Tokenizer(widen_tokenizer(base, vocab) if vocab > 512 else base)


class _Backend:
    """One library behind the same four calls."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        from model.grammar import token_bytes

        self.name, self.tok = name, tokenizer
        self.tokens, self.special = token_bytes(tokenizer)
        self.words = -(-tokenizer.vocab_size // 32)

    def setup(self) -> None:
        n, tok = self.name, self.tok
        if n == "llguidance":
            from model.grammar import ll_tokenizer

            self.ll = ll_tokenizer(tok)
        elif n == "xgrammar":
            import xgrammar as xgr

            toks = list(self.tokens)
            self.info = xgr.TokenizerInfo(
                toks, xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_id]
            )
        else:
            import outlines_core as oc

            table: dict[bytes, list[int]] = {}
            for i, b in enumerate(self.tokens):
                if b and i not in self.special:
                    table.setdefault(b, []).append(i)
            self.vocab = oc.Vocabulary(tok.eos_id, table)

    def compile(self, kind: str, spec: Any) -> Any:
        n = self.name
        if n == "llguidance":
            from model.grammar import CompiledGrammar, Constraint

            c = {
                "json": lambda: Constraint.json_schema(spec),
                "regex": lambda: Constraint.regex(spec),
                "choice": lambda: Constraint.choice(spec),
            }[kind]()
            return CompiledGrammar(c, self.ll)
        if n == "xgrammar":
            import xgrammar as xgr

            compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
            if kind == "json":
                return compiler.compile_json_schema(
                    json.dumps(spec), any_whitespace=False, separators=(", ", ": ")
                )
            if kind == "regex":
                return compiler.compile_regex(spec)
            return compiler.compile_regex("|".join(map(_escape, spec)))
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        if kind == "json":
            regex = build_regex_from_schema(json.dumps(spec), whitespace_pattern=" ?")
        elif kind == "regex":
            regex = spec
        else:
            regex = "|".join(map(_escape, spec))
        return oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> tuple[Any, Any, Any]:
        """(fill(), accept(token)) for one row."""
        import numpy as np

        n = self.name
        if n == "llguidance":
            m = compiled.matcher()
            mask = np.zeros(self.words, np.int32)
            return (lambda: m.fill_mask(mask)), m.accept, mask
        if n == "xgrammar":
            import xgrammar as xgr

            m = xgr.GrammarMatcher(compiled)
            bitmask = xgr.allocate_token_bitmask(1, self.tok.vocab_size)
            return (lambda: m.fill_next_token_bitmask(bitmask, 0)), m.accept_token, bitmask
        import outlines_core as oc

        g = oc.Guide(compiled)
        mask = np.zeros(self.words, np.int32)

        def fill() -> None:
            g.write_mask_into(mask.ctypes.data, mask.size, 4)

        def accept(t: int) -> bool:
            g.advance(t, return_tokens=False)
            return True

        return fill, accept, mask


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def measure(name: str, vocab: int) -> dict[str, Any]:
    """One library's figures (run in a fresh interpreter by :func:`main`)."""
    import numpy as np

    start = time.perf_counter()
    try:
        __import__(name)
    except ImportError as err:
        return dict(library=name, installed=False, error=str(err))
    import_s = time.perf_counter() - start
    tok = vocabulary(vocab)
    backend = _Backend(name, tok)
    rss0 = rss_mb()
    start = time.perf_counter()
    backend.setup()
    vocab_s = time.perf_counter() - start
    timings: dict[str, float] = {}
    compiled: dict[str, Any] = {}
    for kind, spec, reps in (("json", SCHEMA, 5), ("regex", REGEX, 3), ("choice", CHOICES, 3)):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            compiled[kind] = backend.compile(kind, spec)
            times.append(time.perf_counter() - start)
        timings[kind] = statistics.median(times)
    fill, accept, mask = backend.matcher(compiled["json"])
    rss1 = rss_mb()
    ids = tok.encode(json.dumps(DOCUMENT))
    steps = []
    for t in ids:
        start = time.perf_counter()
        fill()
        steps.append(time.perf_counter() - start)
        words = np.asarray(mask).reshape(-1).view(np.uint32)
        if not (words[t // 32] >> np.uint32(t % 32)) & 1:
            raise AssertionError(f"{name}: token {t} of the valid output is masked out")
        accept(t)
    start = time.perf_counter()
    fill()
    steps.append(time.perf_counter() - start)
    words = np.asarray(mask).reshape(-1).view(np.uint32)
    eos_allowed = bool((words[tok.eos_id // 32] >> np.uint32(tok.eos_id % 32)) & 1)
    us = [s * 1e6 for s in steps]
    return dict(
        library=name,
        installed=True,
        version=_version(name),
        vocab=tok.vocab_size,
        import_s=import_s,
        vocab_s=vocab_s,
        compile_json_ms=timings["json"] * 1e3,
        compile_regex_ms=timings["regex"] * 1e3,
        compile_choice_ms=timings["choice"] * 1e3,
        mask_us_median=statistics.median(us),
        mask_us_max=max(us),
        mask_us_first=us[0],
        steps=len(us),
        eos_allowed_at_end=eos_allowed,
        memory_mb=rss1 - rss0,
        footprint=footprint(name),
    )


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name.replace("_", "-"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from benchmarks import harness

    parser = harness.parser(__doc__)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--extra-path", default=None, help="also import libraries from here")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    harness.add_output_args(parser, "a 32,000-piece vocabulary")
    return parser.parse_args(argv)


def format_report(rows: list[dict[str, Any]], vocab: int) -> str:
    lines = [
        "",
        f"Grammar libraries: vocabulary {vocab:,} pieces (tiny SentencePiece widened), one row",
        "",
        f"{'library':<15}{'vocab s':>9}{'json ms':>9}{'regex ms':>10}{'choice ms':>11}"
        f"{'mask us med/max':>17}{'memory MB':>11}{'disk MB':>9}",
        "-" * 91,
    ]
    for r in rows:
        if not r.get("installed"):
            lines.append(f"{r['library']:<15}{r.get('error', 'not installed')}")
            continue
        mask = f"{r['mask_us_median']:.0f}/{r['mask_us_max']:.0f}"
        lines.append(
            f"{r['library']:<15}{r['vocab_s']:>9.2f}{r['compile_json_ms']:>9.1f}"
            f"{r['compile_regex_ms']:>10.1f}{r['compile_choice_ms']:>11.1f}{mask:>17}"
            f"{r['memory_mb']:>11.0f}{r['footprint']['total_mb']:>9.0f}"
        )
    for r in rows:
        if r.get("installed"):
            lines.append(f"{r['library']} pulls: {', '.join(r['footprint']['pulls'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.extra_path:
        sys.path.append(args.extra_path)
    vocab = 32_000 if args.small else args.vocab
    if args.measure:
        print(json.dumps(measure(args.measure, vocab)))
        return {}
    from benchmarks import harness

    rows = []
    env = {"PYTHONPATH": args.extra_path} if args.extra_path else None
    for name in args.libraries.split(","):
        extra = ["--extra-path", args.extra_path] if args.extra_path else []
        try:
            child = ["--measure", name, "--vocab", str(vocab), *extra]
            rows.append(harness.run_module_json("benchmarks.grammar_libraries", *child, env=env))
        except RuntimeError as err:
            rows.append(dict(library=name, installed=False, error=str(err)[-300:]))
    results = dict(environment=harness.environment(), vocab=vocab, libraries=rows)
    return harness.finish(results, format_report(rows, vocab), args.json, "grammar_libraries")


if __name__ == "__main__":
    main()
