"""Dataset formats, loading and validation.

Formats (TRL's standard ones, plain text or conversational):
- `preference`: prompt, chosen, rejected (conversational rows may leave the prompt implicit in chosen/rejected),
- `prompt`: prompt,
- `ranking`: prompt, completions (>= 2), ranking (indices, best first) and/or scores (one per completion).
An optional unique `id` column is kept (as strings); when absent, a content-hash id is added.
"""

from .formats import FORMATS, ROLES, FormatSchema, get_format
from .loading import load_rows, read_records
from .prepare import load_dataset_for, validate_command
from .problems import DataProblem, DataValidationError
from .validation import ValidationReport, content_id, validate

__all__ = [
    "FORMATS",
    "ROLES",
    "DataProblem",
    "DataValidationError",
    "FormatSchema",
    "ValidationReport",
    "content_id",
    "get_format",
    "load_dataset_for",
    "load_rows",
    "read_records",
    "validate",
    "validate_command",
]
