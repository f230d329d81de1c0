"""Glue to the test oracles: the official ``recurrentgemma`` package (a test-only dependency).

Used by the parity tests and by the benchmarks that compare against the official implementation.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig


def official_griffin_config(config: ModelConfig, scan: str = "linear") -> Any:
    """The official ``recurrentgemma`` GriffinConfig for ``config``: the oracle the tests and
    benchmarks compare against (``recurrentgemma`` is a test-only dependency, imported here)."""
    from recurrentgemma import common

    if config.conv1d_temporal_width != 4:
        raise ValueError("the official Griffin hard-codes conv width 4")
    kinds = {
        "recurrent": common.TemporalBlockType.RECURRENT,
        "attention": common.TemporalBlockType.ATTENTION,
    }
    scan_types = {
        "linear": common.ScanType.LINEAR_NATIVE,  # what AUTO picks off TPU
        "associative": common.ScanType.ASSOCIATIVE_NATIVE,
    }
    return common.GriffinConfig(
        vocab_size=config.vocab_size,
        width=config.width,
        mlp_expanded_width=config.mlp_expanded_width,
        num_heads=config.num_heads,
        block_types=tuple(kinds[k] for k in config.block_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window_size,
        logits_soft_cap=config.logits_soft_cap,
        lru_width=config.lru_width,
        scan_type=scan_types[scan],
    )
