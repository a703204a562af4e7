"""The typed config tree: loading, overrides, and errors that tell the user what to change."""

import pytest

from longtrain.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_are_the_embedded_tiny_looped_job():
    cfg = load_config()
    assert cfg.model.arch == "looped" and cfg.data.source == "stdlib"


def test_override_types_are_coerced():
    cfg = load_config("tiny", ["optim.lr=1e-3", "model.tie_embeddings=true", "parallel.sp=2",
                               "model.rope_scaling.type=llama3", "parallel.pp_boundaries=[2, 4]"])
    assert cfg.optim.lr == 1e-3 and cfg.model.tie_embeddings is True and cfg.parallel.sp == 2
    assert cfg.model.rope_scaling.type == "llama3" and cfg.parallel.pp_boundaries == [2, 4]


def test_typo_in_key_suggests_the_nearest_valid_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.learning_rat=0.1"])
    with pytest.raises(ConfigError) as e2:
        load_config(None, ["optim.lr_=0.1"])
    assert "optim.lr_" in str(e2.value) and "'lr'" in str(e2.value)
    assert "unknown config key 'optim.learning_rat'" in str(e.value)
    with pytest.raises(ConfigError) as e3:
        load_config(None, ["modle.dim=64"])
    assert "'model'" in str(e3.value)


def test_bad_values_name_key_value_and_allowed():
    with pytest.raises(ConfigError, match=r"model.attn_backend='fast'.*choose one of"):
        load_config(None, ["model.attn_backend=fast"])
    with pytest.raises(ConfigError, match=r"optim.lr=-0.1 must be > 0"):
        load_config(None, ["optim.lr=-0.1"])
    with pytest.raises(ConfigError, match=r"data.batch_size='many' must be an integer"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match=r"n_heads=6 is not divisible by model.n_kv_heads=4"):
        load_config(None, ["model.dim=96", "model.n_heads=6", "model.n_kv_heads=4"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-config")


def test_saved_config_round_trips():
    cfg = load_config("llama3-8b", ["data.seq_len=4096"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "llama3.2-1b", "llama3-8b", "looped-1b"])
def test_shipped_configs_load(name):
    """Each shipped YAML loads, and every value it sets is the value the config tree holds."""
    from pathlib import Path

    import yaml

    cfg = load_config(name)
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    written = yaml.safe_load(path.read_text()) or {}
    assert written, f"{path} sets nothing"
    for section, values in written.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value, f"{name}: {section}.{key} = {got!r}, the file says {value!r}"
