"""Toxicity scoring with detoxify, and the keep / drop / redact policy.

``ToxicityScorer`` wraps one ``detoxify.Detoxify`` object, created once. ``ToxicityStage`` is the
Ray Data stage built on it (``map_batches(ToxicityStage, compute=ActorPoolStrategy(...),
batch_format="pyarrow")``): it adds a ``toxicity_<label>`` float32 column per label of the loaded
model for ``output_text`` (and ``input_toxicity_<label>`` for the input text when asked), then
``apply_policy`` sets ``toxic`` and ``toxicity_decision``. Rows are never added, removed or
reordered; a batch whose scoring fails keeps flowing with ``error_kind="toxicity"``. Under drop and
redact the policy fails closed: an output with no score leaves without its text (see
``apply_policy``).

Checkpoints. ``checkpoint=None`` loads a named detoxify model ("original", "unbiased", ...), which
detoxify downloads from its GitHub releases and loads itself. Otherwise ``checkpoint`` is a local
path or fsspec URI of a detoxify checkpoint (``torch.save`` of ``{"config": ..., "state_dict":
...}``); remote ones are copied into the local cache. Such a checkpoint is loaded weights-only
(``torch.load(weights_only=True)``: dicts, lists, strings, numbers and tensors, no code from the
file runs) and the model is built from the loaded dict with detoxify's own
``get_model_and_tokenizer``; detoxify's loader, which unpickles without that restriction, is never
given the file. A checkpoint that needs anything else is refused with an error naming it.
detoxify builds the transformers config and tokenizer with
``from_pretrained(config.arch.args.model_type)``, so offline that value must name a local directory
with ``config.json`` and the tokenizer files. When it does not (the directory was moved, or it is a
hub name such as ``bert-base-uncased``) and a directory with the same base name sits beside the
checkpoint, ``model_type`` is rewritten to that directory at load time, in memory only.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from model.storage import is_local, localize
from pipeline import columns as S
from pipeline.config.schema import TOXICITY_ACTIONS, ToxicitySection
from pipeline.secrets import mask_text, mask_uri
from pipeline.stage import PlanContext, Stage, declares

if TYPE_CHECKING:
    from pipeline.config import JobConfig

log = logging.getLogger(__name__)

# Decisions: KEEP for rows the policy lets through, else the action's name ("drop", "redact").
KEEP = "keep"

# detoxify's renaming of the raw Jigsaw class names, as its load_checkpoint does it.
_STANDARD_LABELS = {
    "toxic": "toxicity",
    "identity_hate": "identity_attack",
    "severe_toxic": "severe_toxicity",
}

# What a detoxify checkpoint must hold (detoxify reads these), and its layout for error messages.
_REQUIRED_KEYS = (
    ("state_dict",),
    ("config", "arch", "args", "model_type"),
    ("config", "dataset", "args", "classes"),
)
_LAYOUT = (
    "{'config': {'arch': {'args': {model_type, model_name, tokenizer_name, num_classes}}, "
    "'dataset': {'args': {'classes': [...]}}}, 'state_dict': {name: tensor}}"
)

# transformers model types whose position ids start after the padding index.
_POSITION_OFFSET_MODELS = ("roberta", "xlm-roberta", "camembert")


class ToxicityScorer:
    """Scores texts with one detoxify model, loaded once, as the ``toxicity`` section says.

    ``settings.model`` names a released detoxify model and is used only when
    ``settings.checkpoint`` is None (read through fsspec with ``settings.storage_options``).
    ``settings.batch_size`` texts go through the model at once. Every default is the section's.
    """

    def __init__(self, settings: ToxicitySection, device: str = "cpu") -> None:
        from detoxify import Detoxify
        from detoxify.detoxify import MODEL_URLS

        model, checkpoint = settings.model, settings.checkpoint
        if checkpoint is None and model not in MODEL_URLS:
            raise ValueError(f"unknown detoxify model {model!r}; known: {sorted(MODEL_URLS)}")
        self.batch_size = settings.batch_size
        if checkpoint is None:
            self._detoxify = Detoxify(model_type=model, device=device)
        else:
            options = settings.storage_options
            self._detoxify = _detoxify_from_checkpoint(checkpoint, options, device)
        _cap_max_length(self._detoxify.tokenizer, self._detoxify.model.config)
        self._labels = tuple(self._detoxify.class_names)

    @property
    def labels(self) -> tuple[str, ...]:
        """The model's labels, in detoxify's standard names (``toxicity``, ``insult``, ...)."""
        return self._labels

    def score(self, texts: Sequence[str | None]) -> dict[str, np.ndarray]:
        """Returns one float32 array per label, aligned with ``texts``; None texts score NaN."""
        scores = {label: np.full(len(texts), np.nan, np.float32) for label in self._labels}
        # Similar lengths together: detoxify pads each call to its longest text.
        order = sorted(
            (i for i, t in enumerate(texts) if t is not None), key=lambda i: len(texts[i])
        )
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            result = self._detoxify.predict([texts[i] for i in rows])
            for label in self._labels:
                # predict() squeezes: a single text gives a float instead of a list.
                scores[label][rows] = np.atleast_1d(np.asarray(result[label], np.float32))
        return scores


class ToxicityStage:
    """Ray Data stage: scores ``output_text`` (and optionally the input) and applies the policy.

    Built from the job config's ``toxicity`` section (its settings and defaults): the scorer is
    :class:`ToxicityScorer` on ``device``; a row is toxic when any output label scores >=
    ``threshold``, and ``action`` decides what happens to it.
    """

    def __init__(self, settings: ToxicitySection, device: str = "cpu") -> None:
        _check_policy(settings.threshold, settings.action)
        self.threshold = settings.threshold
        self.action = settings.action
        self.score_inputs = settings.score_inputs
        self.redaction_text = settings.redaction_text
        self.scorer = ToxicityScorer(settings, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        scored = score_table(batch, self.scorer, score_inputs=self.score_inputs)
        return apply_policy(
            scored, self.threshold, self.action, self.redaction_text, labels=self.scorer.labels
        )


def score_table(table: pa.Table, scorer: ToxicityScorer, *, score_inputs: bool = False) -> pa.Table:
    """Adds the ``toxicity_<label>`` (and ``input_toxicity_<label>``) float32 columns.

    Null texts get null scores. If the scorer raises, every row with a text gets null scores and,
    unless it already has one, an error of kind ``toxicity``.
    """
    outputs = table.column(S.OUTPUT_TEXT).to_pylist()
    inputs = _input_texts(table) if score_inputs else []
    texts = outputs + inputs
    try:
        scores = scorer.score(texts)
    except Exception as exc:
        log.exception("toxicity scoring failed for a batch of %d rows", table.num_rows)
        scores = {label: np.full(len(texts), np.nan, np.float32) for label in scorer.labels}
        row_inputs = inputs or [None] * len(outputs)
        has_text = [
            o is not None or i is not None for o, i in zip(outputs, row_inputs, strict=True)
        ]
        table = _mark_errors(
            table,
            pa.array(has_text, pa.bool_()),
            mask_text(f"toxicity scoring failed: {type(exc).__name__}: {exc}"),
        )
        texts = [None] * len(texts)
    n = table.num_rows
    columns = [(S.TOXICITY_PREFIX, 0)]
    if score_inputs:
        columns.append((S.INPUT_TOXICITY_PREFIX, n))
    for prefix, offset in columns:
        missing = np.array([t is None for t in texts[offset : offset + n]], dtype=bool)
        for label in scorer.labels:
            values = pa.array(scores[label][offset : offset + n], pa.float32(), mask=missing)
            table = S.set_column(table, prefix + label, values)
    return table


def apply_policy(
    table: pa.Table,
    threshold: float,
    action: str,
    redaction_text: str | None = None,
    labels: Sequence[str] | None = None,
) -> pa.Table:
    """Sets ``toxic`` and ``toxicity_decision`` from the ``toxicity_<label>`` columns.

    ``toxic`` is true when any label scores >= ``threshold``, else null when a label has no score
    (null or NaN), else false. annotate keeps every row as it is. drop marks toxic rows "drop" (the
    writer sends them to rejected/); redact marks them "redact" and replaces their ``output_text``
    with ``redaction_text`` (default: the config's ``toxicity.redaction_text``). ``labels`` defaults to every float column named ``toxicity_<label>``.

    Under drop and redact the policy fails closed: a row with an ``output_text`` but no verdict
    (``toxic`` null, e.g. its batch failed to score) is treated like a toxic one, not kept: its
    decision is the action's ("drop" sends it to rejected/, "redact" keeps it in place), its
    ``output_text`` becomes null (not ``redaction_text``: there was no verdict to redact for), and
    unless it already has an error it gets one of kind ``toxicity``. So it appears once, as an
    error row, and its unchecked text is written nowhere. Rows without an output are kept.
    """
    _check_policy(threshold, action)
    if redaction_text is None:
        redaction_text = ToxicitySection.model_fields["redaction_text"].default
    names = _score_columns(table) if labels is None else [S.TOXICITY_PREFIX + x for x in labels]
    if not names:
        raise ValueError(f"no {S.TOXICITY_PREFIX}<label> columns to apply the policy to")
    toxic = None
    for name in names:
        scores = table.column(name)
        scores = pc.if_else(pc.is_nan(scores), pa.scalar(None, scores.type), scores)
        hit = pc.greater_equal(scores, pa.scalar(float(threshold)))
        toxic = hit if toxic is None else pc.or_kleene(toxic, hit)
    table = S.set_column(table, S.TOXIC, toxic)
    if action == "annotate":
        decision = pa.array([KEEP] * table.num_rows, pa.string())
        return S.set_column(table, S.TOXICITY_DECISION, decision)
    text = table.column(S.OUTPUT_TEXT).cast(pa.string())
    unscored = pc.and_(pc.is_valid(text), pc.is_null(toxic))
    acted = pc.or_(pc.fill_null(toxic, False), unscored)
    decision = pc.if_else(acted, pa.scalar(action), pa.scalar(KEEP))
    withhold = pc.any(unscored).as_py()
    if action == "redact":
        text = pc.if_else(pc.fill_null(toxic, False), pa.scalar(redaction_text), text)
    if withhold:
        text = pc.if_else(unscored, pa.scalar(None, pa.string()), text)
        table = _mark_errors(
            table, unscored, f"no toxicity score for this output; text withheld ({action})"
        )
    if action == "redact" or withhold:
        table = S.set_column(table, S.OUTPUT_TEXT, text)
    return S.set_column(table, S.TOXICITY_DECISION, decision)


# Loading ------------------------------------------------------------------------------------------


def _detoxify_from_checkpoint(uri: str, storage_options: dict[str, Any] | None, device: str) -> Any:
    """A ``Detoxify`` built from a checkpoint loaded weights-only (see the module docstring)."""
    import transformers
    from detoxify import Detoxify
    from detoxify.detoxify import get_model_and_tokenizer

    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar per actor
    checkpoint = _load_weights_only(uri, storage_options)
    args = dict(checkpoint["config"]["arch"]["args"])
    model_dir = _model_dir_beside(uri, str(args["model_type"]), storage_options)
    if model_dir is not None:
        log.info(
            "detoxify model_type %r rewritten to %s", args["model_type"], mask_uri(str(model_dir))
        )
        args["model_type"] = str(model_dir)
    model, tokenizer = get_model_and_tokenizer(**args, state_dict=checkpoint["state_dict"])
    classes = checkpoint["config"]["dataset"]["args"]["classes"]
    # What Detoxify.__init__ sets after its own load_checkpoint, which is bypassed here.
    detoxify = Detoxify.__new__(Detoxify)
    detoxify.model = model.to(device)
    detoxify.tokenizer = tokenizer
    detoxify.class_names = [_STANDARD_LABELS.get(c, c) for c in classes]
    detoxify.device = device
    return detoxify


def _load_weights_only(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint dict, unpickled with torch's weights-only unpickler; checked for its keys."""
    import torch

    path = localize(uri, storage_options=storage_options)
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(exc))
        raise ValueError(
            f"detoxify checkpoint {mask_uri(uri)} is not a weights-only checkpoint "
            f"({found.group(1).rstrip('.') if found else exc}). Only weights-only checkpoints are loaded "
            "(dicts, lists, strings, numbers and tensors), because unpickling anything else runs "
            "code from the file. Re-save it on a trusted machine as torch.save({'config': "
            "plain values, 'state_dict': tensors})."
        ) from None
    for keys in _REQUIRED_KEYS:
        node: Any = loaded
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                where = "".join(f"[{k!r}]" for k in keys[: depth + 1])
                raise ValueError(
                    f"detoxify checkpoint {mask_uri(uri)} has no {where}; expected {_LAYOUT}"
                )
            node = node[key]
    return loaded


