"""The vector quantizer: nearest codes, the straight-through gradient, EMA updates, dead-code restarts and usage."""

import pytest
import torch

from tokenizer.quantizer import QuantizerConfig, VectorQuantizer, codebook_stats


def plain_quantizer(codebook: list[list[float]], **overrides) -> VectorQuantizer:
    """No projection, no normalisation: the codebook is used exactly as given."""
    config = QuantizerConfig(
        num_codes=len(codebook),
        code_dim=len(codebook[0]),
        l2_normalize=False,
        dead_code_steps=0,
        **overrides,
    )
    quantizer = VectorQuantizer(config, latent_dim=len(codebook[0]))
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor(codebook))
        if config.use_ema:
            quantizer.ema_code_sum.copy_(torch.tensor(codebook))
    return quantizer


def as_latents(vectors: list[list[float]]) -> torch.Tensor:
    """(N, C) vectors -> (1, C, 1, N) latents."""
    return torch.tensor(vectors).t()[None, :, None, :].contiguous()


def test_straight_through_passes_gradient_to_the_encoder():
    quantizer = plain_quantizer([[0.0, 0.0], [10.0, 10.0]])
    latents = as_latents([[1.0, 0.5], [9.0, 8.0]]).requires_grad_()
    out = quantizer(latents)
    (out.quantized * torch.tensor([2.0, 3.0])[None, :, None, None]).sum().backward()
    expected = torch.tensor([2.0, 3.0])[None, :, None, None].expand_as(latents)
    torch.testing.assert_close(latents.grad, expected)
    torch.testing.assert_close(out.quantized.detach(), as_latents([[0.0, 0.0], [10.0, 10.0]]))


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_codes_are_the_nearest_neighbours_in_the_lookup_space(l2_normalize):
    torch.manual_seed(0)
    config = QuantizerConfig(num_codes=32, code_dim=4, l2_normalize=l2_normalize, dead_code_steps=0)
    quantizer = VectorQuantizer(config, latent_dim=16).eval()
    latents = torch.randn(3, 16, 5, 5)
    codes = quantizer(latents).codes  # (3, 5, 5)
    vectors = torch.einsum("bchw,dc->bhwd", latents, quantizer.project_in.weight)
    vectors = vectors + quantizer.project_in.bias
    codebook = quantizer.codebook.detach()
    if l2_normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
    brute_force = torch.cdist(vectors.reshape(-1, 4), codebook).argmin(-1).reshape(3, 5, 5)
    assert torch.equal(codes, brute_force)


