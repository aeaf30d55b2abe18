"""`align_distill.redaction`: secrets are found by exact field name and by the shape of the value, never by a
substring of a name, so metric and setting names survive."""

from __future__ import annotations

from align_distill.redaction import REDACTED, redact, scrub

HF = "hf_" + "aB3" * 12
SK = "sk-proj-" + "Zx9_" * 6


def test_secret_fields_are_redacted_by_exact_name():
    data = {
        "hub_token": "anything",
        "Token": "x",
        "API-KEY": 12345,
        "backend_kwargs": {"api_key": "sk-123", "base_url": "http://x"},
        "headers": {"Authorization": "Basic dXNlcjpwYXNz", "Accept": "application/json"},
        "openai_api_key": "k",
        "judge_api_key": "k",
        "db_password": "hunter2",
        "client_secret": "c",
        "wandb_access_token": "short",
        "push_to_hub_token": None,
        "token_flag": True,
        "token": True,  # huggingface_hub's "use the stored login"
        "password": "",
    }
    assert redact(data) == {
        "hub_token": REDACTED,
        "Token": REDACTED,
        "API-KEY": REDACTED,
        "backend_kwargs": {"api_key": REDACTED, "base_url": "http://x"},
        "headers": {"Authorization": REDACTED, "Accept": "application/json"},
        "openai_api_key": REDACTED,
        "judge_api_key": REDACTED,
        "db_password": REDACTED,
        "client_secret": REDACTED,
        "wandb_access_token": REDACTED,
        "push_to_hub_token": None,
        "token_flag": True,
        "token": True,
        "password": "",
    }


def test_metric_and_setting_names_that_mention_tokens_are_kept():
    data = {
        "max_new_tokens": 128,
        "num_tokens": 4096.0,
        "mean_token_accuracy": 0.75,
        "adpa/token_advantage": -0.1,
        "train/num_tokens": 12,
        "token_level": "sequence",
        "tokenizer": "Qwen/Qwen2.5-0.5B-Instruct",
        "tokenizer_name_or_path": "/data/tok",
        "max_tokens": 64,
        "secret_santa_count": 3,
        "api_key_env": "MY_KEY",  # the NAME of the environment variable, not the key
        "api_key_env_var": "OPENAI_API_KEY",
        "pad_token": "<|endoftext|>",
        "eos_token": "</s>",
        "image_token": "<image>",
        "response_template_token": "assistant",
        "token_budget": 100,
        "password_file": None,
        "passwords_rotated": 2,
    }
    assert redact(data) == data


def test_token_suffixed_fields_are_redacted_only_when_the_value_looks_like_a_credential():
    assert redact({"wandb_token": "a" * 40})["wandb_token"] == REDACTED
    assert redact({"github_token": "Abc.def-ghi_jkl~123"})["github_token"] == REDACTED
    assert redact({"unk_token": "<unk>"})["unk_token"] == "<unk>"
    assert redact({"sep_token": "[SEP]"})["sep_token"] == "[SEP]"
    assert redact({"bos_token": "<|begin_of_text|>"})["bos_token"] == "<|begin_of_text|>"


def test_credential_shaped_values_are_redacted_under_any_key():
    data = {
        "note": f"retry with {HF} later",
        "teachers": [{"model": "a", "url": f"https://x?key={SK}"}],
        "header_line": "Authorization: Bearer eyJhbGciOi.J9.abc",
        "gh": "ghp_" + "A1" * 18,
        "aws": "AKIA" + "ABCDEFGHIJKLMNOP",
        "tuple": (HF, 3),
    }
    assert redact(data) == {
        "note": f"retry with {REDACTED} later",
        "teachers": [{"model": "a", "url": f"https://x?key={REDACTED}"}],
        "header_line": f"Authorization: Bearer {REDACTED}",
        "gh": REDACTED,
        "aws": REDACTED,
        "tuple": [REDACTED, 3],
    }


def test_lookalikes_that_are_not_credentials_are_kept():
    kept = [
        "task-classification-and-generation",  # `sk-` inside a word
        "disk-cache-directory-for-the-store",
        "hf_internal_testing/tiny-random-gpt2",  # hf_ followed by a short word
        "runs/quickstart/student_sft",
        "sha256:" + "0123456789abcdef" * 4,  # fingerprints stay
        "The bearer of this card",
        "mean_token_accuracy",
    ]
    for text in kept:
        assert redact(text) == text
        assert redact({"metric": text}) == {"metric": text}


def test_scrub_replaces_known_secrets_and_credential_shapes():
    assert scrub("login failed for s3cr3t-value, then " + HF, ["s3cr3t-value", None, ""]) == (
        f"login failed for {REDACTED}, then {REDACTED}"
    )
    assert scrub("max_new_tokens=128 num_tokens=9", []) == "max_new_tokens=128 num_tokens=9"
