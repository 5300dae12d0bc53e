"""The UNet: SD v1.5's exact size, shapes, timesteps, context, attention maps.

Equality with diffusers' UNet2DConditionModel is in test_port.py.
"""

import pytest
import torch

from sdscratch.attention import record_attention
from sdscratch.checkpoint import load_component, save_component
from sdscratch.unet import UNet, UNetConfig

TINY = UNetConfig(
    in_channels=3,
    out_channels=3,
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_levels=(False, True),
    cross_attention_dim=12,
    num_heads=2,
    norm_num_groups=8,
)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_default_config_is_sd15_with_its_parameter_count():
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    assert count(unet) == 859_520_964  # diffusers' count for SD v1.5's UNet
    assert count(unet.down_blocks[3]) == count(unet.down_blocks[2].resnets[1]) * 2
    assert len(unet.up_blocks[0].resnets) == 3 and not unet.up_blocks[0].attentions


def test_output_has_the_input_shape_and_any_timestep_form():
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    x, context = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        eps = unet(x, torch.tensor([7, 7]), context)
        assert eps.shape == x.shape
        assert torch.equal(unet(x, 7, context), eps)
        assert torch.equal(unet(x, torch.tensor(7), context), eps)
        assert torch.equal(unet(x, torch.tensor([7]), context), eps)
        assert not torch.allclose(unet(x, 8, context), eps)
        assert unet(torch.randn(1, 3, 12, 20), 3, context[:1]).shape == (1, 3, 12, 20)
    with pytest.raises(ValueError, match="expected"):
        unet(x, torch.tensor([1, 2, 3]), context)


def test_context_is_required_exactly_when_conditional():
    unet = UNet(TINY)
    with pytest.raises(ValueError, match="text-conditioned"):
        unet(torch.randn(1, 3, 8, 8), 1)
    uncond = UNet(UNetConfig(**{**vars(TINY), "cross_attention_dim": None}))
    assert uncond(torch.randn(1, 3, 8, 8), 1).shape == (1, 3, 8, 8)
    assert uncond.mid_block.attentions[0].transformer_blocks[0].attn2 is None
    with pytest.raises(ValueError, match="unconditional"):
        uncond(torch.randn(1, 3, 8, 8), 1, torch.randn(1, 5, 12))


def test_context_steers_the_output():
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        a = unet(x, 5, torch.randn(1, 5, 12))
        b = unet(x, 5, torch.randn(1, 5, 12))
    assert (a - b).abs().max() > 1e-4


def test_cross_attention_maps_of_the_whole_unet():
    unet = UNet(TINY).eval()
    with torch.no_grad(), record_attention(unet) as maps:
        unet(torch.randn(2, 3, 16, 16), 5, torch.randn(2, 5, 12))
    # level 1 (8×8): one down, two up transformers; the mid block (8×8): one
    assert sorted(maps) == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
    ]
    for layer_maps in maps.values():
        assert len(layer_maps) == 1 and layer_maps[0].shape == (2, 2, 64, 5)


def test_save_and_load_component(tmp_path):
    unet = UNet(TINY)
    save_component(unet, tmp_path, TINY)
    loaded = load_component(tmp_path, UNet, UNetConfig)
    assert loaded.config == TINY
    x, context = torch.randn(1, 3, 8, 8), torch.randn(1, 5, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x, 3, context), unet.eval()(x, 3, context))


