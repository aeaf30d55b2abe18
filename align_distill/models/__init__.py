"""Loading students, teachers and references; tokenizer/vocabulary checks; layer-dropped students; GGUF import."""

from align_distill.models.gguf_import import import_gguf, import_gguf_command
from align_distill.models.loading import (
    LoraSettings,
    SafetensorsRequiredError,
    freeze,
    load_model,
    load_tokenizer,
    write_model_folder,
)
from align_distill.models.shrink import parse_layer_spec, shrink_command, shrink_model
from align_distill.models.vocab import (
    TokenizerMismatchError,
    check_model_vocab,
    check_tokenizer_compatibility,
    shared_vocab_size,
    slice_logits_to_vocab,
)

__all__ = [
    "LoraSettings",
    "SafetensorsRequiredError",
    "TokenizerMismatchError",
    "check_model_vocab",
    "check_tokenizer_compatibility",
    "freeze",
    "import_gguf",
    "import_gguf_command",
    "load_model",
    "load_tokenizer",
    "parse_layer_spec",
    "shared_vocab_size",
    "shrink_command",
    "shrink_model",
    "slice_logits_to_vocab",
    "write_model_folder",
]