def test_beta_weighs_the_commitment_term_not_the_codebook_term():
    quantizer = plain_quantizer([[0.0, 0.0], [10.0, 10.0]], beta=0.25)
    latents = as_latents([[1.0, 0.0]]).requires_grad_()
    out = quantizer(latents)
    # commitment = codebook term = mean((z - e)^2) = (1 + 0) / 2
    torch.testing.assert_close(out.commitment_loss, torch.tensor(0.5))
    torch.testing.assert_close(out.codebook_loss, torch.tensor(0.5))
    out.loss.backward()
    # d/dz [beta * mean((z - sg(e))^2)] = beta * (z - e): the encoder is pulled with beta.
    torch.testing.assert_close(latents.grad.flatten(), torch.tensor([0.25, 0.0]))
    # d/de [mean((sg(z) - e)^2)] = (e - z): the codebook moves at full strength.
    torch.testing.assert_close(quantizer.codebook.grad[0], torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(quantizer.codebook.grad[1], torch.zeros(2))


def test_ema_moves_used_codes_toward_their_latents_and_leaves_others():
    quantizer = plain_quantizer([[0.0, 0.0], [10.0, 10.0]], use_ema=True, ema_decay=0.5)
    assert not quantizer.codebook.requires_grad
    latents = as_latents([[1.0, 1.0], [1.0, 3.0]])  # both nearest to code 0, mean (1, 2)
    out = quantizer.train()(latents)
    assert out.codebook_loss.item() == 0.0
    first = quantizer.codebook[0].clone()
    assert 0.0 < first[0] < 1.0 and 0.0 < first[1] < 2.0
    for _ in range(30):
        quantizer(latents)
    torch.testing.assert_close(quantizer.codebook[0], torch.tensor([1.0, 2.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(quantizer.codebook[1], torch.tensor([10.0, 10.0]), atol=1e-3, rtol=0)


def test_ema_does_not_move_codes_in_eval_mode():
    quantizer = plain_quantizer([[0.0, 0.0], [10.0, 10.0]], use_ema=True, ema_decay=0.5)
    quantizer.eval()(as_latents([[1.0, 1.0]]))
    torch.testing.assert_close(quantizer.codebook[0], torch.zeros(2))


def test_dead_codes_restart_from_recent_encoder_outputs():
    quantizer = plain_quantizer([[0.0, 0.0], [100.0, 100.0], [-100.0, 50.0]])
    quantizer.config.dead_code_steps = 2
    batch = [[1.0, 1.0], [2.0, 0.5], [0.5, 2.0]]  # all nearest to code 0
    quantizer.train()
    quantizer(as_latents(batch))
    assert quantizer.num_restarted.item() == 0
    quantizer(as_latents(batch))
    assert quantizer.num_restarted.item() == 2
    assert torch.equal(quantizer.codebook[0].detach(), torch.zeros(2))
    recent = torch.tensor(batch)
    for code in quantizer.codebook[1:].detach():
        assert (recent == code).all(-1).any(), f"{code} is not one of the batch's latents"
    assert quantizer.steps_unused.tolist() == [0, 0, 0]


def test_usage_and_perplexity_on_a_hand_made_example():
    stats = codebook_stats(torch.tensor([0, 0, 1, 1]), num_codes=4)
    assert stats.usage == 0.5
    assert stats.perplexity == pytest.approx(2.0)
    stats = codebook_stats(torch.tensor([0, 1, 2, 3, 3, 3, 3, 3]), num_codes=8)
    assert stats.usage == 0.5
    probs = torch.tensor([1, 1, 1, 5]) / 8
    assert stats.perplexity == pytest.approx(torch.exp(-(probs * probs.log()).sum()).item())


def test_usage_is_counted_over_a_fixed_window_whatever_the_batch_size():
    codebook = [[float(i), 0.0] for i in range(8)]
    stream = [[float(i % 8), 0.0] for i in range(40)] + [[3.0, 0.0]] * 16
    figures = []
    for batch_size in (2, 8, 28):
        quantizer = plain_quantizer(codebook, usage_window=16).train()
        for start in range(0, len(stream), batch_size):
            quantizer(as_latents(stream[start : start + batch_size]))
        figures.append(quantizer.stats())
    assert all(f == figures[0] for f in figures)
    assert figures[0].usage == 1 / 8 and figures[0].num_counted == 16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_batch_with_a_nonfinite_latent_leaves_the_codebook_state_alone(bad):
    """The training module skips such a step; the quantizer's own state must not move either,
    or a NaN would reach the codebook through the EMA or a dead-code restart."""
    quantizer = plain_quantizer([[0.0, 0.0], [10.0, 10.0], [5.0, -5.0]], use_ema=True)
    quantizer.config.dead_code_steps = 1
    quantizer.train()
    quantizer(as_latents([[0.5, 0.0], [9.0, 9.0]]))  # code 2 unused: dead from here on
    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    quantizer(as_latents([[bad, 0.0], [9.5, 9.5]]))
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} moved on a non-finite batch"
    quantizer(as_latents([[0.5, 0.0], [9.0, 9.0]]))  # a finite batch updates again
    assert quantizer.num_restarted.item() > before["num_restarted"].item()
    assert torch.isfinite(quantizer.codebook).all()
