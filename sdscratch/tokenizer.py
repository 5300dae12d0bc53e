"""CLIP's tokenizer: byte-level byte-pair encoding (BPE), written from scratch.

Radford et al. 2021 (CLIP), §2.4: "a lower-cased byte pair encoding (BPE)
representation of the text" (Sennrich et al. 2016) over UTF-8 bytes, as in GPT-2
(Radford et al. 2019, §2.2). Text becomes token ids in five steps:

1. clean: Unicode NFC, every run of whitespace becomes one space, lower case. This is
   what the installed transformers' `CLIPTokenizer` (a Rust `tokenizers` pipeline)
   does; OpenAI's original also ran `ftfy.fix_text` and `html.unescape` first.
2. pre-tokenise: CLIP's regex cuts the text into words, single digits, runs of other
   symbols and the contractions 's 't 're 've 'm 'll 'd; whitespace is dropped.
3. bytes: every piece's UTF-8 bytes become printable characters (GPT-2's byte table),
   so any string can be encoded: there is no unknown token.
4. merge: the last character of a word carries the end-of-word marker `</w>`; the
   learned merges are applied, lowest rank first, until none applies.
5. frame: <|startoftext|> ids <|endoftext|>, cut and padded to the context length
   (77 for Stable Diffusion; the padding token is <|endoftext|> in SD v1).

Added tokens (`add_tokens`, for textual inversion's new words such as "<heart>") are
cut out of the text first, like the special tokens, and never go through BPE; a
token learned as several vectors ("<heart>", "<heart>_1", ...) is written as one
word and becomes all of them, as diffusers' `maybe_convert_prompt` does.
"""

import functools
import json
import math
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import regex
import torch

from sdscratch.checkpoint import CheckpointError, resolve

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenisation pattern (\p{L}: any letter, \p{N}: any digit).
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
    r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# transformers' byte-level step splits every piece again with GPT-2's pattern; this
# only changes anything for "<|endoftext|>" typed in another case ("<|", "endoftext",
# "|>"), because text that is exactly a special token is taken out before cleaning.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
SPECIAL_SPLIT = regex.compile(f"({regex.escape(BOS)}|{regex.escape(EOS)})")


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table from the 256 byte values to 256 printable characters.

    Printable bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for themselves; the others
    (space, control bytes, …) are moved to characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def clean(text: str) -> str:
    """Step 1: NFC, collapse whitespace, lower case (character by character, like
    the Rust normaliser: so "Σ" at the end of a word becomes "σ", not "ς")."""
    text = unicodedata.normalize("NFC", text)
    text = regex.sub(r"\s+", " ", text)
    return "".join(char.lower() for char in text)


def pre_tokenize(text: str) -> list[str]:
    """Step 2: cut cleaned text into pieces; each piece is merged on its own."""
    pieces = PATTERN.findall(text)
    return [sub for piece in pieces for sub in GPT2_PATTERN.findall(piece)]


