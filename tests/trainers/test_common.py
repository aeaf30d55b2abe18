import pytest
import torch

from align_distill.teachers.signals import scatter_rows
from align_distill.trainers.common import gather_rows, response_view, student_weights


def test_response_view_aligns_logits_with_next_tokens():
    input_ids = torch.tensor([[5, 6, 7, 8, 0]])
    completion = torch.tensor([[0, 0, 1, 1, 0]])
    logits = torch.arange(5 * 3, dtype=torch.float32).reshape(1, 5, 3)
    aligned, labels, mask = response_view(logits, input_ids, completion)
    assert labels.tolist() == [[6, 7, 8, 0]]
    assert mask.tolist() == [[False, True, True, False]]
    # position 1 of the aligned view is the logits row that predicts token 7, the first response token
    assert torch.equal(aligned[0, 1], logits[0, 1])
    with pytest.raises(ValueError, match="must agree"):
        response_view(logits, input_ids[:, :4], completion[:, :4])


def test_scatter_and_gather_are_inverse_and_check_counts():
    mask = torch.tensor([[False, True, True], [True, False, False]])
    rows = [torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6]])]
    placed = scatter_rows(mask, rows, fill=-1)
    assert placed.tolist() == [[[-1, -1], [1, 2], [3, 4]], [[5, 6], [-1, -1], [-1, -1]]]
    assert [r.tolist() for r in gather_rows(placed, mask)] == [r.tolist() for r in rows]
    with pytest.raises(ValueError, match="batch row 1: signals cover 2 response tokens, the batch has 1"):
        scatter_rows(mask, [rows[0], rows[0]])


def test_student_weights_name_a_tied_lm_head_too(tiny_models):
    """An engine that keys its LM head by name (vLLM) must receive the tied head under `lm_head.weight` as well."""
    from align_distill.models import load_model

    student = load_model(tiny_models["student"], dtype="float32")
    assert student.config.tie_word_embeddings
    weights = dict(student_weights(student))
    assert "lm_head.weight" in weights and "model.embed_tokens.weight" in weights
    assert weights["lm_head.weight"].data_ptr() == weights["model.embed_tokens.weight"].data_ptr()
    assert set(weights) == set(student.state_dict())
