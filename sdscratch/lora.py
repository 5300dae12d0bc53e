"""LoRA: teach a trained model something new by learning a small change to it.

Hu et al. 2021 (LoRA), §4.1: a layer's weight W (out, in) stays frozen and learns a
change of low rank r instead, ΔW = B A with A (r, in) and B (out, r):

    h = W x + (α / r) · B A x

B starts at zero, so training starts from the unchanged model; A starts as
`nn.Linear` starts its own weights (Kaiming-uniform), as the paper's code and peft do.
α ("alpha") fixes the step size across ranks: with α = r the update is B A itself.
A rank-4 change to a 768×768 projection is 6 144 numbers instead of 589 824.

For Stable Diffusion, LoRA goes into the attention projections of the UNet (to_q,
to_k, to_v, to_out) and, optionally, of the text encoder (q_proj, k_proj, v_proj,
out_proj). A `LoRALayer` does not replace the layer it changes: it adds its B A x to
the layer's output through a forward hook (as kohya's and A1111's LoRA do), so the
model keeps its own parameters and names, saves and exports as before, and several
LoRAs can act at once. `merge()` adds (α / r)·B A into W itself: the same outputs,
no extra work per step; `unmerge()` takes it out again.

A `LoRA` (what one LoRA file holds) names its layers by component and layer name
with "_" for "." ("unet_down_blocks_0_..._attn1_to_q"); `sdscratch.lora_files`
writes and reads them under the names diffusers and kohya use.
"""

import math

import torch
from einops import rearrange
from torch import nn

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # SD's attention projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "text_encoder")


class LoRAError(ValueError):
    """A LoRA that does not fit the model (unknown layer, wrong shape or rank)."""


