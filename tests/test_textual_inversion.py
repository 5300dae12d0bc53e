"""Textual inversion: new tokens as transformers adds them, our embedding files read
by diffusers' `load_textual_inversion` (and the images equal), training that can
move nothing but the new vectors."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from conftest import diffusers_of, run_cli
from sdscratch.pipeline import StableDiffusion
from sdscratch.textual_inversion import (
    EmbeddingError,
    load_textual_inversion,
    save_embedding,
    start_textual_inversion,
    token_embedding,
)
from sdscratch.tokenizer import Tokenizer

PROMPTS = ["a small <heart> on the left", "a big blue <heart> above a green cross"]
OPTIONS = dict(num_inference_steps=4, guidance_scale=7.5, output_type="pt")
TOLERANCE = 1e-4


def ours(pipe, prompts=PROMPTS, seed=3):
    images = pipe(prompts, generator=torch.Generator().manual_seed(seed), **OPTIONS)
    return (images / 2 + 0.5).clamp(0, 1)


def theirs(reference, prompts=PROMPTS, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return reference(prompts, generator=generator, **OPTIONS).images


def vectors(pipe, count, seed=0):
    width = pipe.text_encoder.config.hidden_size
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


TEXTS = [
    "a <heart> on the left",
    "A <heart>, <heart>!",
    "<heart><heart> and <heart>_1 and <heart>_2",
    "a red heart",
    "x<heart>y",
]


def test_added_tokens_split_the_text_as_transformers_does(bundled, tmp_path):
    ours_ = copy.deepcopy(bundled.tokenizer)
    folder = ours_.save_pretrained(tmp_path / "base")
    reference = CLIPTokenizer.from_pretrained(folder)
    new = ["<heart>", "<heart>_1", "<heart>_2"]
    assert ours_.add_tokens(new) == [len(bundled.tokenizer) + i for i in range(3)]
    reference.add_tokens(new)
    assert len(ours_) == len(reference)
    for text in TEXTS:
        one_word = text.replace("<heart>_1", "").replace("<heart>_2", "")
        expected = reference(
            # diffusers' maybe_convert_prompt: "<heart>" stands for all three
            one_word.replace("<heart>", "<heart> <heart>_1 <heart>_2"),
            padding="max_length", max_length=ours_.context_length,
        ).input_ids  # fmt: skip
        assert ours_(one_word)[0].tolist() == expected, text
    # saved where transformers keeps them, and read back by both
    folder = ours_.save_pretrained(tmp_path / "added")
    again, reference = (
        Tokenizer.from_pretrained(folder),
        CLIPTokenizer.from_pretrained(folder),
    )
    assert again.added_tokens == ours_.added_tokens
    assert reference("x<heart>_1y").input_ids == [
        again.bos_id,
        *again.encode("x<heart>_1y"),
        again.eos_id,
    ]
    assert again.decode(again.encode("a <heart>_2 shape")) == "a <heart>_2 shape"
    with pytest.raises(ValueError, match="already has"):
        ours_.add_tokens("<heart>")


def test_adding_no_tokens_changes_nothing(bundled):
    tokenizer = copy.deepcopy(bundled.tokenizer)
    before = tokenizer(TEXTS)
    assert tokenizer.add_tokens([]) == []
    assert torch.equal(tokenizer(TEXTS), before)


@pytest.mark.parametrize("count", [1, 3])
def test_diffusers_loads_our_file_and_draws_our_images(pipe, tmp_path, count):
    reference = diffusers_of(pipe)
    path = save_embedding(vectors(pipe, count), "<heart>", tmp_path)
    assert path.name == "learned_embeds.safetensors"
    ids = load_textual_inversion(pipe, tmp_path)
    assert len(ids) == count
    reference.load_textual_inversion(str(tmp_path))
    expected = theirs(reference)
    assert (ours(pipe) - expected).abs().max() <= TOLERANCE
    # our pipeline with the new token goes to diffusers whole: tokenizer and table
    exported = diffusers_of(pipe)
    assert (theirs(exported) - expected).abs().max() <= TOLERANCE


def test_a1111_file_loads_in_diffusers_and_ours(pipe, tmp_path):
    reference = diffusers_of(pipe)
    path = save_embedding(vectors(pipe, 2), "heart", tmp_path / "heart.safetensors",
                          format="a1111")  # fmt: skip
    pipe.load_textual_inversion(path)  # A1111: the token is the file's name
    reference.load_textual_inversion(str(path), token="heart")
    prompts = ["a small heart on the left", "a blue heart above a green cross"]
    expected = theirs(reference, prompts)
    assert (ours(pipe, prompts) - expected).abs().max() <= TOLERANCE
    assert (expected - theirs(diffusers_of(pipe), ["a small", "a blue"])).abs().max()


def test_a_single_file_keeps_the_new_tokens(pipe, tmp_path):
    save_embedding(vectors(pipe, 3), "<heart>", tmp_path)
    load_textual_inversion(pipe, tmp_path)
    path = pipe.save_single_file(tmp_path / "model.safetensors")
    again = StableDiffusion.from_single_file(path)
    assert again.tokenizer.added_tokens == pipe.tokenizer.added_tokens
    assert torch.equal(ours(again), ours(pipe))


def test_the_vectors_matter(pipe, tmp_path):
    first, second = copy.deepcopy(pipe), pipe
    save_embedding(vectors(pipe, 1, seed=0), "<heart>", tmp_path / "a.safetensors")
    save_embedding(vectors(pipe, 1, seed=1), "<heart>", tmp_path / "b.safetensors")
    load_textual_inversion(first, tmp_path / "a.safetensors")
    load_textual_inversion(second, tmp_path / "b.safetensors")
    assert (ours(first) - ours(second)).abs().max() > 0.02


def test_training_moves_only_the_new_vectors(pipe):
    table = token_embedding(pipe.text_encoder).weight.detach().clone()
    weights = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    new = start_textual_inversion(pipe, "<heart>", num_vectors=2, init_token="star")
    grown = token_embedding(pipe.text_encoder).weight
    assert grown.shape == (len(table) + 2, table.shape[1])
    star = table[pipe.tokenizer.encode("star")].mean(0)
    assert torch.equal(new.vectors, star.repeat(2, 1))
    optimizer = torch.optim.AdamW(new.parameters(), lr=0.1, weight_decay=0.1)
    ids = pipe.tokenizer(["a <heart> on the left", "a red star"])
    hidden = pipe.text_encoder(ids)
    hidden[0].square().mean().backward()
    optimizer.step()
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    assert (new.vectors - star).abs().min() > 0  # both vectors learned
    assert torch.equal(token_embedding(pipe.text_encoder).weight[: len(table)], table)
    new.write()
    after = pipe.text_encoder.state_dict()
    assert torch.equal(after["embeddings.token_embedding.weight"][-2:], new.vectors)
    for key, value in weights.items():
        if key != "embeddings.token_embedding.weight":
            assert torch.equal(after[key], value), key
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


def test_an_embedding_that_does_not_fit_is_one_sentence_and_adds_nothing(
    pipe, tmp_path
):
    good = save_embedding(vectors(pipe, 1), "<heart>", tmp_path / "good.safetensors")
    load_textual_inversion(pipe, good)
    size, rows = len(pipe.tokenizer), token_embedding(pipe.text_encoder).weight.shape
    bad = {
        "width": {"<wide>": torch.zeros(1, 1024)},  # SD 2's width on another model
        "taken": {"<heart>": torch.zeros(1, rows[1])},
        "no vectors": {"<none>": torch.zeros(2, 3, rows[1])},
        "two tensors": {"a": torch.zeros(rows[1]), "b": torch.zeros(rows[1])},
        "integers": {"<int>": torch.zeros(1, rows[1], dtype=torch.long)},
    }
    paths = {name: tmp_path / f"{name.replace(' ', '_')}.safetensors" for name in bad}
    for name, tensors in bad.items():
        save_file(tensors, paths[name])
    (tmp_path / "embedding.pt").write_bytes(b"\x80\x04K\x01.")
    paths["pickle"] = tmp_path / "embedding.pt"
    for name, path in paths.items():
        with pytest.raises(ValueError) as error:
            load_textual_inversion(pipe, path)
            raise AssertionError(f"{name} loaded")
        message = str(error.value)
        assert str(path) in message and "\n" not in message, name
        assert message.endswith("."), name
        assert len(pipe.tokenizer) == size, name
        assert token_embedding(pipe.text_encoder).weight.shape == rows, name
    message = str(
        pytest.raises(ValueError, load_textual_inversion, pipe, paths["width"]).value
    )
    assert "1024 wide" in message and f"{rows[1]} wide" in message


def test_generate_with_an_embedding_and_a_wrong_width_is_one_line(pipe, tmp_path):
    path = save_embedding(vectors(pipe, 2), "<heart>", tmp_path / "heart.safetensors")
    common = ["generate", "a <heart> on the left", "--steps", 2]
    code, _, err = run_cli(*common, "-o", tmp_path / "a.png", "--embedding", path)
    assert code == 0, err
    wide = tmp_path / "wide.safetensors"
    save_file({"<wide>": torch.zeros(2, 1024)}, wide)
    code, _, err = run_cli(*common, "-o", tmp_path / "b.png", "--embedding", wide)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(wide) in err and "1024 wide" in err


def test_unloading_is_diffusers_unload_textual_inversion(pipe, tmp_path):
    """Two embeddings loaded, one unloaded: the tokenizer, the table and the images
    are diffusers' after its own `unload_textual_inversion`; unloading the other
    gives back the pipeline as it was, image for image."""
    before = ours(pipe, ["a small red circle on the left"])
    reference = diffusers_of(pipe)
    for token, count, folder in (("<heart>", 2, "a"), ("<dot>", 1, "b")):
        save_embedding(vectors(pipe, count, seed=count), token, tmp_path / folder)
        load_textual_inversion(pipe, tmp_path / folder)
        reference.load_textual_inversion(str(tmp_path / folder))
    assert pipe.unload_textual_inversion("<heart>") == [len(pipe.tokenizer.vocab) + i
                                                        for i in (0, 1)]  # fmt: skip
    reference.unload_textual_inversion(["<heart>", "<heart>_1"])
    assert list(pipe.tokenizer.added_tokens) == ["<dot>"]
    table = reference.text_encoder.get_input_embeddings().weight
    assert torch.equal(token_embedding(pipe.text_encoder).weight, table)
    prompts = ["a big <dot> at the top", "a <heart>"]  # "<heart>": plain words now
    assert (ours(pipe, prompts) - theirs(reference, prompts)).abs().max() <= TOLERANCE
    with pytest.raises(EmbeddingError, match="no added token '<heart>'"):
        pipe.unload_textual_inversion("<heart>")
    pipe.unload_textual_inversion()  # every added token
    assert pipe.tokenizer.added_tokens == {}
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer.vocab)
    assert torch.equal(ours(pipe, ["a small red circle on the left"]), before)
