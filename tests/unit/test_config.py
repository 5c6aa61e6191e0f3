"""Config validation: unknown keys, wrong types and invalid choices name the file and key."""
from __future__ import annotations

import pytest

from transduce.config import ConfigError
from transduce.registry import load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


GOOD = """
model: {family: transformer, d_model: 64, heads: 4}
data: {dataset: cmudict}
train: {lr: 0.001}
"""


def test_recipe_loads_and_overrides(tmp_path):
    cfg = load_config("recipes/g2p_cmudict.yaml", ["train.lr=5e-4", "model.d_model=96", "decode.beam=3"])
    assert cfg.train.lr == 5e-4 and cfg.model.d_model == 96 and cfg.decode.beam == 3
    assert isinstance(load_config(write(tmp_path, GOOD)).train.lr, float)


@pytest.mark.parametrize("text,needle", [
    (GOOD.replace("lr: 0.001", "lrr: 0.001"), "train.lrr: unknown key; valid keys here:"),
    (GOOD.replace("lr: 0.001", "lr: fast"), "train.lr: expected a number"),
    (GOOD.replace("d_model: 64", "d_model: 6.5"), "model.d_model: expected an integer"),
    (GOOD.replace("family: transformer", "family: rnnn"), "'model.family': invalid choice 'rnnn'; valid choices: transformer"),
    (GOOD.replace("{dataset: cmudict}", "{dataset: wiki}"), "data.dataset: 'wiki' is not"),
    (GOOD.replace("{lr: 0.001}", "{schedule: step}"), "valid choices: 'inverse_sqrt', 'cosine', 'linear', 'constant'"),
    (GOOD.replace("heads: 4", "heads: 5"), "d_model=64 must be divisible by heads=5"),
    (GOOD + "extra: {a: 1}\n", "extra: unknown key"),
    (GOOD + "eval: {metrics: [wer, bogus]}\n", "invalid choice 'bogus'"),
    (GOOD.replace("{lr: 0.001}", "{schedule: cosine}"), "cosine' needs max_steps"),
    ("model: [1, 2]\n", "model.family' is required"),
    ("model: {family: transformer\n", "not valid YAML"),
])
def test_bad_configs_name_file_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert needle in str(e.value), str(e.value)


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(write(tmp_path, GOOD), ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(write(tmp_path, GOOD), ["train.lr"])
