"""CLIP: the text encoder Stable Diffusion conditions on, and a tiny CLIP to train it.

Radford et al. 2021 (CLIP) train a text encoder and an image encoder together so that
a caption and its image land on nearby unit vectors. Stable Diffusion v1 keeps only
the text encoder and conditions its UNet on the encoder's last hidden states, one
vector per token (B, 77, 768), through cross-attention.

The text encoder is a causal transformer (CLIP §2.4, built like GPT-2): token plus
position embeddings, pre-LayerNorm blocks of masked self-attention and a quick-GELU
MLP, and a final LayerNorm. Parameter names follow transformers' `CLIPTextModel`, so
real weights load with a two-line table (`sdscratch.port`). The image encoder here is
a small conv net: CLIP shipped ResNet image encoders too, and at 32×32 pixels on a CPU
a conv net learns fastest. How well the tiny CLIP reads Shapes scenes zero-shot is
measured in `sdscratch.shapes.zero_shot`.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdscratch import checkpoint
from sdscratch.checkpoint import load_component, resolve, save_component
from sdscratch.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------
# The text encoder


@dataclass
class TextEncoderConfig:
    """The defaults are Stable Diffusion v1's text encoder (OpenAI CLIP ViT-L/14)."""

    vocab_size: int = 49408  # rows of the token embedding table
    max_position_embeddings: int = 77  # context length L: one learned vector each
    hidden_size: int = 768  # width D of every token vector
    intermediate_size: int = 3072  # width of each block's MLP, usually 4 D
    num_hidden_layers: int = 12  # transformer blocks
    num_attention_heads: int = 12  # heads per self-attention (D / heads = 64 each)
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD v1) or "gelu"
    layer_norm_eps: float = 1e-5  # LayerNorm's epsilon
    eos_token_id: int | None = 49407  # pool at its first place; None: highest id
    projection_dim: int = 0  # joint text-image space for `embed`; 0: none (SD)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's fast approximation of GELU: x · σ(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class TextEmbeddings(nn.Module):
    """Token ids -> token embedding + learned position embedding."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        d = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)  # (L,)
        return self.token_embedding(ids) + self.position_embedding(positions)


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, §3.2.2), optionally causal."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        d, self.heads = config.hidden_size, config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, causal=True) -> torch.Tensor:
        split = "b l (h e) -> b h l e"
        q = rearrange(self.q_proj(x), split, h=self.heads)  # (B, h, L, D/h)
        k = rearrange(self.k_proj(x), split, h=self.heads)
        v = rearrange(self.v_proj(x), split, h=self.heads)
        # softmax(q kᵀ / √(D/h)) v; causal: token i sees only tokens 0..i
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(rearrange(out, "b h l e -> b l (h e)"))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, causal=True) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, causal=True) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal=causal)
        return x


class TextEncoder(nn.Module):
    """CLIP's text transformer: token ids -> one vector per token.

    `text_encoder(ids)` gives the last hidden states after the final LayerNorm,
    (B, L, D): what Stable Diffusion's UNet cross-attends to. `pool` reads the
    sequence's summary at its end token (the only token that has seen every other
    one, under the causal mask); `embed` projects it into the joint text-image space.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps
        )
        if config.projection_dim:
            d, e = config.hidden_size, config.projection_dim
            self.text_projection = nn.Linear(d, e, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) long token ids -> (B, L, D) hidden states."""
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{ids.shape[1]} tokens do not fit the text encoder's "
                f"{self.config.max_position_embeddings} positions."
            )
        x = self.embeddings(ids)  # (B, L, D)
        x = self.encoder(x, causal=True)
        return self.final_layer_norm(x)

    def end_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B,) the place of each row's end token."""
        if self.config.eos_token_id is None:  # original CLIP: the highest id
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)  # the first

    def pool(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) hidden states -> (B, D): the state at each row's end token."""
        rows = torch.arange(len(ids), device=ids.device)
        return hidden[rows, self.end_positions(ids)]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, E) unit vectors in the joint text-image space."""
        # Under the causal mask no end token sees the padding after it, so the
        # batch is cut after its last end token: same result, less work.
        ids = ids[:, : int(self.end_positions(ids).max()) + 1]
        pooled = self.pool(self(ids), ids)
        return F.normalize(self.text_projection(pooled), dim=-1)


# ----------------------------------------------------------------------------------
# The image encoder


@dataclass
class ImageEncoderConfig:
    image_size: int = 32  # images are (3, image_size, image_size) in [-1, 1]
    channels: tuple[int, ...] = (32, 64, 128)  # one stage each; each halves H and W
    projection_dim: int = 64  # joint text-image space, as the text encoder's


class ImageEncoder(nn.Module):
    """A small conv net: images -> unit vectors in the joint text-image space.

    Each stage is a stride-2 conv 3×3 (halving H and W), GroupNorm, SiLU, then a
    conv 3×3, GroupNorm, SiLU. The last feature map is flattened, not averaged, so
    that where a shape sits ("on the left", "above") survives into the embedding.
    """

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c)]
            layers += [nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c)]
            layers += [nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.channels)
        self.projection = nn.Linear(c_in * side * side, config.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, E) unit vectors."""
        features = self.features(images)  # (B, C, H / 2^n, W / 2^n)
        embedding = self.projection(rearrange(features, "b c h w -> b (c h w)"))
        return F.normalize(embedding, dim=-1)


