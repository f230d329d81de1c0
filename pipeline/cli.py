"""``rgbatch``: the command line.

Exit codes: 0 done, 2 bad usage or input, 1 the job failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from model.testing import build_tiny_checkpoint

    variant_dir = build_tiny_checkpoint(args.dir)
    print(f"tiny checkpoint: {variant_dir}")
    print(f"tokenizer:       {Path(args.dir) / 'tokenizer.model'}")
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from model.checkpoint import load_checkpoint
    from model.engine import Engine, GenerationRequest
    from model.tokenizer import Tokenizer

    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.tokenizer_path is None:
        print(f"error: no tokenizer.model beside {args.checkpoint}", file=sys.stderr)
        return EXIT_USAGE
    tokenizer = Tokenizer.load(ckpt.tokenizer_path)
    chat = ckpt.variant.endswith("-it")
    stop_ids = (tokenizer.eos_id, *((tokenizer.end_of_turn_id,) if chat else ()))
    requests = [
        GenerationRequest(
            tokenizer.encode_prompt(text, chat=chat),
            max_new_tokens=args.max_new_tokens,
            stop_ids=stop_ids,
            temperature=args.temperature,
            seed=args.seed,
        )
        for text in args.prompts
    ]
    engine = Engine(ckpt.config, ckpt.params, max_slots=len(requests), dtype=jnp.dtype(args.dtype))
    for text, result in zip(args.prompts, engine.generate(requests), strict=True):
        print(f"> {text}\n{tokenizer.decode(result.token_ids)}  [{result.finish_reason}]\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fixtures = sub.add_parser(
        "fixtures", help="write the tiny offline model (Kaggle layout + tokenizer.model) to DIR"
    )
    fixtures.add_argument("dir")
    fixtures.set_defaults(func=_cmd_fixtures)

    generate = sub.add_parser(
        "generate", help="continue a few prompts (greedy unless --temperature)"
    )
    generate.add_argument("--checkpoint", required=True, help="variant dir or URI (Kaggle or HF)")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("prompts", nargs="+")
    generate.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every read at INFO
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage; keep its code
        return int(exc.code or 0)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
