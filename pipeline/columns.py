"""Column names and types of the rows flowing through a job, and of the output rows.

Stages pass ``pyarrow.Table`` batches. Every stage is one-to-one on rows: it adds columns, and a
row that cannot be processed keeps flowing with ``error`` / ``error_kind`` set.
"""

from __future__ import annotations

import pyarrow as pa

# Set by the reader -------------------------------------------------------------------------------
ID = "id"  # str: configured id column, else hash of source file + row content
ROW_KEY = "row_key"  # str: unique and stable per input row (source file, position); resume key
SOURCE = "source"  # str: the input file the row came from
TEXT = "text"  # str | null: the document (summarize) or the context (qa)
QUESTION = "question"  # str | null (qa)
PROMPT = "prompt"  # str | null (generate)
ERROR = "error"  # str | null: what went wrong with this row
ERROR_KIND = "error_kind"  # str | null: one of ERROR_KINDS or a format's (formats.error_kinds())

# A format's reader may add its own columns after these (pipeline.formats), and a row's own
# generation settings (pipeline.request.ROW_SETTINGS).

# Set by prompt building --------------------------------------------------------------------------
TASK = "task"
PROMPT_IDS = "prompt_ids"  # list<int32>: tokenized prompt, BOS included (empty on error)
PROMPT_TOKENS = "prompt_tokens"  # int32
PROMPT_TRUNCATED = "prompt_truncated"  # bool
PREFIX_LEN = "prefix_len"  # int32: leading prompt ids shared with other rows (qa: the document)

# Set by the model stage --------------------------------------------------------------------------
OUTPUT_TEXT = "output_text"  # str | null
OUTPUT_TOKENS = "output_tokens"  # int32
FINISH_REASON = "finish_reason"  # "stop" | "length" | "error"
GENERATED_AT = "generated_at"  # float64: unix time the row's batch left the model stage
# Only when the job may ask for logprobs or n > 1 (generation.logprobs / n, per-row settings):
OUTPUT_LOGPROBS = "output_logprobs"  # list<float32> | null: each output token's log-probability
MEAN_LOGPROB = "mean_logprob"  # float64 | null: their mean
OUTPUT_SAMPLES = "output_samples"  # list<str> | null: the n samples' texts (n > 1; 0 = output_text)
CHOICES = "choices"  # str | null: JSON, per sample its text, finish, tokens and logprobs

# Set by the toxicity stage and policy ------------------------------------------------------------
TOXICITY_PREFIX = "toxicity_"  # toxicity_<label>: float32 | null, one per detoxify label
INPUT_TOXICITY_PREFIX = "input_toxicity_"  # same for the input text when score_inputs is on
TOXIC = "toxic"  # bool | null: any output label >= threshold
TOXICITY_DECISION = "toxicity_decision"  # "keep" | "drop" | "redact"

# Added by the writer -----------------------------------------------------------------------------
MODEL = "model"  # str: checkpoint variant and fingerprint
RUN_ID = "run_id"

# The error kinds every format shares; a format adds its own (Reader.error_kinds).
ERROR_KINDS = (
    "missing_id",  # the configured id column is absent or null (a derived id is used)
    "missing_text",  # the needed column is absent or null
    "not_a_string",  # the needed column holds something else
    "empty_text",  # only whitespace
    "invalid_utf8",  # a JSONL line that is not UTF-8
    "invalid_json",  # a JSONL line that does not parse as an object (or nests too deep)
    "unreadable_file",  # one row per input file whose bytes are corrupt (its other rows kept)
    "invalid_settings",  # the row's input.settings_column value is no valid request body
    "row_too_large",  # a JSONL line over input.max_row_bytes
    "prompt_too_long",  # over the prompt limit with truncation off
    "invalid_constraint",  # the structured-output constraint does not compile
    "generation",  # the engine rejected or failed the request
    "toxicity",  # scoring failed
)

READ_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(ROW_KEY, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string()),
        pa.field(TEXT, pa.string()),
        pa.field(QUESTION, pa.string()),
        pa.field(PROMPT, pa.string()),
        pa.field(ERROR, pa.string()),
        pa.field(ERROR_KIND, pa.string()),
    ]
)


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``table`` with column ``name`` replaced by ``values``, or appended when it is new."""
    index = table.schema.get_field_index(name)
    if index < 0:
        return table.append_column(name, values)
    return table.set_column(index, name, values)
