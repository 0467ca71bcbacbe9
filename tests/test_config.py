"""Unit tests of dpmix_dist/config.py: loading, dotted overrides, validation errors that name the key."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from dpmix_dist.config import (
    CONFIG_DIR, Config, ConfigError, PrivacyConfig, check_against_dataset, config_from_dict, dump_config, load_config,
)  # fmt: skip

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))  # configs/accelerate/*.yaml are accelerate's, not ours


def _error(name: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(name, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ loading


def test_shipped_configs_exist():
    names = {p.stem for p in SHIPPED}
    assert {"tiny_test", "fmnist_effnet_lite0"} <= names


def test_load_by_name_with_and_without_yaml_and_by_path(tmp_path):
    by_name = load_config("tiny_test")
    assert by_name == load_config("tiny_test.yaml")
    assert by_name == load_config(str(CONFIG_DIR / "tiny_test.yaml"))
    outside = tmp_path / "mine.yaml"
    shutil.copy(CONFIG_DIR / "tiny_test.yaml", outside)
    assert by_name == load_config(str(outside))
    # The values really come from the file, not from the defaults.
    assert by_name.model.name == "test_efficientnet"
    assert by_name.privacy.target_delta == 1e-3
    assert by_name.privacy.expected_batch_size == 32
    assert by_name.privacy.accountant == "rdp"
    assert by_name != Config()


def test_missing_sections_take_defaults(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("privacy:\n  target_epsilon: 3.0\n")
    config = load_config(str(path))
    assert config.privacy.target_epsilon == 3.0
    assert config.model == Config().model
    assert config.privacy.target_delta == PrivacyConfig().target_delta


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path.stem)
    assert isinstance(config, Config)
    assert config == load_config(str(path))


def test_unknown_config_name_lists_shipped_configs():
    message = _error("no_such_config_xyz", [])
    assert "no_such_config_xyz" in message
    for path in SHIPPED:
        assert path.stem in message


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert str(path) in _error(str(path), [])


def test_invalid_yaml_syntax(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("privacy:\n  target_epsilon: [1, 2\n")
    assert str(path) in _error(str(path), [])


# ---------------------------------------------------------------------------------------------- overrides


def test_overrides_take_effect_with_types():
    base = load_config("tiny_test")
    config = load_config("tiny_test", ["privacy.target_epsilon=2", "optim.lr=0.25"])
    assert config.privacy.target_epsilon == 2.0
    assert type(config.privacy.target_epsilon) is float  # an int for a float field is accepted, as a float
    assert config.optim.lr == 0.25
    # Nothing else moved.
    assert dataclasses.replace(config, privacy=base.privacy, optim=base.optim) == base


def test_overrides_of_every_kind():
    config = load_config(
        "tiny_test",
        [
            "privacy.epochs=3",
            "privacy.expected_batch_size=64",
            "privacy.noise_multiplier=1.5",
            "privacy.accountant=prv",
            "performance.cache_frozen_features=false",
            "model.name=resnet18",
            "model.weights=pypi:efficientnet_lite0",
            "data.root=/tmp/some where/data",
        ],
    )
    assert config.privacy.epochs == 3.0 and type(config.privacy.epochs) is float
    assert config.privacy.expected_batch_size == 64 and type(config.privacy.expected_batch_size) is int
    assert config.privacy.noise_multiplier == 1.5
    assert config.privacy.accountant == "prv"
    assert config.performance.cache_frozen_features is False
    assert config.model.name == "resnet18"
    assert config.model.weights == "pypi:efficientnet_lite0"
    assert config.data.root == "/tmp/some where/data"
    assert load_config("tiny_test", ["privacy.noise_multiplier=null"]).privacy.noise_multiplier is None


def test_later_override_wins():
    config = load_config("tiny_test", ["optim.lr=0.1", "optim.lr=0.3"])
    assert config.optim.lr == 0.3


def test_override_scientific_notation_for_a_float():
    # `privacy.target_delta=1e-5` is the natural way to write δ. PyYAML (YAML 1.1) reads `1e-5` (no dot) as the
    # string '1e-5', so this fails unless config.py accepts it.
    config = load_config("tiny_test", ["privacy.target_delta=1e-5"])
    assert config.privacy.target_delta == 1e-5


def test_malformed_override_without_equals():
    message = _error("tiny_test", ["privacy.target_epsilon"])
    assert "privacy.target_epsilon" in message
    assert "=" in message


def test_override_through_a_non_section():
    message = _error("tiny_test", ["privacy.target_epsilon.x=1"])
    assert "privacy.target_epsilon" in message


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, key",
    [
        ("bogus.x=1", "bogus"),  # unknown top-level section
        ("bogus=1", "bogus"),
        ("privacy.epsilon=2", "privacy.epsilon"),  # unknown nested key
        ("optim.learning_rate=0.1", "optim.learning_rate"),
    ],
)
def test_unknown_key_is_named(override, key):
    message = _error("tiny_test", [override])
    assert message.startswith(f"{key}:")
    assert "unknown key" in message


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("privacy:\n  target_epsilon: 2.0\n  max_grad_nrom: 1.0\n")
    message = _error(str(path), [])
    assert message.startswith("privacy.max_grad_nrom:")
    assert "max_grad_norm" in message  # the valid keys are listed


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.target_epsilon=abc", "privacy.target_epsilon"),  # string for a float
        ("privacy.target_epsilon=true", "privacy.target_epsilon"),  # bool is not a number
        ("privacy.expected_batch_size=2.5", "privacy.expected_batch_size"),  # float for an int
        ("privacy.expected_batch_size=32.0", "privacy.expected_batch_size"),
        ("privacy.expected_batch_size=true", "privacy.expected_batch_size"),
        ("run.progress_bar=1", "run.progress_bar"),  # non-bool for a bool
        ("run.progress_bar=maybe", "run.progress_bar"),
        ("performance.cache_frozen_features=0", "performance.cache_frozen_features"),
        ("model.name=[a, b]", "model.name"),
        ("privacy.noise_multiplier=high", "privacy.noise_multiplier"),
        ("privacy=3", "privacy"),  # a section that is not a mapping
    ],
)
def test_wrong_type_is_named(override, key):
    message = _error("tiny_test", [override])
    assert message.startswith(f"{key}:")


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.name=rmsprop", "optim.name"),
        ("privacy.accountant=gdp", "privacy.accountant"),
        ("model.norm=batchnorm", "model.norm"),
        ("augment.method=mixup", "augment.method"),
    ],
)
def test_literal_value_not_allowed(override, key):
    message = _error("tiny_test", [override])
    assert message.startswith(f"{key}:")
    assert override.split("=")[1] in message


def test_literal_error_lists_allowed_values():
    message = _error("tiny_test", ["optim.name=rmsprop"])
    for allowed in ("sgd", "adam", "adamw"):
        assert allowed in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.target_epsilon=0", "privacy.target_epsilon"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
        ("privacy.target_epsilon=.nan", "privacy.target_epsilon"),
        ("privacy.target_delta=1", "privacy.target_delta"),
        ("privacy.target_delta=1.5", "privacy.target_delta"),
        ("privacy.target_delta=0", "privacy.target_delta"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
        ("privacy.max_grad_norm=-0.5", "privacy.max_grad_norm"),
        ("privacy.expected_batch_size=0", "privacy.expected_batch_size"),
        ("privacy.expected_batch_size=-3", "privacy.expected_batch_size"),
        ("privacy.epochs=0", "privacy.epochs"),
        ("privacy.noise_multiplier=0", "privacy.noise_multiplier"),
        ("optim.lr=0", "optim.lr"),
        ("optim.momentum=1", "optim.momentum"),
        ("performance.micro_batch_size=0", "performance.micro_batch_size"),
        ("augment.num_views=2", "augment.num_views"),  # dpsgd takes exactly one view
        ("data.image_size=4", "data.image_size"),
    ],
)
def test_impossible_values_are_named(override, key):
    message = _error("tiny_test", [override])
    assert message.startswith(f"{key}:")


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.target_epsilon=.inf", "privacy.target_epsilon"),  # "no privacy" must be said explicitly, not by ∞
        ("privacy.max_grad_norm=.inf", "privacy.max_grad_norm"),  # ∞ clipping bound: unbounded sensitivity
        ("privacy.noise_multiplier=.inf", "privacy.noise_multiplier"),
        ("privacy.epochs=.inf", "privacy.epochs"),  # infinitely many planned steps
    ],
)
def test_non_finite_privacy_values_are_rejected(override, key):
    message = _error("tiny_test", [override])
    assert message.startswith(f"{key}:")


def test_construct_directly_validates():
    with pytest.raises(ConfigError, match=r"^privacy\.target_delta:"):
        PrivacyConfig(target_delta=1.0)


# ------------------------------------------------------------------------------------ checks that need N


def test_check_against_dataset_delta():
    config = load_config("tiny_test", ["privacy.target_delta=0.001", "privacy.expected_batch_size=32"])
    for num_train in (999, 200):  # δ < 1/N: fine
        check_against_dataset(config, num_train)
    for num_train in (1000, 1001, 60000):  # δ >= 1/N (δ = 1/N exactly included)
        with pytest.raises(ConfigError) as info:
            check_against_dataset(config, num_train)
        assert str(info.value).startswith("privacy.target_delta:")
        assert str(num_train) in str(info.value)


def test_check_against_dataset_batch():
    config = load_config("tiny_test", ["privacy.target_delta=1.0e-6", "privacy.expected_batch_size=32"])
    check_against_dataset(config, 32)  # a batch of the whole set is allowed (q = 1)
    with pytest.raises(ConfigError) as info:
        check_against_dataset(config, 31)
    assert str(info.value).startswith("privacy.expected_batch_size:")
    assert "31" in str(info.value)


# ------------------------------------------------------------------------------------ dump and frozenness


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_dump_config_round_trips(path):
    config = load_config(path.stem)
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config


def test_dump_config_round_trips_unusual_values():
    config = load_config("tiny_test", ["privacy.target_delta=1.0e-7", "privacy.noise_multiplier=0.7", "optim.lr=3"])
    # Strings that YAML would read as other types if dumped unquoted.
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, name="yes", weights="null"),
        data=dataclasses.replace(config.data, root="/a b/c: d", cache_dir="1.5"),
    )
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config


def test_config_is_frozen():
    config = load_config("tiny_test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.privacy.target_epsilon = 100.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.privacy = PrivacyConfig()  # type: ignore[misc]
    assert config.privacy.target_epsilon == 8.0


def test_config_that_is_not_utf8_text_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfeprivacy:\n")
    with pytest.raises(ConfigError, match=r"binary.yaml: not a UTF-8 text file \(byte 0xff at position 0\).*save it as UTF-8"):
        load_config(str(path))


def test_the_demo_registers_its_private_model():
    """`make demo` runs this config: its model must land in the MLflow registry (tested in test_tracking)."""
    assert load_config("fmnist_effnet_lite0").tracking.register_as == "fmnist-effnet-lite0"
    assert load_config("fmnist_effnet_lite0", ["tracking.register_as="]).tracking.register_as == ""