class LoRALayer(nn.Module):
    """The low-rank change of one linear layer (or convolution): (α / r) · B A x.

    Args:
        base: the model's `nn.Linear` (or `nn.Conv2d`: A is then a convolution like
            the base's with r output channels, B a 1×1 one, as kohya's LoCon).
        rank: r, the rank of the change.
        alpha: α (None: α = r, the update B A unscaled).
    """

    def __init__(self, base: nn.Module, rank=4, alpha=None):
        super().__init__()
        if not (isinstance(rank, int) and rank >= 1):
            raise LoRAError(f"A LoRA's rank must be a positive integer, got {rank!r}.")
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size,
                                    base.stride, base.padding, base.dilation,
                                    bias=False)  # fmt: skip
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise LoRAError(f"LoRA changes linear and conv layers, not {base}.")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self._scale = 1.0
        self.merged = False
        self.hook = None
        # The model's own layer: kept, but not as a sub-module (its weights stay
        # the model's, and this layer's parameters are A and B alone).
        object.__setattr__(self, "base", base)
        self.to(base.weight.device, base.weight.dtype)

    @property
    def scale(self) -> float:
        """The strength it is used at (A1111's `<lora:name:0.8>`; 1: as trained)."""
        return self._scale

    @scale.setter
    def scale(self, value: float):
        merged = self.merged
        if merged:
            self.unmerge()
        self._scale = float(value)
        if merged:
            self.merge()

    @property
    def scaling(self) -> float:
        """α / r times the scale: the factor of B A x."""
        return self.alpha / self.rank * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The change alone: x (..., in) -> (α / r) · s · B A x, (..., out)."""
        return self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α / r) · s · B A, shaped like the base's weight."""
        a = rearrange(self.lora_A.weight, "r ... -> r (...)")  # (r, in·k·k)
        b = rearrange(self.lora_B.weight, "o r ... -> o (r ...)")  # (out, r)
        return (b @ a * self.scaling).reshape(self.base.weight.shape)

    def attach(self):
        """Make the base layer's output W x + (α / r) · s · B A x."""
        if self.hook is None:
            self.hook = self.base.register_forward_hook(self._add_change)
        return self

    def detach(self):
        """Give the base layer back as it was (taking a merged change out first)."""
        if self.merged:
            self.unmerge()
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        return self

    def _add_change(self, module, inputs, output):
        return output if self.merged else output + self(inputs[0])

    @torch.no_grad()
    def merge(self):
        """W ← W + ΔW: the same outputs without the extra matrix products."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W ← W - ΔW: the layer's own weight back (up to rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def components(pipe_or_models) -> dict:
    """{"unet": ..., "text_encoder": ...} of a pipeline, or a dict of models as is."""
    if isinstance(pipe_or_models, dict):
        models = pipe_or_models
    else:
        models = {name: getattr(pipe_or_models, name) for name in COMPONENTS}
    unknown = set(models) - set(COMPONENTS)
    if unknown:
        raise LoRAError(f"LoRA knows the components {COMPONENTS}, not {unknown}.")
    return models


class LoRA(nn.Module):
    """A set of `LoRALayer`s over a pipeline's models: what one LoRA file holds.

    While attached and not merged, the change lives in the hooks only: the models'
    `state_dict()` (so `save_pretrained`, `save_single_file`, `to_diffusers`) holds
    the weights without it. `merge()` first to write a model with the LoRA in it.

    Args:
        models: {"unet": unet, "text_encoder": text_encoder} (either may be absent).
        changes: {(component, layer name): LoRALayer} for layers of those models.
    """

    def __init__(self, models: dict, changes: dict):
        super().__init__()
        self.layers = nn.ModuleDict()
        self.where = {}  # "unet_down_blocks_0_..." -> ("unet", "down_blocks.0....")
        for (component, path), layer in changes.items():
            name = f"{component}_{path}".replace(".", "_")
            self.layers[name] = layer
            self.where[name] = (component, path)
        self.models = models

    def attach(self) -> "LoRA":
        """Switch the change on: every layer's output gets its B A x added."""
        for layer in self.layers.values():
            layer.attach()
        return self

    def detach(self) -> "LoRA":
        """Switch it off and give the models back as they were."""
        for layer in self.layers.values():
            layer.detach()
        return self

    def merge(self):
        """Add every ΔW into its layer's weight (see `LoRALayer.merge`)."""
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self):
        for layer in self.layers.values():
            layer.unmerge()

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers.values())

    @property
    def scale(self) -> float:
        return next(iter(self.layers.values())).scale

    @scale.setter
    def scale(self, value: float):
        for layer in self.layers.values():
            layer.scale = value

    def trainable_parameters(self) -> dict:
        """{name: parameter} of every A and B: all a LoRA trains."""
        return dict(self.named_parameters())


def inject_lora(
    pipe_or_models,
    rank=4,
    alpha=None,
    text_encoder=False,
    targets=UNET_TARGETS,
    text_targets=TEXT_ENCODER_TARGETS,
) -> LoRA:
    """A new LoRA (B = 0: the models' outputs unchanged), attached.

    Args:
        pipe_or_models: a `StableDiffusion`, or {"unet": ..., "text_encoder": ...}.
        rank, alpha: r and α of every layer (alpha None: α = r).
        text_encoder: also change the text encoder's attention projections.
        targets, text_targets: the layers to change, by the end of their names
            ("to_q" changes every "....attn1.to_q" and "....attn2.to_q"; "ff.out",
            "proj_in" name others), as peft's `target_modules`.
    Returns:
        The attached `LoRA`; train `lora.parameters()` with the models frozen.
    """
    models = components(pipe_or_models)
    wanted = {"unet": targets, "text_encoder": text_targets if text_encoder else ()}
    changes = {}
    for component, model in models.items():
        for path, module in model.named_modules():
            if any(_ends_with(path, target) for target in wanted[component]):
                changes[component, path] = LoRALayer(module, rank, alpha)
    if not changes:
        raise LoRAError(f"No layer of the models is named one of {targets}.")
    return LoRA(models, changes).attach()


def _ends_with(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def freeze(*models):
    """requires_grad = False for every parameter of `models` (the base weights)."""
    for model in models:
        model.requires_grad_(False)


def count_parameters(parameters) -> int:
    """How many numbers `parameters` (an iterable of tensors) hold."""
    return sum(p.numel() for p in parameters)