# ----------------------------------------------------------------------------------
# The two together


class CLIP(nn.Module):
    """A text encoder and an image encoder trained together, with a learnable
    temperature (Radford et al. 2021, Figure 3).

    Args:
        text_encoder: a `TextEncoder` with a projection (`projection_dim` > 0).
        image_encoder: an `ImageEncoder` with the same `projection_dim`.
        tokenizer: the `Tokenizer` for `similarity` (optional).
        temperature: initial τ; logits are cos / τ, and log(1/τ) is learned.
    """

    def __init__(self, text_encoder, image_encoder, tokenizer=None, temperature=0.07):
        super().__init__()
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.tokenizer = tokenizer
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images, (B', L) ids -> (B, B') logits, cos · e^logit_scale."""
        image_embeds = self.image_encoder(images)  # (B, E)
        text_embeds = self.text_encoder.embed(ids)  # (B', E)
        # CLIP clamps the scale at 100 so that training stays stable.
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return scale * image_embeds @ text_embeds.T

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of every image with every text, (B, len(texts))."""
        device = self.logit_scale.device
        ids = self.tokenizer(texts).to(device)
        return self.image_encoder(images.to(device)) @ self.text_encoder.embed(ids).T

    @classmethod
    def from_pretrained(cls, name_or_path="shapes-clip", device=None, verify=True):
        """Load tokenizer/, text_encoder/ and image_encoder/ of a CLIP checkpoint.

        Args:
            name_or_path: a bundled name such as "shapes-clip", or a folder.
            verify: check every file against the checkpoint's MANIFEST.json first.
        """
        root = resolve(name_or_path)
        if verify:
            parts = ("tokenizer", "text_encoder", "image_encoder")
            checkpoint.verify(root, components=parts)
        text = load_component(root / "text_encoder", TextEncoder, TextEncoderConfig)
        image = load_component(root / "image_encoder", ImageEncoder, ImageEncoderConfig)
        clip = cls(text, image, Tokenizer.from_pretrained(root / "tokenizer"))
        return clip.to(device or torch.device("cpu")).eval()

    def save_pretrained(self, root, dtype=None):
        """Write tokenizer/, text_encoder/ and image_encoder/ under `root`.

        The temperature only matters for training and is not saved.
        """
        root = Path(root)
        self.tokenizer.save_pretrained(root / "tokenizer")
        text, image = self.text_encoder, self.image_encoder
        save_component(text, root / "text_encoder", text.config, dtype=dtype)
        save_component(image, root / "image_encoder", image.config, dtype=dtype)


def contrastive_loss(logits: torch.Tensor, same=None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: image i belongs with text i (Figure 3).

    Args:
        logits: (B, T) scaled similarities of B images (rows) with T >= B texts:
            text i is image i's caption; further texts are extra captions that
            belong to no image of the batch ("hard negatives", NegCLIP:
            Yuksekgonul et al. 2023), which only the image-to-text side sees.
        same: optional (B, T) bool, True where image i and text j show the same
            scene (two captions of one picture are not negatives of each other):
            the target is then spread evenly over those texts (and images).
    """
    b = len(logits)
    if same is None:
        same = torch.eye(b, logits.shape[1], dtype=torch.bool, device=logits.device)
    image_to_text = F.cross_entropy(logits, _spread(same))
    text_to_image = F.cross_entropy(logits[:, :b].T, _spread(same[:, :b].T))
    return (image_to_text + text_to_image) / 2


def _spread(same: torch.Tensor) -> torch.Tensor:
    """Target probabilities: each row's True entries share the row evenly."""
    return same.float() / same.sum(dim=1, keepdim=True)
