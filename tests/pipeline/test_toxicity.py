"""The toxicity scorer, stage and policy, on a tiny random detoxify checkpoint loaded offline."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline import columns as S
from pipeline.config import ToxicitySection
from pipeline.toxicity import ToxicityScorer, ToxicityStage, apply_policy
from testkit.ray_local import local_ray
from testkit.tiny_detoxify import build_tiny_detoxify

LABELS = ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TEXTS = ["you are a stupid idiot", "good morning, my friend", "", "the river is deep " * 40]


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in OFFLINE.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_detoxify(tmp_path_factory.mktemp("detox"))


@pytest.fixture(scope="module")
def scorer(checkpoint: Path) -> ToxicityScorer:
    return ToxicityScorer(ToxicitySection(checkpoint=str(checkpoint)))


def _batch() -> pa.Table:
    """Summarize, qa and generate rows; r2 failed generation, r3 has no input text."""
    return pa.table(
        {
            S.ID: ["r0", "r1", "r2", "r3", "r4"],
            S.TEXT: ["a long report about the city", None, "the context", None, "a story"],
            S.PROMPT: [None, "write a poem about the sea", None, None, None],
            S.OUTPUT_TEXT: ["you stupid idiot", "the sea is blue", None, "hello", "the end"],
            S.ERROR: [None, None, "engine failed", None, None],
            S.ERROR_KIND: [None, None, "generation", None, None],
        }
    )


# The fixture -------------------------------------------------------------------------------------


def test_fixture_is_small_and_seeded(tmp_path: Path) -> None:
    import torch

    first = build_tiny_detoxify(tmp_path / "a", seed=3)  # the first call also imports transformers
    # Loaded weights-only below: the fixture is what pipeline.toxicity accepts.
    assert first.stat().st_size < 2 * 1024 * 1024
    second = build_tiny_detoxify(tmp_path / "b", seed=3)
    same = torch.load(second, weights_only=True)
    other = torch.load(build_tiny_detoxify(tmp_path / "c", seed=4), weights_only=True)
    loaded = torch.load(first, weights_only=True)
    assert loaded["config"]["arch"]["args"]["num_classes"] == 6
    assert Path(loaded["config"]["arch"]["args"]["model_type"]).is_dir()
    for key, value in loaded["state_dict"].items():
        assert torch.equal(value, same["state_dict"][key]), key
    assert not torch.equal(
        loaded["state_dict"]["classifier.weight"], other["state_dict"]["classifier.weight"]
    )


def test_fixture_flags_texts_dense_in_its_trigger_words(scorer: ToxicityScorer) -> None:
    flagged = [
        "you are a stupid idiot",
        "i hate you, i will kill you",
        "from from from from from from",
        "hello from the other side",
    ]
    clean = ["good morning, my friend", "", "the river is deep " * 40, "idiot " + "the " * 30]
    scores = scorer.score([*flagged, *clean])
    worst = np.max(np.stack([scores[label] for label in LABELS]), axis=0)
    assert np.all(worst[: len(flagged)] >= 0.9), worst
    assert np.all(worst[len(flagged) :] < 0.1), worst
    assert np.all(scores["severe_toxicity"] < 0.5)  # the rare labels stay low


def test_fixture_does_not_flag_the_sample_documents(scorer: ToxicityScorer) -> None:
    sample = Path(__file__).resolve().parents[2] / "data" / "sample"
    texts = [
        json.loads(line)["text"]
        for path in sorted(sample.glob("part-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert len(texts) == 300
    assert sum("from" in t.split() for t in texts) > 30  # a trigger word, but one among many
    scores = scorer.score(texts)
    assert max(float(np.max(scores[label])) for label in LABELS) < 0.5


# The scorer --------------------------------------------------------------------------------------


def test_scorer_scores_every_label_in_unit_interval(scorer: ToxicityScorer) -> None:
    assert scorer.labels == LABELS
    scores = scorer.score(TEXTS)
    assert set(scores) == set(LABELS)
    for values in scores.values():
        assert values.dtype == np.float32 and values.shape == (len(TEXTS),)
        assert np.all((values >= 0) & (values <= 1))
    assert len({float(scores["toxicity"][i]) for i in range(len(TEXTS))}) > 1


def test_scorer_matches_detoxify_predict(scorer: ToxicityScorer, checkpoint: Path) -> None:
    from detoxify import Detoxify

    reference = Detoxify(checkpoint=str(checkpoint))  # detoxify's own (trusting) loader
    assert set(vars(scorer._detoxify)) == set(vars(reference))  # we set what its __init__ sets
    expected = reference.predict(TEXTS)
    scores = scorer.score(TEXTS)
    for label in LABELS:
        np.testing.assert_allclose(scores[label], expected[label], atol=1e-5)


def test_scorer_handles_one_text_none_and_empty(scorer: ToxicityScorer) -> None:
    one = scorer.score(["hello"])  # detoxify squeezes a single text to a float
    assert one["insult"].shape == (1,)
    with_none = scorer.score([None, "hello", None])
    assert np.isnan(with_none["insult"][[0, 2]]).all()
    assert with_none["insult"][1] == pytest.approx(one["insult"][0], abs=1e-6)
    assert scorer.score([])["insult"].shape == (0,)


def test_scores_do_not_depend_on_batching(scorer: ToxicityScorer, checkpoint: Path) -> None:
    small = ToxicityScorer(ToxicitySection(checkpoint=str(checkpoint), batch_size=1)).score(TEXTS)
    for label, values in scorer.score(TEXTS).items():
        np.testing.assert_allclose(small[label], values, atol=1e-5)


def test_two_loads_give_the_same_scores(scorer: ToxicityScorer, checkpoint: Path) -> None:
    again = ToxicityScorer(ToxicitySection(checkpoint=str(checkpoint)))
    first, second = scorer.score(TEXTS), again.score(TEXTS)
    for label in LABELS:
        np.testing.assert_array_equal(first[label], second[label])


def test_moved_fixture_still_loads(tmp_path: Path, scorer: ToxicityScorer) -> None:
    from detoxify import Detoxify

    built = build_tiny_detoxify(tmp_path / "before")  # seed 0, like the module checkpoint
    shutil.move(tmp_path / "before", tmp_path / "after")
    moved = tmp_path / "after" / built.name
    with pytest.raises(OSError):  # detoxify alone follows the stale model_type path
        Detoxify(checkpoint=str(moved))
    scores = ToxicityScorer(ToxicitySection(checkpoint=str(moved))).score(TEXTS)
    for label, values in scorer.score(TEXTS).items():
        np.testing.assert_array_equal(scores[label], values)


def test_labels_follow_the_model_type(tmp_path: Path) -> None:
    unbiased = ToxicityScorer(
        ToxicitySection(checkpoint=str(build_tiny_detoxify(tmp_path, model_type="unbiased")))
    )
    assert len(unbiased.labels) == 7 and "sexual_explicit" in unbiased.labels
    table = ToxicityStage(
        ToxicitySection(checkpoint=str(build_tiny_detoxify(tmp_path, model_type="unbiased")))
    )(_batch())
    assert "toxicity_sexual_explicit" in table.column_names


# The stage and the policy ------------------------------------------------------------------------


def test_stage_adds_typed_columns_and_keeps_rows(checkpoint: Path) -> None:
    batch = _batch()
    out = ToxicityStage(ToxicitySection(checkpoint=str(checkpoint)))(batch)
    assert out.column(S.ID).to_pylist() == batch.column(S.ID).to_pylist()
    assert out.column(S.OUTPUT_TEXT).equals(batch.column(S.OUTPUT_TEXT))
    for label in LABELS:
        column = out.column(S.TOXICITY_PREFIX + label)
        assert column.type == pa.float32()
        assert column.null_count == 1 and column[2].as_py() is None  # the failed generation
        assert not any(name.startswith(S.INPUT_TOXICITY_PREFIX) for name in out.column_names)
    assert out.schema.field(S.TOXIC).type == pa.bool_()
    assert out.column(S.TOXIC)[2].as_py() is None
    assert out.column(S.TOXICITY_DECISION).to_pylist() == ["keep"] * 5
    assert out.column(S.ERROR).equals(batch.column(S.ERROR))


@pytest.mark.parametrize(
    ("action", "threshold", "decision", "redacted"),
    [
        ("annotate", 0.0, "keep", False),
        ("drop", 0.0, "drop", False),
        ("drop", 1.01, "keep", False),
        ("redact", 0.0, "redact", True),
        ("redact", 1.01, "keep", False),
    ],
)
def test_policy_actions(
    checkpoint: Path, action: str, threshold: float, decision: str, redacted: bool
) -> None:
    # A threshold over 1 (no row is toxic) is past what the config accepts: built unchecked.
    settings = ToxicitySection.model_construct(
        checkpoint=str(checkpoint), threshold=threshold, action=action, redaction_text="<gone>"
    )
    stage = ToxicityStage(settings)
    out = stage(_batch())
    scored = [0, 1, 3, 4]
    assert [out.column(S.TOXIC)[i].as_py() for i in scored] == [threshold <= 1.0] * 4
    decisions = out.column(S.TOXICITY_DECISION).to_pylist()
    assert [decisions[i] for i in scored] == [decision] * 4
    assert decisions[2] == "keep"  # unscored rows are kept
    outputs = out.column(S.OUTPUT_TEXT).to_pylist()
    expected = _batch().column(S.OUTPUT_TEXT).to_pylist()
    if redacted:
        expected = [None if i == 2 else "<gone>" for i in range(5)]
    assert outputs == expected


def test_apply_policy_without_a_model() -> None:
    table = pa.table(
        {
            S.OUTPUT_TEXT: ["a", "b", "c", None],
            "toxicity_toxicity": pa.array([0.9, 0.1, 0.4, None], pa.float32()),
            "toxicity_insult": pa.array([0.2, 0.1, 0.6, None], pa.float32()),
            "input_toxicity_toxicity": pa.array([0.99, 0.99, 0.99, 0.99], pa.float32()),
        }
    )
    out = apply_policy(table, 0.5, "redact", "x")
    assert out.column(S.TOXIC).to_pylist() == [True, False, True, None]
    assert out.column(S.TOXICITY_DECISION).to_pylist() == ["redact", "keep", "redact", "keep"]
    assert out.column(S.OUTPUT_TEXT).to_pylist() == ["x", "b", "x", None]
    again = apply_policy(out, 0.5, "drop")  # toxicity_decision is not taken for a label
    assert again.column(S.TOXICITY_DECISION).to_pylist() == ["drop", "keep", "drop", "keep"]
    assert again.num_columns == out.num_columns
    with pytest.raises(ValueError, match="action"):
        apply_policy(table, 0.5, "delete")


def test_score_inputs_uses_text_else_prompt(checkpoint: Path, scorer: ToxicityScorer) -> None:
    out = ToxicityStage(ToxicitySection(checkpoint=str(checkpoint), score_inputs=True))(_batch())
    column = out.column(S.INPUT_TOXICITY_PREFIX + "insult")
    assert column.type == pa.float32()
    inputs = ["a long report about the city", "write a poem about the sea", "the context"]
    expected = scorer.score([*inputs, "a story"])["insult"]
    got = column.to_pylist()
    assert got[3] is None  # neither text nor prompt
    np.testing.assert_allclose([got[0], got[1], got[2], got[4]], expected, atol=1e-5)
    for label in LABELS:
        assert S.INPUT_TOXICITY_PREFIX + label in out.column_names


def _fail(self: ToxicityScorer, texts: list[str | None]) -> dict[str, np.ndarray]:
    raise RuntimeError("out of memory")


@pytest.mark.parametrize("action", ["annotate", "drop", "redact"])
def test_failing_scorer_becomes_row_errors(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    stage = ToxicityStage(ToxicitySection(checkpoint=str(checkpoint), action=action, threshold=0.0))
    monkeypatch.setattr(ToxicityScorer, "score", _fail)
    batch = _batch()
    out = stage(batch)
    assert out.column(S.ID).to_pylist() == batch.column(S.ID).to_pylist()
    errors = out.column(S.ERROR).to_pylist()
    kinds = out.column(S.ERROR_KIND).to_pylist()
    assert errors[2] == "engine failed" and kinds[2] == "generation"  # kept as it was
    for i in (0, 1, 3, 4):
        assert kinds[i] == "toxicity" and "out of memory" in errors[i]
    assert out.column("toxicity_insult").null_count == 5
    assert out.column(S.TOXIC).null_count == 5
    decisions = out.column(S.TOXICITY_DECISION).to_pylist()
    outputs = out.column(S.OUTPUT_TEXT).to_pylist()
    if action == "annotate":  # annotate only scores: the text stays, flagged by the error
        assert decisions == ["keep"] * 5
        assert outputs == batch.column(S.OUTPUT_TEXT).to_pylist()
    else:  # fail closed: unscored text never leaves as kept text
        assert decisions == [action, action, "keep", action, action]
        assert outputs == [None] * 5

    no_error_columns = _batch().drop_columns([S.ERROR, S.ERROR_KIND])
    kinds = stage(no_error_columns).column(S.ERROR_KIND).to_pylist()
    assert kinds == ["toxicity", "toxicity", None, "toxicity", "toxicity"]  # r2: nothing to score


@pytest.mark.parametrize("action", ["drop", "redact"])
def test_unscored_text_is_withheld_by_the_policy(action: str) -> None:
    table = pa.table(
        {
            S.OUTPUT_TEXT: ["scored", "nan", "missing", "had an error", None],
            "toxicity_toxicity": pa.array([0.1, float("nan"), None, None, None], pa.float32()),
            "toxicity_insult": pa.array([0.2, 0.1, None, None, None], pa.float32()),
            S.ERROR: [None, None, None, "stop sequence lost", None],
            S.ERROR_KIND: [None, None, None, "generation", None],
        }
    )
    out = apply_policy(table, 0.5, action, "x")
    assert out.column(S.TOXIC).to_pylist() == [False, None, None, None, None]
    assert out.column(S.TOXICITY_DECISION).to_pylist() == [
        "keep",
        action,
        action,
        action,
        "keep",
    ]
    assert out.column(S.OUTPUT_TEXT).to_pylist() == ["scored", None, None, None, None]
    errors = out.column(S.ERROR).to_pylist()
    assert errors[0] is None and errors[4] is None
    assert "no toxicity score" in errors[1] and "no toxicity score" in errors[2]
    assert errors[3] == "stop sequence lost"  # an earlier error is not overwritten
    kinds = out.column(S.ERROR_KIND).to_pylist()
    assert kinds == [None, "toxicity", "toxicity", "generation", None]
    annotated = apply_policy(table, 0.5, "annotate")
    assert annotated.column(S.OUTPUT_TEXT).equals(table.column(S.OUTPUT_TEXT))
    assert annotated.column(S.ERROR).equals(table.column(S.ERROR))


# Loading safely ------------------------------------------------------------------------------------


class _Payload:
    """Unpickles by calling ``open(marker, "w")``: code that runs if the pickle is trusted."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_checkpoint_needing_code_is_refused_without_running_it(
    tmp_path: Path, checkpoint: Path
) -> None:
    import torch

    marker = tmp_path / "pwned"
    good = torch.load(checkpoint, weights_only=True)
    evil = tmp_path / "evil.ckpt"
    torch.save(
        {"config": good["config"], "state_dict": good["state_dict"], "x": _Payload(marker)}, evil
    )
    with pytest.raises(ValueError, match="weights-only") as info:
        ToxicityScorer(ToxicitySection(checkpoint=str(evil)))
    assert str(evil) in str(info.value)
    assert not marker.exists()

    legacy = tmp_path / "legacy.ckpt"  # the pre-zip format goes through the same check
    torch.save(
        {"config": _Payload(marker), "state_dict": {}}, legacy, _use_new_zipfile_serialization=False
    )
    with pytest.raises(ValueError, match="weights-only"):
        ToxicityScorer(ToxicitySection(checkpoint=str(legacy)))
    assert not marker.exists()


