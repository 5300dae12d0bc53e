"""The tokenizer against transformers' CLIPTokenizer built from the same files."""

import random
import warnings

import pytest
import torch
from transformers import CLIPTokenizer

from sdscratch import assets_dir
from sdscratch.shapes.data import Shapes, vocabulary
from sdscratch.tokenizer import BOS, EOS, Tokenizer, clean, pre_tokenize, train_bpe

CORPUS = """\
Stable Diffusion turns a prompt into an image. The prompt is first cut into tokens,
each token becomes a vector, and a transformer mixes the vectors so that every word
knows its neighbours. A small red circle above a big blue square is not the same
picture as a big blue circle above a small red square: the order of the words matters.
Byte-pair encoding starts from single bytes and merges the most frequent neighbouring
pair again and again; frequent words end up as one token, rare ones as several pieces.
It's 2024 and we're training on 32x32 pixels, 1,000 steps at a time; don't worry!
Café, naïve, façade, Zürich, São Paulo, Ελληνικά, русский, 日本語, 🎨🖌️ and 100% more.
"""

SPECIAL_CASES = [
    "",
    " ",
    "\t\n  \r\n",
    "a",
    "A",
    "a photograph of an astronaut riding a horse",
    "A Small RED Circle on the LEFT",
    "a small red circle above a big blue square",
    "a big blue circle above a small red square",
    "there is a little purple triangle to the right of a big orange diamond",
    "hexagon octagon parallelogram trapezoid",  # unseen words
    "supercalifragilisticexpialidocious",
    "it's I'M you're we've they'll she'd don't",
    "IT'S 'S 's' ''s' rock'n'roll",
    "hello, world! how are you? fine... ok!!! (yes) [no] {maybe}",
    "#hashtag @mention $100 50% a+b=c x*y/z ~tilde `tick` ^caret | pipe",
    "-- --- ... ,,, ;;; ::: ??? !!! ''' \"\"\"",
    "3.14159 2,718 1e-5 0x1F 42 007 1000000",
    "12345678901234567890",
    "v1.5 sd-2.1 gpt-4o 4k 8K 1080p",
    "Café naïve façade résumé Zürich São Paulo",
    "e\u0301 (e + combining acute) vs \u00e9",
    "Ελληνικά ΟΔΟΣ Σίσυφος",
    "русский текст ЁЖИК",
    "日本語のテキスト 中文字符 한국어",
    "مرحبا بالعالم",
    "עברית",
    "हिन्दी",
    "🎨🖌️ emoji 👩‍🚀 astronaut 🇫🇷 flag",
    "İstanbul ǅ ﬁ ß ẞ",
    "Ⅻ ½ ² ٣ ৩ ①",
    "tab\tnew\nline\r\nvertical\x0bform\x0cfeed",
    "nbsp\u00a0thin\u2009ideo\u3000line\u2028para\u2029",
    "unit\x1fseparator\x1crecord\x1dgroup\x1e",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "null\x00byte and bell\x07",
    "<|startoftext|>",
    "<|endoftext|>",
    "a <|startoftext|> b <|endoftext|> c",
    "<|ENDOFTEXT|>!! <|EndOfText|>",
    "!!<|endoftext|>\u0338",
    "<|endoftext",
    "startoftext|>",
    "    leading and trailing spaces    ",
    "multiple     spaces     between",
    "a" * 200,
    "word " * 100,  # over-long: cut at 77
    " ".join(f"token{i}" for i in range(80)),
]


def random_strings(n, seed=0):
    """Seeded random strings over letters, digits, punctuation, whitespace, unicode."""
    rng = random.Random(seed)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        "     \t\n\u00a0\u2028\x1c.,;:!?'\"-_()[]{}<>|/\\@#$%^&*+=~`"
        "éÉñÑßçÇøåæœΣσςΟΔλжЖ中文字日本😀🎉👍\u0301\u0338"
    )
    words = ["'s", "'t", "'ll", "<|endoftext|>", "<|startoftext|>", "the", "circle"]
    strings = []
    for _ in range(n):
        parts = [rng.choice(alphabet) for _ in range(rng.randint(0, 30))]
        for _ in range(rng.randint(0, 2)):
            parts.insert(rng.randint(0, len(parts)), rng.choice(words))
        strings.append("".join(parts))
    return strings


CAPTIONS = [Shapes("test").scene(i)[0] for i in range(40)]
STRINGS = SPECIAL_CASES + CORPUS.splitlines() + CAPTIONS + random_strings(200)
BUNDLED = assets_dir() / "models" / "shapes-clip" / "tokenizer"


@pytest.fixture(scope="module", params=["corpus", "small", "bundled"])
def folder(request, tmp_path_factory):
    """vocab.json + merges.txt: trained here with `train_bpe`, or the bundled CLIP's."""
    if request.param == "bundled":
        return BUNDLED
    size = 1000 if request.param == "corpus" else 600
    tokenizer = train_bpe(CORPUS.splitlines() * 3, vocab_size=size)
    return tokenizer.save_pretrained(tmp_path_factory.mktemp(request.param))


