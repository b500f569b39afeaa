"""The thought sampler draws from the exact softmax: every token with a non-negligible probability is reachable."""

import pytest
import torch

from quietstar.quiet_star.thought_sampler import SAMPLING_BLOCK, choose_tokens, invert_cdf


def midpoint_uniforms(probs: torch.Tensor) -> torch.Tensor:
    """For each token k of ``probs`` [V], the two uniforms that land in the middle of its interval: [V, 2]."""
    vocab = probs.shape[0]
    p = probs.double()
    blocks = [p[i : i + SAMPLING_BLOCK] for i in range(0, vocab, SAMPLING_BLOCK)]
    masses = torch.stack([b.sum() for b in blocks])
    block_start = torch.cat([torch.zeros(1, dtype=torch.float64), masses.cumsum(0)[:-1]])
    rows = []
    for k in range(vocab):
        b = k // SAMPLING_BLOCK
        inside = blocks[b]
        inside_start = inside[: k % SAMPLING_BLOCK].sum()
        rows.append([(block_start[b] + masses[b] / 2) / masses.sum(), (inside_start + inside[k % SAMPLING_BLOCK] / 2) / masses[b]])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("vocab", [3 * SAMPLING_BLOCK, 3 * SAMPLING_BLOCK + 17])
def test_every_token_down_to_1e_minus_12_is_reachable(vocab):
    # One token holds nearly all the mass; the others are 1e-12 each, far below the 6e-8 step of an
    # fp32 CDF near 1, which can never select them.
    probs = torch.full((vocab,), 1e-12)
    probs[5] = 1.0 - 1e-12 * (vocab - 1)
    chosen = invert_cdf(probs.expand(vocab, vocab), midpoint_uniforms(probs))
    assert chosen.tolist() == list(range(vocab))
    fp32_cdf = probs.cumsum(0)
    assert (fp32_cdf[6:] == fp32_cdf[5]).all()  # what a single fp32 CDF makes of the same tail


def test_zero_probability_tokens_are_never_chosen():
    probs = torch.zeros(2 * SAMPLING_BLOCK + 3)
    probs[[0, SAMPLING_BLOCK + 1, 2 * SAMPLING_BLOCK + 2]] = torch.tensor([0.2, 0.5, 0.3])
    edges = torch.tensor([[0.0, 0.0], [0.0, 1 - 1e-16], [1 - 1e-16, 0.0], [1 - 1e-16, 1 - 1e-16], [0.2, 0.0], [0.7, 0.99]], dtype=torch.float64)
    chosen = invert_cdf(probs.expand(len(edges), -1), edges)
    assert set(chosen.tolist()) <= {0, SAMPLING_BLOCK + 1, 2 * SAMPLING_BLOCK + 2}


def test_draws_follow_the_softmax_chi_square_and_total_variation():
    torch.manual_seed(0)
    vocab, draws, temperature = 700, 100_000, 1.3
    logits = torch.randn(vocab) * 3
    logits[:40] += 25.0  # most mass on a few tokens, a long thin tail: where rounding would bite
    chosen = choose_tokens(logits.expand(draws, vocab), False, temperature, torch.Generator().manual_seed(1))
    counts = torch.bincount(chosen, minlength=vocab).double()
    exact = torch.softmax(logits.double() / temperature, dim=-1)
    total_variation = 0.5 * (counts / draws - exact).abs().sum()
    assert total_variation < 0.01
    # Chi-square over the cells with an expected count >= 5, the rest pooled into one cell.
    expected = exact * draws
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = observed.numel() - 1
    assert statistic < dof + 5 * (2 * dof) ** 0.5  # about a 1e-5 false-alarm rate


def test_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(4, 6, 1000)
    a = choose_tokens(logits, False, 1.0, torch.Generator().manual_seed(3))
    b = choose_tokens(logits, False, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 6)
    assert torch.equal(choose_tokens(logits, True, 1.0, None), logits.argmax(-1))