def test_trains():
    """A few steps on one batch lower the loss: gradients reach every weight."""
    torch.manual_seed(0)
    unet = UNet(TINY)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    context = torch.randn(4, 5, 12)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = (unet(x, t, context) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert all(p.grad is not None for p in unet.parameters())
    assert losses[-1] < losses[0]


def test_pixel_uncond_recipe_runs_and_writes_a_loadable_checkpoint(tmp_path):
    from sdscratch.checkpoint import verify
    from sdscratch.recipes import run_recipe

    manifest = run_recipe("pixel-uncond", out=tmp_path, steps=2)
    assert verify(tmp_path) == manifest
    assert set(manifest["sha256"]) == {"unet/config.json", "unet/model.safetensors"}
    unet = load_component(tmp_path / "unet", UNet, UNetConfig)
    assert unet.config.cross_attention_dim is None and unet.config.in_channels == 3
    quality = manifest["quality"]
    # the held-out loss of the stored UNet, measured again: the val split's first
    # 512 scenes, scaled as it was trained, noise from seed + 2
    from sdscratch.schedules import NoiseSchedule
    from sdscratch.shapes.data import Shapes
    from sdscratch.train import diffusion_loss

    images = Shapes("val", seed=0, length=512).batch(range(512))[0]
    with torch.no_grad():
        loss = diffusion_loss(unet, images * quality["pixel_scale"],
                              NoiseSchedule.scaled_linear(),
                              torch.Generator().manual_seed(2)).item()  # fmt: skip
    assert quality["val_loss_512_scenes"] == pytest.approx(loss, abs=6e-5)
    assert manifest["cpu_seconds"] <= manifest["wall_time_seconds"] + 1  # one thread
    assert 0.5 < quality["solid_colour_share_real"] <= 1


def test_pixel_text_recipe_runs_and_bundles_its_text_encoder(tmp_path, monkeypatch):
    import sdscratch.recipes.pixel
    import sdscratch.shapes.judge
    from sdscratch.checkpoint import verify
    from sdscratch.recipes import run_recipe
    from sdscratch.shapes.evaluate import evaluation_prompts

    measured = []

    def recording(images, scenes, judge=None):
        measured.append((images, scenes, accuracy(images, scenes, judge)))
        return measured[-1][2]

    accuracy = sdscratch.shapes.judge.prompt_accuracy
    monkeypatch.setattr(sdscratch.recipes.pixel, "prompt_accuracy", recording)
    manifest = run_recipe("pixel-text", out=tmp_path, steps=2)
    assert verify(tmp_path) == manifest
    ((images, scenes, value),) = measured  # the accuracy of the guided samples
    assert images.shape == (64, 3, 32, 32) and scenes == evaluation_prompts(64)[1]
    assert manifest["quality"]["prompt_accuracy_64_test_prompts"] == round(value, 3)
    parts = {name.split("/")[0] for name in manifest["sha256"]}
    assert parts == {"unet", "tokenizer", "text_encoder"}
    unet = load_component(tmp_path / "unet", UNet, UNetConfig)
    assert unet.config.cross_attention_dim is not None


def test_bundled_pixel_text_loads_and_draws_the_prompted_colour():
    """The committed shapes-pixel-text: manifest verifies, within its 4 MB budget,
    carries shapes-clip's text encoder unchanged, and its guided samples take the
    colour their prompt names."""
    from sdscratch.checkpoint import resolve, verify
    from sdscratch.clip import TextEncoder, TextEncoderConfig
    from sdscratch.recipes import guided
    from sdscratch.samplers import sample
    from sdscratch.shapes.data import COLOURS
    from sdscratch.tokenizer import Tokenizer

    folder = resolve("shapes-pixel-text")
    manifest = verify(folder)
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 4e6
    clip = verify(resolve("shapes-clip"))["sha256"]
    for name, digest in manifest["sha256"].items():
        if not name.startswith("unet/"):
            assert clip[name] == digest, name  # copies, not retrained
    tokenizer = Tokenizer.from_pretrained(folder / "tokenizer")
    encoder = load_component(folder / "text_encoder", TextEncoder, TextEncoderConfig)
    unet = load_component(folder / "unet", UNet, UNetConfig)
    prompts = [f"a large {colour} circle in the center" for colour in COLOURS]
    with torch.no_grad():
        context, empty = encoder(tokenizer(prompts)), encoder(tokenizer([""]))
    eps_fn = guided(unet, context, empty, 3.0)  # the recipe's guidance scale
    noise = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scale = manifest["quality"]["pixel_scale"]  # it diffuses pixels × scale
    pixels = (sample(eps_fn, noise, "ddim", 20) / scale).flatten(2)  # (6, 3, 1024)
    saturation = pixels.amax(dim=1) - pixels.amin(dim=1)  # the grey background: ~0
    drawn = torch.stack(
        [pixels[i][:, saturation[i].topk(128).indices].mean(dim=1) for i in range(6)]
    )  # (6, 3) mean colour of each image's most saturated eighth
    palette = torch.tensor(list(COLOURS.values())) / 127.5 - 1  # (6, 3) in [-1, 1]
    nearest = torch.cdist(drawn, palette).argmin(dim=1)
    assert (nearest == torch.arange(6)).sum() >= 5, nearest.tolist()