def _model_dir_beside(
    checkpoint_uri: str, model_type: str, storage_options: dict[str, Any] | None
) -> Path | None:
    """A directory named like ``model_type`` beside the checkpoint, if ``model_type`` is not one."""
    if os.path.isdir(model_type):
        return None
    name = Path(model_type).name
    if is_local(checkpoint_uri):
        sibling = str(Path(checkpoint_uri.removeprefix("file://")).parent / name)
    else:
        sibling = checkpoint_uri.rstrip("/").rsplit("/", 1)[0] + "/" + name
    try:
        local = localize(sibling, storage_options=storage_options)
    except FileNotFoundError:
        return None
    return local if local.is_dir() else None


def _cap_max_length(tokenizer: Any, config: Any) -> None:
    """Keeps truncation within the model's position embeddings (unset model_max_length is 1e30)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    if getattr(config, "model_type", None) in _POSITION_OFFSET_MODELS:
        limit -= (config.pad_token_id or 0) + 1
    if tokenizer.model_max_length > limit:
        log.warning(
            "tokenizer model_max_length %s exceeds the model's %d positions; truncating at %d",
            tokenizer.model_max_length,
            limit,
            limit,
        )
        tokenizer.model_max_length = limit


# Table helpers ------------------------------------------------------------------------------------


def _check_policy(threshold: float, action: str) -> None:
    if action not in TOXICITY_ACTIONS:
        raise ValueError(f"action must be one of {TOXICITY_ACTIONS}, got {action!r}")
    if not isinstance(threshold, int | float) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")


def _input_texts(table: pa.Table) -> list[str | None]:
    """The input of each row: ``text`` when set, else ``prompt`` (generate rows)."""
    names = [c for c in (S.TEXT, S.PROMPT) if c in table.column_names]
    if not names:
        return [None] * table.num_rows
    merged = pc.coalesce(*(table.column(c).cast(pa.string()) for c in names))
    return merged.to_pylist()


def _score_columns(table: pa.Table) -> list[str]:
    return [
        field.name
        for field in table.schema
        if field.name.startswith(S.TOXICITY_PREFIX)
        and field.name != S.TOXICITY_DECISION
        and pa.types.is_floating(field.type)
    ]


def _mark_errors(table: pa.Table, rows: pa.Array, message: str) -> pa.Table:
    """Sets ``error`` and ``error_kind="toxicity"`` on ``rows`` that have no error yet."""
    for name in (S.ERROR, S.ERROR_KIND):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    error = table.column(S.ERROR).cast(pa.string())
    set_here = pc.and_(rows, pc.is_null(error))
    new_error = pc.if_else(set_here, pa.scalar(message), error)
    kind = pc.if_else(set_here, pa.scalar("toxicity"), table.column(S.ERROR_KIND).cast(pa.string()))
    table = S.set_column(table, S.ERROR, new_error)
    return S.set_column(table, S.ERROR_KIND, kind)


# Stage ----------------------------------------------------------------------------------------------


TOXICITY_ADDS = (
    S.TOXICITY_PREFIX + "*",
    S.INPUT_TOXICITY_PREFIX + "*",
    S.TOXIC,
    S.TOXICITY_DECISION,
    S.ERROR,
    S.ERROR_KIND,
)
"""Every column the toxicity stage may add (the input scores only with score_inputs)."""


@declares(*TOXICITY_ADDS)
def toxicity_stage(config: JobConfig, context: PlanContext) -> Stage | None:
    """Scoring and the policy in a pool of detoxify actors; None when scoring is off."""
    tox = config.toxicity
    if not tox.enabled:
        return None
    skipped = () if tox.score_inputs else (S.INPUT_TOXICITY_PREFIX + "*",)
    return Stage(
        name="toxicity",
        fn=ToxicityStage,
        requires=(S.OUTPUT_TEXT, *((S.TEXT, S.PROMPT) if tox.score_inputs else ())),
        adds=tuple(c for c in TOXICITY_ADDS if c not in skipped),
        constructor_kwargs=dict(settings=tox, device="cuda" if tox.gpus_per_replica else "cpu"),
        ray_args=dict(
            compute=ray.data.ActorPoolStrategy(size=tox.replicas),
            num_gpus=tox.gpus_per_replica or None,
            num_cpus=tox.cpus_per_replica,
            batch_size=tox.batch_size,
        ),
    )
