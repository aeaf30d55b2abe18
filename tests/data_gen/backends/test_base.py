"""`TokenScores`: numpy arrays of fixed dtypes and shapes whatever a backend hands it, and exact equality."""

from __future__ import annotations

import math

import numpy as np

from align_distill.data_gen.backends.base import TokenScores


def test_token_scores_hold_arrays_from_lists_and_views():
    # as the vLLM / OpenAI backends build it: Python lists per position
    listed = TokenScores([-0.5, -1.25], [[3, 4], [5, 6]], [[-0.1, -2.0], [-0.3, -math.inf]], [-3.0, -4.0])
    assert listed.topk_ids.dtype == np.int64 and listed.topk_ids.shape == (2, 2)
    assert listed.topk_logprobs.dtype == np.float64 and listed.topk_logprobs.shape == (2, 2)
    assert listed.token_logprobs.dtype == listed.rest_logmass.dtype == np.float64
    # as the transformers backend builds it: views of one batch's float32-valued arrays
    batch = np.array([[-0.1, -2.0], [-0.3, -np.inf]], dtype=np.float32)
    viewed = TokenScores(
        np.array([-0.5, -1.25], dtype=np.float32).astype(np.float64),
        np.array([[3, 4], [5, 6]]),
        batch.astype(np.float64),
        np.array([-3.0, -4.0]),
    )
    # float64 keeps a float32 value exactly, as the Python float of `.tolist()` did
    assert viewed.topk_logprobs[0, 0] == float(np.float32(-0.1)) != -0.1
    assert viewed != listed and viewed == TokenScores(**{k: getattr(viewed, k) for k in vars(viewed)})
    assert listed == TokenScores(listed.token_logprobs, listed.topk_ids.tolist(), listed.topk_logprobs, [-3, -4])
    assert sum(listed.token_logprobs) == -1.75 and isinstance(sum(listed.token_logprobs), float)  # a judge's total


def test_an_empty_response_has_zero_by_zero_tables():
    empty = TokenScores([], [], [], [])
    assert empty.topk_ids.shape == empty.topk_logprobs.shape == (0, 0)
    assert empty.token_logprobs.shape == empty.rest_logmass.shape == (0,)
    assert empty == TokenScores(np.zeros(0), np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0)), np.zeros(0))
