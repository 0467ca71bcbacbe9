"""Unit tests of dpmix_dist/config.py: loading, dotted overrides, validation errors that name the key."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from dpmix_dist.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    PrivacyConfig,
    check_against_dataset,
    config_from_dict,
    dump_config,
    load_config,
)

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
        ("run.checkpoint_every_steps=-1", "run.checkpoint_every_steps"),
        ("run.checkpoint_every_steps=2.5", "run.checkpoint_every_steps"),
        ("run.collective_timeout_s=0", "run.collective_timeout_s"),
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
    with pytest.raises(
        ConfigError, match=r"binary.yaml: not a UTF-8 text file \(byte 0xff at position 0\).*save it as UTF-8"
    ):
        load_config(str(path))


def test_the_demo_registers_its_private_model():
    """`make demo` runs this config: its model must land in the MLflow registry (tested in test_tracking)."""
    assert load_config("fmnist_effnet_lite0").tracking.register_as == "fmnist-effnet-lite0"
    assert load_config("fmnist_effnet_lite0", ["tracking.register_as="]).tracking.register_as == ""


# ------------------------------------------------------------------------------- settings that do nothing


def test_the_conditional_settings_and_their_conditions():
    """Every setting that only some choices use declares them (`only_when`); this is the list (README: Running)."""
    declared = {
        f"{section.name}.{f.name}": f.metadata["only_when"]
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory)
        if "only_when" in f.metadata
    }
    views, mixing = ("self_aug", "dpmix_self", "dpmix_diff"), ("dpmix_self", "dpmix_diff")
    assert declared == {
        "model.groupnorm_groups": {"norm": ("groupnorm",)},
        "model.num_trainable_blocks": {"trainable": ("last_blocks",)},
        "augment.mix_alpha": {"method": mixing},
        "augment.include_unmixed": {"method": mixing},
        "augment.transforms": {"method": views},
        "augment.crop_padding_fraction": {"method": views, "transforms": ("crop",)},
        "optim.momentum": {"name": ("sgd",)},
        "performance.feature_cache_on_disk": {"cache_frozen_features": (True,)},
        "performance.feature_cache_max_gb": {"cache_frozen_features": (True,)},
    }


SELF_AUG = ["augment.method=self_aug", "augment.num_views=2"]
DPMIX_SELF = ["augment.method=dpmix_self", "augment.num_views=2", "augment.num_mixes=2"]


@pytest.mark.parametrize(
    "overrides, key, needed",
    [
        (
            ["optim.name=adam"],
            "optim.momentum",
            "only optim.name=sgd uses it, not optim.name=adam",
        ),  # tiny_test sets 0.0
        (["optim.name=adamw", "optim.momentum=0.9"], "optim.momentum", "not optim.name=adamw"),  # the default, written
        (
            ["augment.mix_alpha=0.5"],
            "augment.mix_alpha",
            "only augment.method=dpmix_self/dpmix_diff uses it, not augment.method=dpsgd",
        ),
        ([*SELF_AUG, "augment.mix_alpha=0.2"], "augment.mix_alpha", "not augment.method=self_aug"),
        ([*SELF_AUG, "augment.include_unmixed=false"], "augment.include_unmixed", "not augment.method=self_aug"),
        (["augment.include_unmixed=true"], "augment.include_unmixed", "not augment.method=dpsgd"),
        (["augment.transforms=[flip]"], "augment.transforms", "only augment.method=self_aug/dpmix_self/dpmix_diff"),
        (["augment.crop_padding_fraction=0.1"], "augment.crop_padding_fraction", "not augment.method=dpsgd"),
        (
            [*SELF_AUG, "augment.transforms=[flip]", "augment.crop_padding_fraction=0.02"],
            "augment.crop_padding_fraction",
            "only augment.transforms with crop uses it, not augment.transforms=[flip]",
        ),
        (
            ["model.trainable=head"],
            "model.num_trainable_blocks",
            "only model.trainable=last_blocks uses it, not model.trainable=head",
        ),  # tiny_test sets 2
        (
            ["model.trainable=all", "model.num_trainable_blocks=1"],
            "model.num_trainable_blocks",
            "not model.trainable=all",
        ),
        (
            ["model.groupnorm_groups=16"],
            "model.groupnorm_groups",
            "only model.norm=groupnorm uses it, not model.norm=freeze",
        ),
        (
            ["performance.cache_frozen_features=false", "performance.feature_cache_on_disk=false"],
            "performance.feature_cache_on_disk",
            "only performance.cache_frozen_features=true uses it",
        ),
        (
            ["performance.cache_frozen_features=false", "performance.feature_cache_max_gb=4"],
            "performance.feature_cache_max_gb",
            "not performance.cache_frozen_features=false",
        ),
    ],
)
def test_a_setting_that_does_nothing_is_refused_naming_it_and_the_fix(overrides, key, needed):
    message = _error("tiny_test", overrides)
    assert message.startswith(f"{key}: does nothing here: ")
    assert needed in message
    assert message.endswith(f"remove it (on the command line: {key}=null)")
    assert load_config("tiny_test", [*overrides, f"{key}=null"])  # the fix it names works


def test_a_setting_written_in_the_file_is_refused_even_at_its_default(tmp_path):
    path = tmp_path / "adam.yaml"
    path.write_text("optim:\n  name: adam\n  momentum: 0.9\n")
    assert _error(str(path), []).startswith("optim.momentum: does nothing here: only optim.name=sgd")
    path.write_text("optim:\n  name: adam\n")
    assert load_config(str(path)).optim == dataclasses.replace(Config().optim, name="adam")
    path.write_text("optim:\n  name: adam\n  momentum: null\n")  # null in a file is a value, not "unset"
    assert _error(str(path), []).startswith("optim.momentum: must be a number")


@pytest.mark.parametrize(
    "overrides, check",
    [
        (["optim.name=adam", "optim.momentum=null"], lambda c: c.optim.name == "adam" and c.optim.momentum == 0.9),
        (["model.trainable=head", "model.num_trainable_blocks=null"], lambda c: c.model.num_trainable_blocks == 1),
        (["model.trainable=last_blocks", "model.num_trainable_blocks=3"], lambda c: c.model.num_trainable_blocks == 3),
        (["model.norm=groupnorm", "model.groupnorm_groups=8"], lambda c: c.model.groupnorm_groups == 8),
        (
            [
                *DPMIX_SELF,
                "augment.mix_alpha=0.5",
                "augment.include_unmixed=false",
                "augment.transforms=[crop]",
                "augment.crop_padding_fraction=0.1",
            ],
            lambda c: (c.augment.mix_alpha, c.augment.include_unmixed, c.augment.transforms) == (0.5, False, ("crop",)),
        ),
        ([*SELF_AUG, "augment.transforms=[flip]"], lambda c: c.augment.transforms == ("flip",)),
        ([*SELF_AUG, "augment.crop_padding_fraction=0.1"], lambda c: c.augment.crop_padding_fraction == 0.1),
        (["performance.cache_frozen_features=false"], lambda c: not c.performance.cache_frozen_features),
        (["performance.feature_cache_on_disk=false"], lambda c: not c.performance.feature_cache_on_disk),
        # the switches keep their section: one override makes the non-private ceiling, or a run without MLflow
        (
            ["privacy.enabled=false", "privacy.target_epsilon=2", "privacy.noise_multiplier=1.5"],
            lambda c: not c.privacy.enabled and c.privacy.target_epsilon == 2,
        ),
        (
            ["tracking.enabled=false", "tracking.uri=sqlite:///x.db", "tracking.register_as=m"],
            lambda c: not c.tracking.enabled and c.tracking.register_as == "m",
        ),
    ],
)
def test_settings_that_are_used_load(overrides, check):
    assert check(load_config("tiny_test", overrides))


def test_a_config_built_in_code_is_refused_only_for_a_value_that_differs_from_the_default():
    from dpmix_dist.config import OptimConfig

    assert Config(optim=OptimConfig(name="adam")).optim.momentum == 0.9  # no way to tell the default was "written"
    with pytest.raises(ConfigError, match=r"^optim\.momentum: does nothing here: .*not optim\.name=adam"):
        Config(optim=OptimConfig(name="adam", momentum=0.5))
    dpmix = load_config("tiny_test", [*DPMIX_SELF, "augment.mix_alpha=0.5"])
    with pytest.raises(ConfigError, match=r"^augment\.mix_alpha: does nothing here"):
        dataclasses.replace(dpmix, augment=dataclasses.replace(dpmix.augment, method="self_aug", num_mixes=0))


def test_null_override_restores_the_default_and_still_names_unknown_keys():
    assert load_config("tiny_test", ["optim.lr=0.1", "optim.lr=null"]).optim.lr == Config().optim.lr
    assert load_config("tiny_test", ["optim.momentum=null"]).optim.momentum == 0.9  # tiny_test's 0.0 taken out
    assert load_config("tiny_test", ["optim=null"]).optim == Config().optim  # a whole section
    assert load_config("tiny_test", ["optim=null", "optim.lr=2"]).optim.lr == 2.0
    assert _error("tiny_test", ["optim.momentun=null"]).startswith("optim.momentun: unknown key")


@pytest.mark.parametrize(
    "overrides, absent",
    [
        (
            [],
            {
                "augment.mix_alpha",
                "augment.include_unmixed",
                "augment.transforms",
                "augment.crop_padding_fraction",
                "model.groupnorm_groups",
            },
        ),
        (
            [
                "optim.name=adam",
                "optim.momentum=null",
                "model.trainable=head",
                "model.num_trainable_blocks=null",
                "performance.cache_frozen_features=false",
            ],
            {
                "optim.momentum",
                "model.num_trainable_blocks",
                "performance.feature_cache_on_disk",
                "performance.feature_cache_max_gb",
                "model.groupnorm_groups",
                "augment.mix_alpha",
                "augment.include_unmixed",
                "augment.transforms",
                "augment.crop_padding_fraction",
            },
        ),
        (
            [*SELF_AUG, "augment.transforms=[flip]"],
            {"augment.mix_alpha", "augment.include_unmixed", "augment.crop_padding_fraction", "model.groupnorm_groups"},
        ),
        ([*DPMIX_SELF, "model.norm=groupnorm", "model.groupnorm_groups=8"], set()),
    ],
)
def test_saved_config_leaves_out_what_does_nothing_and_loads_back(tmp_path, overrides, absent):
    config = load_config("tiny_test", overrides)
    text = dump_config(config)
    written = {f"{name}.{key}" for name, section in yaml.safe_load(text).items() for key in section}
    every = {f"{name}.{key}" for name, section in dataclasses.asdict(config).items() for key in section}
    assert every - written == absent
    (tmp_path / "config.yaml").write_text(text)
    assert load_config(str(tmp_path / "config.yaml")) == config


def test_every_field_has_a_docstring():
    """The attribute docstring under each field of every section (what the README and `--help` users read)."""
    import ast
    import inspect

    from dpmix_dist import config as module

    tree = ast.parse(inspect.getsource(module))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for cls in [Config, *(f.default_factory for f in dataclasses.fields(Config))]:
        body = classes[cls.__name__].body
        documented = {
            node.target.id
            for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
            and after.value.value.strip()
        }
        assert {f.name for f in dataclasses.fields(cls)} - documented == set(), cls.__name__
