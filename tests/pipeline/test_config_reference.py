"""The generated config reference: current in docs/, complete, and printed by ``rgbatch config``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from pipeline.cli import main
from pipeline.config import JobConfig
from pipeline.config.reference import COMMAND, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The dotted path of every field that is not itself a section."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out.extend(_leaf_paths(kind, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


def test_committed_reference_is_current() -> None:
    assert DOC.read_text() == render(), f"docs/config-reference.md is stale: run `{COMMAND}`"


def test_every_field_is_listed_once() -> None:
    text = render()
    paths = _leaf_paths(JobConfig)
    assert len(paths) > 60
    for path in paths:
        assert text.count(f"| `{path}` |") == 1, path
    assert text.count("\n| `") == len(paths)


def test_rgbatch_config_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    assert capsys.readouterr().out == render()


class _Inner(BaseModel):
    mode: Literal["a", "b|c"] = Field(default="a", description="Two | modes.")
    cache_bytes: int = Field(default=3 << 20, ge=0, description="Room.")


class _Section(BaseModel):
    uri: str = Field(min_length=1, description="Where.\nSecond line.")
    names: list[str] = Field(default_factory=list, description="Names.")
    limit: float | None = Field(default=None, gt=0, le=1, description="A share.")
    inner: _Inner = Field(default_factory=_Inner, description="Nested settings.")


class _Root(BaseModel):
    kind: Literal["x", "y"] = Field(description="The kind.")
    section: _Section = Field(description="A section.")


def test_rows_show_path_type_bounds_default_and_nested_sections() -> None:
    text = render(_Root)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [
        '| `kind` | `"x" \\| "y"` | required | The kind. |',
        "| `section.uri` | `str`, length ≥ 1 | required | Where. Second line. |",
        "| `section.names` | `list[str]` | `[]` | Names. |",
        "| `section.limit` | `float \\| null`, > 0, ≤ 1 | `null` | A share. |",
        '| `section.inner.mode` | `"a" \\| "b\\|c"` | `"a"` | Two \\| modes. |',
        "| `section.inner.cache_bytes` | `int`, ≥ 0 | `3145728` (3 MiB) | Room. |",
    ]
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Top level", "## `section`", "## `section.inner`"]
    assert "A section. Required section." in text
    assert "Nested settings." in text and "Nested settings. Required" not in text
