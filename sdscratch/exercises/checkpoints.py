"""Checks for the real-weights exercises: how many parameters a ResNet block holds,
how many bytes a model takes in a dtype, and where a UNet weight sits in a
single (CompVis) file (lesson 15)."""

import types

import torch
from torch import nn

from sdscratch import single_file
from sdscratch.exercises.compare import call, check, generator
from sdscratch.layers import ResBlock


def check_resblock_parameters(fn) -> None:
    """`fn(in_channels, out_channels, time_dim) -> int`: the parameters of SD's
    ResNet block (two GroupNorms, two 3×3 convolutions, the time projection, and a
    1×1 shortcut when the channel count changes), counted from the shapes alone."""
    g = generator(30)

    def case(in_channels, out_channels, time_dim):
        with torch.device("meta"):  # shapes only: no memory, no time
            block = ResBlock(in_channels, out_channels, time_dim)
            want = sum(p.numel() for p in block.parameters())
            biases = sum(p.numel() for n, p in block.named_parameters()
                         if n.endswith("bias"))  # fmt: skip
            norms = sum(p.numel() for n, p in block.named_parameters()
                        if n.startswith("norm"))  # fmt: skip
            shortcut = sum(p.numel() for p in block.conv_shortcut.parameters()) if (
                block.conv_shortcut is not None) else 0  # fmt: skip
        mistakes = {
            "every convolution and linear layer has a bias, one number per output "
            "channel.": want - biases + norms // 2,
            "when the channel count changes, the skip goes through a 1×1 "
            "convolution, C_in · C_out + C_out more.": want - shortcut,
            "each GroupNorm learns a scale and a shift per channel, 2 · C.":
                want - norms,
            "the time vector enters through a linear layer, time_dim · C_out + "
            "C_out parameters.": want - time_dim * out_channels - out_channels,
        }  # fmt: skip
        got, error = call(fn, in_channels, out_channels, time_dim)
        return got, error, want, mistakes

    widths = [32 * int(n) for n in torch.randint(1, 41, (4,), generator=g)]
    return check(
        "resblock_parameters",
        [
            case(320, 320, 1280),
            case(640, 1280, 1280),
            case(widths[0], widths[1], widths[2]),
            case(widths[3], widths[3], 4 * widths[3]),
        ],
    )


def check_bytes_in(fn) -> None:
    """`fn(model, dtype) -> int`: the bytes `model`'s parameters take once cast to
    `dtype` (the model itself is left as it is): elements times bytes per element."""
    g = generator(31)

    def case(dtype):
        sizes = [int(n) for n in torch.randint(2, 50, (4,), generator=g)]
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.GELU(),
                                  nn.Conv2d(sizes[1], sizes[2], 3),
                                  nn.LayerNorm(sizes[3]))  # fmt: skip
            cast = [p.to(dtype) for p in model.parameters()]
        want = sum(p.nelement() * p.element_size() for p in cast)
        elements = sum(p.nelement() for p in cast)
        mistakes = {
            "count bytes, not bits: a float16 number takes 2 bytes.": want * 8,
            "use the size of an element of `dtype` (for example "
            "`torch.finfo(dtype).bits // 8`), not of the model's float32 "
            "parameters.": elements * 4,
            "count elements (`p.numel()`), not parameter tensors.":
                len(cast) * cast[0].element_size(),
        }  # fmt: skip
        got, error = call(fn, model, dtype)
        if error is None and any(p.dtype != torch.float32 for p in model.parameters()):
            error = "Not yet: leave the model as it is; count, do not cast it."
        return got, error, want, mistakes

    return check(
        "bytes_in", [case(d) for d in (torch.float16, torch.bfloat16, torch.float64)]
    )


def _reference_compvis_name(key, layers_per_block, levels=4):
    config = types.SimpleNamespace(layers_per_block=layers_per_block,
                                   block_out_channels=(1,) * levels,
                                   attention_levels=(True,) * levels)  # fmt: skip
    table = single_file.unet_prefixes(config)
    return single_file.UNET + single_file._through(key, table)


def check_compvis_name(fn) -> None:
    """`fn(key, layers_per_block, renames) -> str`: a diffusers UNet key of a
    ResNet block, `down_blocks.I.resnets.J.<part>.<weight|bias>` or
    `up_blocks.I.resnets.J....`, in a single file: `model.diffusion_model.` then
    `input_blocks.N.0.` or `output_blocks.N.0.`, the part renamed by `renames`
    (`sdscratch.single_file.UNET_RESNET`)."""
    g = generator(32)
    renames = dict(single_file.UNET_RESNET)

    def case(side, i, j, n):
        part = list(renames)[int(torch.randint(0, len(renames), (1,), generator=g))]
        end = ("weight", "bias")[int(torch.randint(0, 2, (1,), generator=g))]
        key = f"{side}_blocks.{i}.resnets.{j}.{part}.{end}"
        want = _reference_compvis_name(key, n)
        row, inner = ("input_blocks", 1 + i * (n + 1) + j) if side == "down" else (
            "output_blocks", i * (n + 1) + j)  # fmt: skip
        mistakes = {
            "every name in a single file starts with the UNet's prefix, "
            "`model.diffusion_model.`.": want.removeprefix(single_file.UNET),
            "each level takes layers_per_block + 1 slots of the row (down: its "
            "ResNet blocks, then the downsampler; up: one ResNet block more).":
                want.replace(f"{row}.{inner}.", f"{row}.{inner - i}.", 1),
            "rename the part with `renames` (conv1 is in_layers.2).":
                single_file.UNET + f"{row}.{inner}.0.{part}.{end}",
        }  # fmt: skip
        if side == "down":
            mistakes[
                "input_blocks.0 is conv_in, so the first ResNet block is "
                "input_blocks.1."
            ] = want.replace(f"{row}.{inner}.", f"{row}.{inner - 1}.", 1)
        got, error = call(fn, key, n, dict(renames))
        return got, error, want, {k: v for k, v in mistakes.items() if v != want}

    def random_case():
        n = int(torch.randint(1, 4, (1,), generator=g))
        side = ("down", "up")[int(torch.randint(0, 2, (1,), generator=g))]
        i = int(torch.randint(0, 4, (1,), generator=g))
        j = int(torch.randint(0, n + (side == "up"), (1,), generator=g))
        return case(side, i, j, n)

    fixed = [case("down", 2, 1, 2), case("up", 3, 2, 2)]  # SD v1's two per level
    return check("compvis_name", fixed + [random_case() for _ in range(10)])