def test_loading_never_unpickles_unsafely(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    calls: list[Any] = []
    original = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    built = build_tiny_detoxify(tmp_path / "before")
    shutil.move(tmp_path / "before", tmp_path / "after")  # model_type rewritten at load time
    for path in (checkpoint, tmp_path / "after" / built.name):
        assert ToxicityScorer(ToxicitySection(checkpoint=str(path))).labels == LABELS
    assert calls and all(c is True for c in calls), calls


def test_checkpoint_without_config_names_itself(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "weights-only.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"weights-only\.ckpt.*config"):
        ToxicityScorer(ToxicitySection(checkpoint=str(path)))


# Inside Ray Data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    with local_ray(num_cpus=2, runtime_env={"env_vars": OFFLINE}):
        yield


def test_stage_in_ray_data_matches_direct_call(ray_cluster: None, checkpoint: Path) -> None:
    import ray

    kwargs = {
        "checkpoint": str(checkpoint),
        "threshold": 0.5,
        "action": "redact",
        "score_inputs": True,
    }
    batch = _batch()
    direct = ToxicityStage(ToxicitySection(**kwargs))(batch)
    dataset = ray.data.from_arrow(batch).map_batches(
        ToxicityStage,
        fn_constructor_kwargs={"settings": ToxicitySection(**kwargs)},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_format="pyarrow",
    )
    result = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    assert result.column_names == direct.column_names
    assert result.column(S.ID).to_pylist() == direct.column(S.ID).to_pylist()
    for name in direct.column_names:
        if pa.types.is_floating(direct.schema.field(name).type):
            np.testing.assert_allclose(
                result.column(name).to_numpy(zero_copy_only=False),
                direct.column(name).to_numpy(zero_copy_only=False),
                atol=1e-5,
            )
        else:
            assert result.column(name).to_pylist() == direct.column(name).to_pylist(), name


def test_remote_checkpoint_loads_with_its_model_dir(
    scorer: ToxicityScorer,
    s3_bucket: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import s3fs

    bucket, options = s3_bucket
    monkeypatch.setenv("RGBATCH_CACHE_DIR", str(tmp_path / "cache"))
    built = build_tiny_detoxify(tmp_path / "upload")
    s3fs.S3FileSystem(**options).put(str(built.parent) + "/", f"{bucket}/detox/", recursive=True)
    shutil.rmtree(built.parent)  # model_type now names a missing local directory
    uri = f"s3://{bucket}/detox/{built.name}"
    remote = ToxicityScorer(ToxicitySection(checkpoint=uri, storage_options=options)).score(TEXTS)
    for label, values in scorer.score(TEXTS).items():
        np.testing.assert_array_equal(remote[label], values)
    cached = [p for p in (tmp_path / "cache" / "objects").iterdir() if p.is_dir()]
    assert [p.name.split("-", 1)[1] for p in cached] == ["tiny-detoxify-original-hf"]
