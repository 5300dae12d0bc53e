"""Textual inversion: a new word for a new concept, and nothing else changed.

Gal et al. 2022 ("An Image is Worth One Word"), §3: add a token such as "<heart>"
to the tokenizer and one new row (or a few) to the text encoder's token embedding
table, then learn only that row with the usual denoising loss while every weight of
the UNet, the autoencoder and the text encoder stays frozen. The concept lives in a
vector of width D (768 for SD v1): a file of a few kilobytes.

`NewTokens` makes only the new rows trainable: they are a parameter of their own,
and a forward hook on the embedding table puts them in place of the table's rows
for the new ids. An optimizer given `new_tokens.parameters()` cannot touch anything
else, weight decay included; `write()` copies the learned vectors into the table.

The files people exchange: diffusers' `learned_embeds.safetensors` ({token: (n, D)})
and A1111's ({"emb_params": (n, D)}, the token being the file's name; its older
pickled `.pt` files keep the same tensor under `string_to_param`). A token learned
as n vectors is the n tokens "<t>", "<t>_1", ..., "<t>_{n-1}"; writing "<t>" in a
prompt stands for all of them (as in diffusers).
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sdscratch.lora_files import read_safetensors

DIFFUSERS_FILE = "learned_embeds.safetensors"
FORMATS = ("diffusers", "a1111")


class EmbeddingError(ValueError):
    """An embedding that does not fit (wrong width, token taken, unknown layout)."""


def token_embedding(text_encoder) -> nn.Embedding:
    """The text encoder's token embedding table, (vocab_size, D)."""
    return text_encoder.embeddings.token_embedding


def grow_token_embedding(text_encoder, rows: int) -> nn.Embedding:
    """Give the token embedding table `rows` rows (new rows: zeros, filled later),
    and the text encoder's config the new vocab_size."""
    old = token_embedding(text_encoder)
    if rows <= old.num_embeddings:
        return old
    weight = old.weight
    new = nn.Embedding(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: old.num_embeddings] = weight
    new.weight.requires_grad_(weight.requires_grad)
    text_encoder.embeddings.token_embedding = new
    text_encoder.config.vocab_size = rows
    return new


def vector_tokens(token: str, count: int) -> list[str]:
    """The tokens of an n-vector embedding: "<t>", "<t>_1", ..., "<t>_{n-1}"."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def add_embedding(tokenizer, text_encoder, token: str, vectors: torch.Tensor):
    """Add `token` (n vectors: n tokens) to the tokenizer, and its vectors to the
    text encoder's table.

    Args:
        vectors: (n, D) or (D,), D the text encoder's width.
    Returns:
        The new token ids, n of them.
    """
    vectors = vectors[None] if vectors.ndim == 1 else vectors  # (n, D)
    width = token_embedding(text_encoder).embedding_dim
    check_embedding(tokenizer, token, vectors, width)
    ids = tokenizer.add_tokens(vector_tokens(token, len(vectors)))
    table = grow_token_embedding(text_encoder, max(ids) + 1)
    with torch.no_grad():
        table.weight[ids] = vectors.to(table.weight)
    return ids


def check_embedding(tokenizer, token: str, vectors: torch.Tensor, width: int):
    """Refuse, with one sentence, what `add_embedding` could not add whole."""
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise EmbeddingError(
            f"the embedding is {vectors.shape[-1]} wide but this text encoder's "
            f"tokens are {width} wide (an embedding for another model)."
        )
    for name in vector_tokens(token, len(vectors)):
        if name in tokenizer.vocab or name in tokenizer.added_tokens:
            raise EmbeddingError(f"the tokenizer already has the token {name!r}.")


class NewTokens(nn.Module):
    """The trainable vectors of some tokens; the rest of the table stays frozen.

    Args:
        text_encoder: the `TextEncoder` whose table holds the tokens.
        ids: the tokens' ids (their current rows are the starting vectors).
    """

    def __init__(self, text_encoder, ids: list):
        super().__init__()
        table = token_embedding(text_encoder)
        self.ids = list(ids)
        self.vectors = nn.Parameter(table.weight[self.ids].detach().clone())  # (n, D)
        object.__setattr__(self, "table", table)  # not ours: the model's
        self.hook = table.register_forward_hook(self._put_in)

    def _put_in(self, module, inputs, output):
        """(B, L, D) table rows -> the same, the new tokens' rows from `vectors`."""
        ids = inputs[0]  # (B, L)
        slot = torch.full_like(ids, -1)  # which vector each place takes; -1: none
        for j, i in enumerate(self.ids):
            slot[ids == i] = j
        new = self.vectors[slot.clamp(min=0)]  # (B, L, D)
        return torch.where((slot >= 0)[..., None], new, output)

    def write(self):
        """Copy the vectors into the table and remove the hook."""
        with torch.no_grad():
            self.table.weight[self.ids] = self.vectors.to(self.table.weight)
        self.hook.remove()


