import dataclasses
import json

import pytest
import torch

from sdscratch.checkpoint import (
    CheckpointError,
    load_component,
    resolve,
    save_component,
    verify,
    write_manifest,
)


@dataclasses.dataclass
class TinyConfig:
    sizes: tuple = (3, 5)  # in and out features
    bias: bool = True


class Tiny(torch.nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.layer = torch.nn.Linear(*config.sizes, bias=config.bias)


def saved(tmp_path, **kwargs):
    model = Tiny(TinyConfig(**kwargs))
    save_component(model, tmp_path / "tiny", TinyConfig(**kwargs))
    write_manifest(tmp_path, "python -m sdscratch train tiny", 0, 1.0, {"loss": 0.5})
    return model


def test_round_trip_restores_config_and_weights(tmp_path):
    model = saved(tmp_path, sizes=(4, 2))
    loaded = load_component(tmp_path / "tiny", Tiny, TinyConfig)
    assert loaded.layer.weight.shape == (2, 4)
    torch.testing.assert_close(loaded.layer.weight, model.layer.weight, rtol=0, atol=0)
    assert not loaded.training


def test_float16_storage_loads_into_float32(tmp_path):
    model = Tiny(TinyConfig())
    save_component(model, tmp_path, TinyConfig(), dtype=torch.float16)
    loaded = load_component(tmp_path, Tiny, TinyConfig)
    assert loaded.layer.weight.dtype == torch.float32
    torch.testing.assert_close(
        loaded.layer.weight, model.layer.weight, atol=1e-3, rtol=0
    )


def test_verify_catches_a_changed_file(tmp_path):
    saved(tmp_path)
    assert verify(tmp_path)["seed"] == 0
    weights = tmp_path / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        verify(tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    saved(tmp_path, sizes=(3, 5))
    config = tmp_path / "tiny" / "config.json"
    record = json.loads(config.read_text())
    record["config"]["sizes"] = [3, 6]
    config.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="do not match the model"):
        load_component(tmp_path / "tiny", Tiny, TinyConfig)


def test_a_pickle_is_not_loaded(tmp_path):
    saved(tmp_path)
    torch.save(
        {"layer.weight": torch.zeros(5, 3)}, tmp_path / "tiny" / "model.safetensors"
    )
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_component(tmp_path / "tiny", Tiny, TinyConfig)


def test_missing_manifest_and_unknown_names_are_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="MANIFEST.json is missing"):
        verify(tmp_path)
    with pytest.raises(CheckpointError, match="No checkpoint 'no-such-model'"):
        resolve("no-such-model")
