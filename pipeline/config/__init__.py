"""The job configuration: pydantic models, loading (YAML + ``--set`` + ``${VAR}``), preflight.

A job config is validated completely before any work starts, and every problem is reported as a
:class:`ConfigError` whose message has one ``<field.path>: <what is wrong>`` line per problem.

Loading (:func:`load_job_config`) goes: YAML -> ``--set`` overrides -> ``${VAR}`` interpolation
-> pydantic validation -> rendering of ``{date}`` / ``{run_id}`` in the URIs.

Raw and rendered URIs
    ``input.uri``, ``output.uri`` and ``run.checkpoint_uri`` may hold ``{date}`` and ``{run_id}``
    placeholders. ``JobConfig.model_validate(data)`` gives an *unrendered* config: those fields
    hold the templates. :meth:`JobConfig.rendered` returns a copy whose fields hold the rendered
    URIs (what every stage reads) and which remembers the templates (:attr:`JobConfig.templates`),
    the :attr:`JobConfig.run_id` and the :attr:`JobConfig.date` it was rendered with. Rendering a
    rendered config again starts from the remembered templates, so it never renders twice.
    :func:`load_job_config` returns a rendered config.

Interpolated values
    :func:`load_job_config` records the dotted path of every string that contained ``${...}``
    (:attr:`JobConfig.interpolated_paths`, e.g. ``output.storage_options.secret`` or
    ``input.passthrough.0``); copies made by :meth:`JobConfig.rendered` keep that record, and
    :func:`redacted_dict` masks those paths.

Layout
    :mod:`pipeline.config.schema`
        the sections and :class:`JobConfig` (fields, validators, rendering), :class:`ConfigError`
        and the allowed values: one ``Literal`` per set (:data:`Task`, ...) and the tuples
        derived from it (:data:`TASKS`, ...), for other modules to check against.
    :mod:`pipeline.config.loading`
        :func:`load_job_config`, :func:`apply_overrides`, :func:`interpolate_env`,
        :func:`check_plan` (the checks that need the plan's declared columns),
        :func:`check_expanded_size` (the bound on YAML aliases), :func:`new_run_id` and
        :func:`redacted_dict`.
    :mod:`pipeline.config.preflight`
        :func:`list_files` and :func:`preflight` (storage checks under one deadline).

Every public name of those modules is importable from ``pipeline.config``.
"""

from __future__ import annotations

from pipeline.config.loading import (
    MASK,
    MAX_DEPTH,
    MAX_EXPANDED_CHARS,
    MAX_EXPANDED_VALUES,
    apply_overrides,
    check_expanded_size,
    check_plan,
    interpolate_env,
    load_job_config,
    new_run_id,
    parse_override_value,
    redacted_dict,
)
from pipeline.config.preflight import configured_columns, input_columns, list_files, preflight
from pipeline.config.schema import (
    CONTENT_IDENTITY,
    DOCUMENT_PLACEHOLDER,
    DTYPES,
    IDENTITY,
    INPUT_FORMATS,
    INT32,
    INT32_MAX,
    NOT_IDENTITY,
    OUTPUT_FORMATS,
    PROMPT_PLACEHOLDERS,
    ROOT,
    TASKS,
    TOXICITY_ACTIONS,
    TOXICITY_MODELS,
    TRUNCATIONS,
    URI_FIELDS,
    URI_PLACEHOLDERS,
    ConfigError,
    Dtype,
    GenerationSection,
    InputFormat,
    InputSection,
    Int32,
    JobConfig,
    ModelSection,
    OutputFormat,
    OutputSection,
    PromptsSection,
    RunSection,
    StructuredOutputSection,
    Task,
    ToxicityAction,
    ToxicityModel,
    ToxicitySection,
    Truncation,
    infer_format,
)

__all__ = [
    "CONTENT_IDENTITY",
    "DOCUMENT_PLACEHOLDER",
    "DTYPES",
    "IDENTITY",
    "INPUT_FORMATS",
    "INT32",
    "INT32_MAX",
    "MASK",
    "MAX_DEPTH",
    "MAX_EXPANDED_CHARS",
    "MAX_EXPANDED_VALUES",
    "NOT_IDENTITY",
    "OUTPUT_FORMATS",
    "PROMPT_PLACEHOLDERS",
    "ROOT",
    "TASKS",
    "TOXICITY_ACTIONS",
    "TOXICITY_MODELS",
    "TRUNCATIONS",
    "URI_FIELDS",
    "URI_PLACEHOLDERS",
    "ConfigError",
    "Dtype",
    "GenerationSection",
    "InputFormat",
    "InputSection",
    "Int32",
    "JobConfig",
    "ModelSection",
    "OutputFormat",
    "OutputSection",
    "PromptsSection",
    "RunSection",
    "StructuredOutputSection",
    "Task",
    "ToxicityAction",
    "ToxicityModel",
    "ToxicitySection",
    "Truncation",
    "apply_overrides",
    "check_expanded_size",
    "check_plan",
    "configured_columns",
    "infer_format",
    "input_columns",
    "interpolate_env",
    "list_files",
    "load_job_config",
    "new_run_id",
    "parse_override_value",
    "preflight",
    "redacted_dict",
]
