import pytest
import torch

import llmdeploy
from llmdeploy import Compose, recipe
from llmdeploy.errors import ConfigError
from llmdeploy.quant import RTN, DynamicInt8

from .conftest import ids_for


def test_yaml_recipe_builds_compose(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "- method: rtn\n  bits: 3\n  group_size: 32\n  overrides: {down_proj: null}\n"
        "- method: dynamic_int8\n"
    )
    compose = recipe.load(path)
    assert isinstance(compose, Compose) and len(compose) == 2
    assert compose.steps[0] == RTN(bits=3, group_size=32, overrides={"down_proj": None})
    assert isinstance(compose.steps[1], DynamicInt8)
    # The pipeline from YAML equals applying the same steps by hand.
    m1, tok = llmdeploy.load("tiny-llama")
    m2, _ = llmdeploy.load("tiny-llama")
    compose(m1)
    DynamicInt8()(RTN(bits=3, group_size=32, overrides={"down_proj": None})(m2))
    ids = ids_for(tok)
    assert torch.equal(m1(ids).logits, m2(ids).logits)
    assert llmdeploy.applied_recipe(m1) == compose.to_list()
    recipe.dump(compose, tmp_path / "again.yaml")
    assert recipe.load(tmp_path / "again.yaml").to_list() == compose.to_list()


def test_mapping_form_with_calibration_settings(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("calibration: {n_samples: 16, seq_len: 64}\nsteps:\n  - method: rtn\n    bits: 4\n")
    compose, settings = recipe.load_with_settings(path)
    assert settings == {"n_samples": 16, "seq_len": 64} and compose.steps[0].bits == 4


@pytest.mark.parametrize("name", recipe.builtin_recipes())
def test_builtin_recipes_load(name):
    assert len(recipe.load(name)) >= 1


def test_bad_recipes(tmp_path):
    with pytest.raises(ConfigError, match="unknown compression method 'gptq9'"):
        recipe.from_list([{"method": "gptq9"}])
    with pytest.raises(ConfigError, match="no argument"):
        recipe.from_list([{"method": "rtn", "bitz": 4}])
    with pytest.raises(ConfigError, match="'method' key"):
        recipe.from_list([{"bits": 4}])
    with pytest.raises(ConfigError, match="built-in recipes"):
        recipe.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        recipe.load(tmp_path / "bad.yaml")