def reference(folder):
    return CLIPTokenizer.from_pretrained(folder)


def test_there_are_at_least_200_strings():
    assert len(set(STRINGS)) >= 200


def test_ids_equal_transformers(folder):
    ours, theirs = Tokenizer.from_pretrained(folder), reference(folder)
    mismatches = [
        text
        for text in STRINGS
        if [ours.bos_id, *ours.encode(text), ours.eos_id] != theirs(text).input_ids
    ]
    assert mismatches == []


def test_padded_batch_equals_transformers(folder):
    ours, theirs = Tokenizer.from_pretrained(folder), reference(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the over-long strings warn
        ids = ours(STRINGS)
    expected = theirs(
        STRINGS,
        padding="max_length",
        max_length=ours.context_length,  # 77, or the bundled CLIP's 32
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.dtype == torch.long and ids.shape == (len(STRINGS), ours.context_length)
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)


def test_decode_equals_transformers(folder):
    ours, theirs = Tokenizer.from_pretrained(folder), reference(folder)
    for text in STRINGS:
        ids = theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_tokens_are_the_learned_pieces():
    tokenizer = train_bpe(CORPUS.splitlines() * 3, vocab_size=1000)
    assert tokenizer.tokenize("the prompt") == ["the</w>", "prompt</w>"]
    assert pre_tokenize(clean("It's  A\tTEST!?")) == ["it", "'s", "a", "test", "!?"]
    assert len(tokenizer.tokenize("zqxj")) == 4  # unseen: one byte each


def test_over_long_prompt_is_cut_with_a_warning():
    tokenizer = train_bpe(CORPUS.splitlines(), vocab_size=700, context_length=8)
    text = "the prompt is first cut into tokens and more"
    with pytest.warns(UserWarning, match="Prompt truncated") as caught:
        ids = tokenizer([text, "the"])
    dropped = len(tokenizer.encode(text)) - 6
    assert f"the last {dropped} of its" in str(caught[0].message)
    assert ids.shape == (2, 8)
    assert ids[0, 0] == tokenizer.bos_id and ids[0, -1] == tokenizer.eos_id
    assert ids[1].tolist()[2:] == [tokenizer.eos_id] * 6  # end token, then padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer(["the prompt"])  # fits: no warning


def test_save_and_load_round_trip(tmp_path):
    tokenizer = train_bpe(CORPUS.splitlines(), vocab_size=800, context_length=20)
    loaded = Tokenizer.from_pretrained(tokenizer.save_pretrained(tmp_path))
    assert loaded.vocab == tokenizer.vocab and loaded.merges == tokenizer.merges
    assert loaded.context_length == 20
    lines = CORPUS.splitlines()[:3]
    torch.testing.assert_close(loaded(lines, 77), tokenizer(lines, 77))


def test_trainer_merges_the_most_frequent_pair_first():
    # Sennrich et al. 2016's example: low ×5, lower ×2, newest ×6, widest ×3.
    texts = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
    steps = []
    tokenizer = train_bpe(texts, vocab_size=512 + 3 + 2, steps=steps)
    # (e, s) and (s, t</w>) both occur 9 times: the alphabetically first wins.
    assert steps == [(("e", "s"), 9), (("es", "t</w>"), 9), (("l", "o"), 7)]
    assert len(tokenizer) == 517
    assert tokenizer.tokenize("newest") == ["n", "e", "w", "est</w>"]


def test_trainer_stops_when_every_word_is_one_token():
    texts = ["a red circle", "a blue square", "a red square"] * 10
    tokenizer = train_bpe(texts, vocab_size=1000)
    assert len(tokenizer) < 1000
    for word in ("a", "red", "blue", "circle", "square"):
        assert tokenizer.tokenize(word) == [word + "</w>"]
    assert tokenizer.vocab[BOS] == len(tokenizer) - 2
    assert tokenizer.vocab[EOS] == len(tokenizer) - 1


def test_bundled_vocabulary_is_small_and_holds_every_caption_word():
    tokenizer = Tokenizer.from_pretrained("shapes-clip")
    assert len(tokenizer) <= 1000
    for word in vocabulary():
        assert tokenizer.tokenize(word) == [word + "</w>"]


def test_a_vocabulary_learned_from_natural_captions_keeps_their_words_whole():
    """What the clip recipe demands of its tokenizer, once it learns from captions
    as people write them: every word one token, every caption within the context."""
    from sdscratch.recipes.clip import CLIP_CONTEXT

    train = Shapes("train", captions="natural")
    captions = [train.scene(i)[0] for i in range(5000)]
    tokenizer = train_bpe(captions, vocab_size=1000, context_length=CLIP_CONTEXT)
    for word in vocabulary("natural"):
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    longest = max(len(tokenizer.tokenize(text)) for text in captions)
    assert longest + 2 <= CLIP_CONTEXT  # with BOS and EOS