def start_textual_inversion(pipe, token: str, num_vectors=1, init_token=None):
    """Add `token` with `num_vectors` trainable vectors, all else frozen.

    Args:
        pipe: a `StableDiffusion` (its tokenizer and text encoder change).
        token: the new word, e.g. "<heart>".
        num_vectors: n, vectors for the one word (Gal et al. use 1).
        init_token: a word whose embedding starts every vector (e.g. "shape";
            its tokens' mean), as Gal et al. start from a coarse description;
            None: small random vectors.
    Returns:
        `NewTokens`: train `.parameters()`, then call `.write()`.
    """
    table = token_embedding(pipe.text_encoder)
    if init_token is None:
        generator = torch.Generator().manual_seed(0)
        start = torch.randn(table.embedding_dim, generator=generator)
        start = start * table.weight.detach().std().item()
    else:
        ids = pipe.tokenizer.encode(init_token)
        start = table.weight[ids].detach().mean(0)  # (D,)
    ids = add_embedding(pipe.tokenizer, pipe.text_encoder, token,
                        start.repeat(num_vectors, 1))  # fmt: skip
    pipe.text_encoder.requires_grad_(False)
    return NewTokens(pipe.text_encoder, ids)


# ----------------------------------------------------------------------------------
# Files


def read_embedding(path, token=None) -> tuple[str, torch.Tensor]:
    """(token, (n, D) vectors) of an embedding file in diffusers' or A1111's layout.

    Args:
        path: the .safetensors file, or a folder holding `learned_embeds.safetensors`.
        token: the word to use (default: diffusers' key, or A1111's file name).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    tensors, _ = read_safetensors(path, "an embedding")
    a1111 = [key for key in ("emb_params", "string_to_param.*") if key in tensors]
    if a1111:
        name, vectors = token or path.stem, tensors[a1111[0]]
    elif len(tensors) == 1:
        name, vectors = next(iter(tensors.items()))
        name = token or name
    else:
        raise EmbeddingError(
            f"{path} holds {len(tensors)} tensors, not diffusers' one {{token: "
            "vectors}} nor A1111's emb_params."
        )
    if vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        raise EmbeddingError(f"{path} holds a {tuple(vectors.shape)} {vectors.dtype} "
                             "tensor, not embedding vectors.")  # fmt: skip
    return name, vectors[None] if vectors.ndim == 1 else vectors


def load_textual_inversion(pipe, path, token=None) -> list:
    """`pipe.load_textual_inversion`: add an embedding file's token to a pipeline.

    Returns:
        The new token ids. A file that does not fit (another width, a token the
        tokenizer has) is refused with one sentence, nothing added.
    """
    name, vectors = read_embedding(path, token)
    try:
        return add_embedding(pipe.tokenizer, pipe.text_encoder, name, vectors)
    except EmbeddingError as error:
        raise EmbeddingError(f"{path}: {error}") from None


def unload_textual_inversion(pipe, tokens=None) -> list:
    """`pipe.unload_textual_inversion`: remove added tokens and their rows.

    As diffusers' `unload_textual_inversion`: the tokens leave the tokenizer, their
    rows the text encoder's table, and the added tokens left are renumbered after
    the vocabulary. A token stands for all its vectors ("<t>": "<t>", "<t>_1", ...).

    Args:
        tokens: a token or a list of them (default: every added token).
    Returns:
        The removed tokens' old ids.
    """
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    tokens = [tokens] if isinstance(tokens, str) else tokens
    names = list(tokenizer.added_tokens) if tokens is None else [
        name for token in tokens for name in _vectors_of(tokenizer, token)
    ]  # fmt: skip
    old = dict(tokenizer.added_tokens)
    removed = tokenizer.remove_tokens(names)
    rows = list(range(len(tokenizer.vocab)))
    rows += sorted(i for token, i in old.items() if token not in names)
    weight = token_embedding(text_encoder).weight
    new = nn.Embedding.from_pretrained(weight[rows].detach().clone())  # (V', D)
    new.weight.requires_grad_(weight.requires_grad)
    text_encoder.embeddings.token_embedding = new
    text_encoder.config.vocab_size = len(rows)
    return removed


def _vectors_of(tokenizer, token: str) -> list[str]:
    """An added token's vector tokens, "<t>", "<t>_1", ... (one sentence if none)."""
    if token not in tokenizer.added_tokens:
        raise EmbeddingError(f"the tokenizer has no added token {token!r}.")
    return tokenizer.expand_added(token)


def save_embedding(vectors, token: str, path, format="diffusers") -> Path:
    """Write learned vectors, (n, D) or (D,), for `token`.

    Args:
        path: a .safetensors file, or a folder (diffusers' layout: the file is
            `folder/learned_embeds.safetensors`).
        format: "diffusers" ({token: vectors}) or "a1111" ({"emb_params": vectors};
            A1111 names the token after the file, so name the file after it).
    """
    if format not in FORMATS:
        raise EmbeddingError(f"Unknown embedding format {format!r}; one of {FORMATS}.")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = vectors.detach().float().cpu().reshape(-1, vectors.shape[-1])
    key = token if format == "diffusers" else "emb_params"
    save_file({key: vectors.contiguous()}, path, metadata={"name": token})
    return path
