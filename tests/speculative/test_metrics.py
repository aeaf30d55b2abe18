"""block_efficiency: the closed form against the sum of its series, the limits, and measured runs."""

import pytest
import torch

from align_distill.speculative import block_efficiency, speculative_sample


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.999999])
@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_closed_form_is_the_expected_accepted_prefix_plus_one(alpha, gamma):
    # E[tokens] = Σ_{i=0..γ} α^i: i accepted drafts happen with the previous ones, then one more token
    assert block_efficiency(alpha, gamma) == pytest.approx(sum(alpha**i for i in range(gamma + 1)), rel=1e-6)


def test_limits_and_errors():
    assert block_efficiency(1.0, 5) == 6.0
    assert block_efficiency(0.0, 5) == 1.0
    with pytest.raises(ValueError, match="alpha"):
        block_efficiency(1.5, 2)
    with pytest.raises(ValueError, match="gamma"):
        block_efficiency(0.5, -1)


def test_measured_block_efficiency_matches_the_formula_when_acceptance_is_iid():
    """A target and draft whose rows do not depend on the context: α is the same at every position, so the
    measured tokens per call match (1 − α^(γ+1)) / (1 − α) (long sequences, no EOS)."""
    g = torch.Generator().manual_seed(0)
    p_row, q_row = torch.randn(5, generator=g), torch.randn(5, generator=g)

    def constant(row):
        return lambda ids: row.expand(1, ids.shape[1], -1)

    alpha = float(torch.minimum(p_row.softmax(-1), q_row.softmax(-1)).sum())
    generator = torch.Generator().manual_seed(1)
    _, stats = speculative_sample(constant(p_row), constant(q_row), [0], 3, 3000, generator)
    assert stats.acceptance == pytest.approx(alpha, abs=0.03)
    assert stats.block_efficiency == pytest.approx(block_efficiency(alpha, 3), rel=0.04)
