"""The sweep's planning (dpmix_dist/sweep.py): per-method overrides, the non-private ceiling, the table (the runs
themselves are exercised in test_tracking.py's sweep test)."""

from __future__ import annotations

import math

import pytest

from dpmix_dist import sweep
from dpmix_dist.config import load_config
from dpmix_dist.errors import ConfigError


def test_method_scoped_overrides_and_non_private_runs():
    args = sweep.parse_args(
        [
            "--config",
            "tiny_test",
            "--epsilons",
            "1,8",
            "--methods",
            "dpsgd,dpmix_self",
            "--non-private",
            "dpsgd",
            "--seeds",
            "0,1",
            "optim.lr=0.1",
            "dpmix_self:augment.num_views=2",
            "dpmix_self:augment.num_mixes=3",
        ]
    )
    common, scoped = sweep._split_overrides(args.overrides)
    assert common == ["optim.lr=0.1"] and scoped == {"dpmix_self": ["augment.num_views=2", "augment.num_mixes=3"]}
    combos = sweep._combinations(args, "dpsgd")
    assert [c["name"] for c in combos][-2:] == ["dpsgd-nonprivate-rep0", "dpsgd-nonprivate-rep1"]
    assert len(combos) == 2 * 2 * 2 + 2
    mix = next(c for c in combos if c["method"] == "dpmix_self" and c["epsilon"] == 8)
    assert sweep._run_overrides(common, scoped, mix) == [
        "optim.lr=0.1",
        "augment.method=dpmix_self",
        "augment.num_views=2",
        "augment.num_mixes=3",
        "privacy.target_epsilon=8.0",
    ]
    ceiling = next(c for c in combos if math.isinf(c["epsilon"]))
    assert sweep._run_overrides(common, scoped, ceiling)[-3:] == [
        "augment.method=dpsgd",
        "privacy.enabled=false",
        "tracking.register_as=",
    ]


def test_table_has_a_non_private_column():
    rows = [
        {
            "method": "dpsgd",
            "target_epsilon": e,
            "replicate": r,
            "test_accuracy": a,
            "epsilon_spent": e,
            "delta": 1e-5,
            "steps": 10,
            "noise_multiplier": 1.0,
            "num_train_examples": 2000,
            "group_size": 1,
            "train_seconds": 3.0,
        }
        for e, r, a in [(1.0, "0", 0.70), (1.0, "1", 0.72), (math.inf, "0", 0.90)]
    ]
    csv_text, table, series = sweep._table(rows)
    assert csv_text.splitlines()[0] == (
        "method,target_epsilon,replicate,test_accuracy,epsilon_spent,delta,steps,"
        "noise_multiplier,num_train_examples,group_size,train_seconds"
    )
    assert table.splitlines()[0] == "| method | ε = 1 | non-private |"
    assert "71.00 ± 1.41 (n=2)" in table and "| 90.00 |" in table
    assert series["dpsgd"][-1][0] == math.inf


@pytest.mark.parametrize(
    "extra,match",
    [
        (["self_aug:augment.num_views=2"], "overrides for self_aug"),
        (["--methods", "dpmix_self", "dpmix_self:augment.num_views=2"], "needs mixes"),
        (
            ["--methods", "self_aug", "self_aug:augment.num_views=2", "self_aug:augment.crop_padding_fraction=0.9"],
            "crop_padding_fraction",
        ),
    ],
)
def test_every_runs_settings_are_checked_before_the_first_run(tmp_path, capsys, extra, match):
    options = [e for e in extra if "=" not in e]
    overrides = [e for e in extra if "=" in e]
    code = sweep.main(
        [
            "--config",
            "tiny_test",
            "--epsilons",
            "1",
            "--output-dir",
            str(tmp_path / "sweep"),
            *options,
            f"tracking.uri=sqlite:///{tmp_path}/m.db",
            *overrides,
        ]
    )
    assert code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "m.db").exists()


def test_options_for_the_swept_methods_need_not_suit_the_configs_own_method():
    # tiny_test's own method is dpsgd, which refuses K = 3; a sweep of self_aug alone may still set it for all runs
    args = sweep.parse_args(
        ["--config", "tiny_test", "--epsilons", "1,8", "--methods", "self_aug", "augment.num_views=3"]
    )
    config, combos, common, scoped = sweep.plan(args)
    assert config.augment.method == "self_aug" and config.augment.num_views == 3
    assert [c["name"] for c in combos] == ["self_aug-eps1-rep0", "self_aug-eps8-rep0"] and not scoped


def test_a_setting_only_some_swept_methods_use_is_scoped_to_them():
    """dpsgd makes no views: a crop for every run of a sweep with dpsgd is refused before any run, naming the key;
    scoped to the methods that augment (docs/results/dpmix_small.sh), it is taken by them alone."""
    base = [
        "--config",
        "tiny_test",
        "--epsilons",
        "1",
        "--methods",
        "dpsgd,self_aug",
        "--non-private",
        "dpsgd",
        "self_aug:augment.num_views=2",
    ]
    with pytest.raises(ConfigError, match=r"^augment\.crop_padding_fraction: does nothing here: .*method=dpsgd"):
        sweep.plan(sweep.parse_args([*base, "augment.crop_padding_fraction=0.1"]))
    config, combos, common, scoped = sweep.plan(sweep.parse_args([*base, "self_aug:augment.crop_padding_fraction=0.1"]))
    assert config.augment.method == "dpsgd" and len(combos) == 3
    assert scoped["self_aug"] == ["augment.num_views=2", "augment.crop_padding_fraction=0.1"]
    # the non-private ceiling keeps the privacy section it switches off (tiny_test writes privacy.target_epsilon)
    ceiling = load_config("tiny_test", sweep._run_overrides(common, scoped, combos[-1]))
    assert combos[-1]["name"] == "dpsgd-nonprivate-rep0" and not ceiling.privacy.enabled
    assert ceiling.privacy.target_epsilon == 8.0


def test_a_tuning_sweep_reports_validation_accuracy_not_test_accuracy():
    rows = [
        {
            "method": "self_aug",
            "target_epsilon": 1.0,
            "replicate": "0",
            "validation_accuracy": 0.5,
            "epsilon_spent": 1.0,
            "delta": 1e-5,
            "steps": 10,
            "noise_multiplier": 1.0,
            "num_train_examples": 2000,
            "group_size": 4,
            "train_seconds": 3.0,
        }
    ]
    csv_text, table, _ = sweep._table(rows)
    assert "validation_accuracy" in csv_text.splitlines()[0] and "test_accuracy" not in csv_text
    assert "| 50.00 |" in table
