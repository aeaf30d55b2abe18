import pytest
import torch

from align_distill.losses import masked_mean, sequence_logps
from align_distill.losses.reduction import token_logps


def test_masked_mean_reductions_match_loops():
    torch.manual_seed(0)
    values = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    counted = [values[b, t].item() for b in range(3) for t in range(5) if mask[b, t]]
    assert masked_mean(values, mask).item() == pytest.approx(sum(counted) / len(counted))
    assert masked_mean(values, mask, "sum").item() == pytest.approx(sum(counted))
    per_seq = [values[b][mask[b]].mean().item() for b in range(2)]  # row 2 has no tokens and is skipped
    assert masked_mean(values, mask, "sequence_mean").item() == pytest.approx(sum(per_seq) / 2)
    assert torch.equal(masked_mean(values, mask, "none")[2], torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown reduction"):
        masked_mean(values, mask, "mean")
    with pytest.raises(ValueError, match="same shape"):
        masked_mean(values, mask[:, :2])


def test_sequence_logps_matches_loop_and_bf16():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(4):
            if mask[b, t]:
                total += torch.log_softmax(logits[b, t].double(), -1)[labels[b, t]].item()
        expected.append(total)
    got = sequence_logps(logits, labels, mask)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    avg = sequence_logps(logits, labels, mask, average=True)
    assert avg.tolist() == pytest.approx([expected[0] / 3, expected[1] / 3], abs=1e-5)
    bf16 = token_logps(logits.bfloat16(), labels)
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, token_logps(logits.bfloat16().float(), labels))
