"""Stage-one losses: the adaptive weight, the hinge GAN and its warm-up, LeCam, edge weighting and LPIPS's weights."""

import pytest
import torch
import torchvision

from tokenizer import VQGAN, LossConfig, MissingWeightsError, VQGANConfig, VQGANLoss
from tokenizer.discriminator import DiscriminatorConfig
from tokenizer.losses import adaptive_gan_weight, edge_map, load_lpips, vgg_checkpoint_path


def loss_config(**overrides) -> LossConfig:
    values = dict(
        perceptual_weight=0.0,
        l2_weight=1.0,
        gan_weight=0.5,
        disc_start_step=10,
        disc_warmup_steps=5,
        discriminator=DiscriminatorConfig(base_channels=8, num_layers=2),
    )
    return LossConfig(**{**values, **overrides})


def test_adaptive_weight_matches_a_hand_computation():
    last_layer = torch.tensor([1.0, 2.0], requires_grad=True)
    reconstruction = (last_layer * torch.tensor([3.0, 4.0])).sum()  # grad (3, 4): norm 5
    gan = (last_layer * torch.tensor([0.6, 0.8])).sum()  # grad (0.6, 0.8): norm 1
    weight = adaptive_gan_weight(reconstruction, gan, last_layer, max_weight=1e4)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad
    clamped = adaptive_gan_weight(reconstruction, gan, last_layer, max_weight=2.0)
    assert clamped.item() == 2.0


def test_adaptive_weight_in_the_loss_is_taken_at_the_decoders_last_layer():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny())
    criterion = VQGANLoss(loss_config())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images)
    loss = criterion.autoencoder_loss(
        images, out.reconstructions, out.quantizer_loss, model.decoder.last_layer, step=15
    )
    last = model.decoder.last_layer
    reconstruction = loss.l1 + loss.l2
    rec_grad = torch.autograd.grad(reconstruction, last, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(loss.gan, last, retain_graph=True)[0]
    expected = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    torch.testing.assert_close(loss.adaptive_weight, expected)
    torch.testing.assert_close(
        loss.total, reconstruction + out.quantizer_loss + 0.5 * expected * loss.gan
    )


def test_gan_term_is_zero_before_its_start_and_the_discriminator_warms_up_first():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny())
    criterion = VQGANLoss(loss_config())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images)
    args = (images, out.reconstructions, out.quantizer_loss, model.decoder.last_layer)

    before = criterion.autoencoder_loss(*args, step=9)
    assert before.gan.item() == 0.0 and before.adaptive_weight.item() == 0.0
    torch.testing.assert_close(before.total, before.l1 + before.l2 + out.quantizer_loss)
    assert criterion.discriminator_loss(images, out.reconstructions, step=9).total.item() == 0.0

    warming = criterion.autoencoder_loss(*args, step=12)  # discriminator trains, AE untouched
    assert warming.gan.item() == 0.0
    disc = criterion.discriminator_loss(images, out.reconstructions, step=12)
    assert disc.total.item() > 0.0
    disc.total.backward()
    assert model.decoder.last_layer.grad is None, "the discriminator step reached the decoder"

    after = criterion.autoencoder_loss(*args, step=15)
    assert after.gan.item() != 0.0 and after.adaptive_weight.item() > 0.0


def test_hinge_loss_on_hand_made_logits():
    criterion = VQGANLoss(loss_config(disc_start_step=0))
    criterion.discriminator = torch.nn.Identity()  # logits are the "images" themselves
    real = torch.tensor([[2.0, 0.5]])
    fake = torch.tensor([[-2.0, 0.0]])
    loss = criterion.discriminator_loss(real, fake, step=0)
    # relu(1 - real) = (0, 0.5) -> 0.25; relu(1 + fake) = (0, 1) -> 0.5
    assert loss.hinge.item() == pytest.approx(0.75)


def test_lecam_running_means_stay_fp32_under_bf16_autocast():
    """The photo presets train with LeCam on; under bf16-mixed the discriminator's logits are
    bf16, and the fp32 running means must still take them."""
    criterion = VQGANLoss(loss_config(disc_start_step=0, lecam_weight=0.1, lecam_decay=0.5))
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion.discriminator_loss(real, fake, step=0)
    assert criterion.ema_logits_real.dtype == torch.float32
    assert criterion.ema_logits_real.item() != 0.0  # the running mean moved toward the logits
    assert torch.isfinite(loss.total) and loss.lecam.item() >= 0.0


def write_fake_vgg_checkpoint(path) -> None:
    """A VGG16 state dict with random conv weights; the unused classifier costs no disk."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {
        name: torch.randn(shape, generator=generator) * 0.05
        if name.startswith("features")
        else torch.zeros(1).expand(shape)
        for name, shape in shapes.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def small_square_image() -> torch.Tensor:
    """A black image (1, 3, 16, 16) with a white 3x3 square at rows and columns 2-4."""
    images = -torch.ones(1, 3, 16, 16)
    images[..., 2:5, 2:5] = 1.0
    return images


def test_edge_map_covers_a_small_shape_and_its_border_and_nothing_flat():
    edges = edge_map(small_square_image())
    assert edges.shape == (1, 1, 16, 16)
    assert edges[..., 2:5, 2:5].eq(1).all()  # every pixel of the 3x3 square
    assert edges[..., 1, 1] == 1 and edges[..., 5, 5] == 1  # the background next to it
    assert edges[..., 8:, :].eq(0).all() and edges[..., :, 8:].eq(0).all()  # far away
    assert edge_map(torch.zeros(2, 3, 8, 8)).eq(0).all()


def test_edge_weight_makes_an_error_on_a_small_shape_cost_more_than_on_the_background():
    images = small_square_image()
    shape_lost = images.clone()
    shape_lost[..., 2:5, 2:5] = -1.0  # the square erased
    background_wrong = images.clone()
    background_wrong[..., 10:13, 10:13] = 1.0  # the same error, far from the square

    def cost(edge_weight: float, reconstructions: torch.Tensor) -> float:
        criterion = VQGANLoss(loss_config(edge_weight=edge_weight))
        zero = torch.zeros(())
        last_layer = torch.zeros(1, requires_grad=True)
        return criterion.autoencoder_loss(images, reconstructions, zero, last_layer, 0).total

    assert cost(0.0, shape_lost) == pytest.approx(cost(0.0, background_wrong).item())
    assert cost(4.0, shape_lost) > 3 * cost(4.0, background_wrong)


def test_lpips_builds_from_a_vgg_checkpoint_in_the_torch_hub_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    write_fake_vgg_checkpoint(vgg_checkpoint_path())
    assert vgg_checkpoint_path().is_relative_to(tmp_path)
    lpips_model = load_lpips(allow_download=False)
    a = torch.rand(1, 3, 32, 32) * 2 - 1
    b = torch.rand(1, 3, 32, 32) * 2 - 1
    assert lpips_model(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert lpips_model(a, b).item() > 0.0
    assert not any(p.requires_grad for p in lpips_model.parameters())

    criterion = VQGANLoss(loss_config(perceptual_weight=1.0, perceptual_download=False))
    terms = criterion.reconstruction_terms(a, b)
    assert terms.perceptual.item() > 0.0


def test_missing_vgg_weights_error_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as error:
        VQGANLoss(loss_config(perceptual_weight=1.0, perceptual_download=False))
    message = str(error.value)
    assert "vgg16-397923af.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "perceptual_weight=0" in message
    VQGANLoss(loss_config(perceptual_weight=0.0, perceptual_download=False))  # no VGG needed