def to_symbols(piece: str) -> list[str]:
    """Step 3: a piece as byte characters, the last one marked with `</w>`."""
    chars = [byte_to_unicode()[byte] for byte in piece.encode("utf-8")]
    return [*chars[:-1], chars[-1] + END_OF_WORD]


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair` in `symbols` (left to right) by one symbol."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def base_vocabulary() -> list[str]:
    """The 512 tokens every byte-level vocabulary starts with: 256 bytes, then the
    same 256 as word ends."""
    chars = list(byte_to_unicode().values())
    return chars + [char + END_OF_WORD for char in chars]


class Tokenizer:
    """Text -> token ids, as CLIP (and so Stable Diffusion) does it.

    Args:
        vocab: token string -> id (the contents of vocab.json).
        merges: the learned pairs, highest priority first (merges.txt).
        context_length: L, the length every row is cut or padded to (SD: 77).
        pad_token: the padding token (SD v1: "<|endoftext|>", SD 2: "!").
    """

    def __init__(self, vocab: dict, merges: list, context_length=77, pad_token=EOS):
        self.vocab = dict(vocab)
        self.merges = [tuple(pair) for pair in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.context_length = context_length
        self.pad_token = pad_token
        self.id_to_token = {i: token for token, i in self.vocab.items()}
        self.bos_id, self.eos_id = self.vocab[BOS], self.vocab[EOS]
        self.pad_id = self.vocab[pad_token]
        self.added_tokens = {}  # token -> id, after the vocabulary's ids
        self._added_split = None
        self._cache = {}

    def __len__(self) -> int:
        return len(self.vocab) + len(self.added_tokens)

    def add_tokens(self, tokens) -> list[int]:
        """Add whole-word tokens (new ids from `len(self)` on), matched in the
        text before cleaning and BPE, as transformers' `add_tokens` does.

        Returns:
            Their ids. A token the tokenizer already has is refused.
        """
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        if not tokens:
            return []
        for token in tokens:
            if not token or token in self.vocab or token in self.added_tokens:
                raise ValueError(f"The tokenizer already has the token {token!r}.")
        ids = []
        for token in tokens:
            ids.append(len(self))
            self.added_tokens[token] = ids[-1]
            self.id_to_token[ids[-1]] = token
        self._compile_added()
        return ids

    def remove_tokens(self, tokens) -> list[int]:
        """Remove added tokens; the added tokens left keep their order, renumbered
        from `len(self.vocab)` on (as diffusers' `unload_textual_inversion`).

        Returns:
            The removed tokens' old ids.
        """
        unknown = [token for token in tokens if token not in self.added_tokens]
        if unknown:
            raise ValueError(f"The tokenizer has no added token {unknown[0]!r}.")
        removed = [self.added_tokens[token] for token in tokens]
        kept = [t for t in self.added_tokens if t not in tokens]  # in id order
        for i in self.added_tokens.values():
            del self.id_to_token[i]
        self.added_tokens = {t: len(self.vocab) + k for k, t in enumerate(kept)}
        self.id_to_token |= {i: t for t, i in self.added_tokens.items()}
        self._compile_added()
        return removed

    def _compile_added(self):
        """The pattern that finds added tokens in a text, longest first."""
        if not self.added_tokens:
            self._added_split = None
            return
        longest_first = sorted(self.added_tokens, key=len, reverse=True)
        pattern = "|".join(regex.escape(token) for token in longest_first)
        self._added_split = regex.compile(f"({pattern})")

    def expand_added(self, token: str) -> list[str]:
        """An added token and the vectors that follow it: "<t>", "<t>_1", ..."""
        tokens, i = [token], 1
        while f"{token}_{i}" in self.added_tokens:
            tokens.append(f"{token}_{i}")
            i += 1
        return tokens

    def bpe(self, piece: str) -> list[str]:
        """Step 4: merge one piece's symbols, the lowest-ranked pair first."""
        if piece not in self._cache:
            symbols = to_symbols(piece)
            while len(symbols) > 1:
                pairs = zip(symbols, symbols[1:])
                best = min(pairs, key=lambda pair: self.ranks.get(pair, math.inf))
                if best not in self.ranks:
                    break
                symbols = merge_pair(symbols, best)
            self._cache[piece] = symbols
        return self._cache[piece]

    def tokenize(self, text: str) -> list[str]:
        """The token strings of `text`, without start and end tokens."""
        tokens = []
        parts = self._added_split.split(text) if self._added_split else [text]
        for part in parts:
            if part in self.added_tokens:
                tokens += self.expand_added(part)
                continue
            for segment in SPECIAL_SPLIT.split(part):
                if segment in (BOS, EOS):  # typed exactly: the special token itself
                    tokens.append(segment)
                    continue
                for piece in pre_tokenize(clean(segment)):
                    tokens += self.bpe(piece)
        return tokens

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`, without start and end tokens."""
        unknown = self.eos_id  # only if a vocabulary lacks some byte
        ids = {**self.vocab, **self.added_tokens}
        return [ids.get(token, unknown) for token in self.tokenize(text)]

    def __call__(self, texts, context_length=None) -> torch.Tensor:
        """Step 5: a batch of prompts -> (B, L) long ids, framed, cut and padded.

        Args:
            texts: a string or a list of B strings.
            context_length: L (default: the tokenizer's). Longer prompts are cut to
                L - 2 tokens with a warning, as Stable Diffusion does.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > length - 2:
                warnings.warn(self._truncation(ids, length), stacklevel=2)
                ids = ids[: length - 2]
            ids = [self.bos_id, *ids, self.eos_id]
            rows.append(ids + [self.pad_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    def _truncation(self, ids, length) -> str:
        """The one-line warning for a prompt of `ids` cut to `length` - 2 tokens."""
        kept = length - 2
        start = self.decode(ids[kept : kept + 4])
        start = start if len(start) <= 30 else start[:27] + "..."
        return (
            f"Prompt truncated: CLIP reads {length} tokens, so the last "
            f"{len(ids) - kept} of its {len(ids)} tokens (from {start!r} on) were "
            "dropped."
        )

    def decode(self, ids) -> str:
        """Token ids -> text (lower-cased and with CLIP's spacing); special tokens
        are left out."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        special = {self.bos_id, self.eos_id, self.pad_id}
        to_byte = {char: byte for byte, char in byte_to_unicode().items()}
        words = []
        for i in ids:
            token = self.id_to_token[i]
            if i in special:
                continue
            if token in self.added_tokens:  # plain text, not byte characters
                words.append((token + END_OF_WORD).encode("utf-8"))
            else:
                words.append(bytes(to_byte[char] for char in token))
        text = b"".join(words).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        """Read vocab.json and merges.txt (and tokenizer_config.json, if present).

        Args:
            name_or_path: a folder with those files (or transformers' single
                tokenizer.json instead), or a checkpoint (bundled name such as
                "shapes-clip", or folder) with a tokenizer/ sub-folder.
        """
        folder = resolve(name_or_path)
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        vocab, merges = _read_vocabulary(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        tokenizer = cls(
            vocab,
            merges,
            context_length=config.get("model_max_length", 77),
            pad_token=_content(config.get("pad_token", EOS)),
        )
        added = config.get("added_tokens_decoder", {})
        for i in sorted(added, key=int):
            token = _content(added[i])
            if token not in vocab:  # transformers lists the special tokens too
                if int(i) != len(tokenizer):
                    raise CheckpointError(f"{config_path}: added token ids skip.")
                tokenizer.add_tokens(token)
        return tokenizer

    def save_pretrained(self, folder) -> Path:
        """Write vocab.json, merges.txt and tokenizer_config.json, in the layout that
        transformers' `CLIPTokenizer.from_pretrained` reads too."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = json.dumps(self.vocab, ensure_ascii=False, indent=0)
        (folder / "vocab.json").write_text(vocab + "\n", encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": self.pad_token,
        }
        if self.added_tokens:  # where transformers keeps them
            config["added_tokens_decoder"] = {
                str(i): {"content": token, "lstrip": False, "normalized": True,
                         "rstrip": False, "single_word": False, "special": False}
                for token, i in self.added_tokens.items()
            }  # fmt: skip
        config = json.dumps(config, indent=2) + "\n"
        (folder / "tokenizer_config.json").write_text(config)
        return folder


def _read_vocabulary(folder: Path) -> tuple[dict, list]:
    """(vocab, merges) from vocab.json + merges.txt (CLIP's files, SD v1.5's) or
    from the BPE model in tokenizer.json (what transformers 5 saves)."""
    if all((folder / name).is_file() for name in ("vocab.json", "merges.txt")):
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        lines = [line for line in lines if line and not line.startswith("#version")]
        return vocab, [line.split(" ") for line in lines]
    if (folder / "tokenizer.json").is_file():
        try:
            text = (folder / "tokenizer.json").read_text(encoding="utf-8")
            model = json.loads(text)["model"]
            merges = [m.split(" ") if isinstance(m, str) else m
                      for m in model["merges"]]  # fmt: skip
            return model["vocab"], merges
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{folder}/tokenizer.json is not a BPE tokenizer.")
    raise CheckpointError(f"{folder} holds no vocab.json and merges.txt.")


def _content(token) -> str:
    """tokenizer_config.json stores a token as a string or as {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


def train_bpe(texts, vocab_size=1000, min_frequency=2, context_length=77, steps=None):
    """Learn a byte-level BPE vocabulary from texts (Sennrich et al. 2016, Alg. 1).

    Start from the 512 byte tokens, then repeatedly merge the most frequent adjacent
    pair of symbols (ties: the alphabetically first pair) into a new token.

    Args:
        texts: the training texts, e.g. Shapes captions.
        vocab_size: stop at this many tokens (512 bytes + merges + 2 special).
        min_frequency: stop when the most frequent pair occurs fewer times.
        steps: a list that receives (pair, count) for every merge, if given.
    Returns:
        A `Tokenizer` with the learned merges.
    """
    counts = Counter(piece for text in texts for piece in pre_tokenize(clean(text)))
    words = {tuple(to_symbols(piece)): n for piece, n in counts.items()}
    vocab, merges = base_vocabulary(), []
    while len(vocab) + 2 < vocab_size:
        pairs = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        vocab.append(best[0] + best[1])
        if steps is not None:
            steps.append((best, pairs[best]))
        words = {tuple(merge_pair(list(s), best)): n for s, n in words.items()}
    vocab += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(vocab)}
    return Tokenizer(vocab, merges, context_length)
