"""QuietStarConfig defaults, validation, and YAML/CLI overrides."""

import argparse

import pytest

from quietstar import ConfigError, QuietStarConfig
from quietstar.core.cli_config import add_dataclass_arguments, build_config, load_yaml


def test_defaults():
    cfg = QuietStarConfig()
    assert (cfg.thought_len, cfg.n_true, cfg.n_thoughts) == (12, 4, 2)
    assert cfg.sample_temperature == cfg.policy_temperature == 1.0
    assert cfg.positive_rewards_only is True
    assert cfg.thought_lr_multiplier == 100.0
    assert cfg.marker_init_text == "---"
    assert (cfg.formulation, cfg.attention_backend) == ("one_pass", "auto")


def test_the_one_pass_formulation_refuses_the_flex_kernel_by_name():
    with pytest.raises(ConfigError, match=r"^QuietStarConfig\.attention_backend: flex cannot run the one_pass formulation"):
        QuietStarConfig(formulation="one_pass", attention_backend="flex")
    assert QuietStarConfig(formulation="efficient", attention_backend="flex").attention_backend == "flex"


def test_policy_temperature_follows_sample_temperature_unless_set():
    assert QuietStarConfig(sample_temperature=0.7).policy_temperature == 0.7
    assert QuietStarConfig(sample_temperature=1.0, policy_temperature=3.0).policy_temperature == 3.0


@pytest.mark.parametrize(
    "field,value",
    [
        ("thought_len", 0),
        ("thought_len", 2.5),
        ("thought_len", True),
        ("n_true", 0),
        ("formulation", "fast"),
        ("attention_backend", "flash_attention_2"),
        ("n_true", "4"),
        ("n_thoughts", 1),
        ("sample_temperature", 0.0),
        ("sample_temperature", float("nan")),
        ("policy_temperature", -1.0),
        ("policy_temperature", float("inf")),
        ("base_loss_weight", -0.1),
        ("talk_loss_weight", "1"),
        ("policy_loss_weight", float("nan")),
        ("positive_rewards_only", 1),
        ("thought_lr_multiplier", 0),
        ("mixing_head_width", 0),
        ("mixing_head_width", 8.0),
        ("mixing_head_layers", 0),
        ("mixing_head_layers", None),
        ("loss_reduction", "mean"),
        ("marker_init_text", ""),
        ("marker_init_text", None),
        ("end_marker_init_text", " "),
        ("end_marker_init_text", 5),
    ],
)
def test_invalid_field_is_rejected_by_name(field, value):
    with pytest.raises(ConfigError, match=rf"^QuietStarConfig\.{field}: "):
        QuietStarConfig(**{field: value})


def test_all_zero_loss_weights_are_rejected():
    with pytest.raises(ConfigError, match="all 0"):
        QuietStarConfig(base_loss_weight=0.0, talk_loss_weight=0.0, policy_loss_weight=0.0)


def test_yaml_and_cli_override_fields(tmp_path):
    path = tmp_path / "qs.yaml"
    path.write_text("thought_len: 8\nn_true: 2\npositive_rewards_only: false\nlr: 1.0e-6\n")
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, QuietStarConfig)
    args = parser.parse_args(["--n-true", "3", "--policy-temperature", "3.0"])
    cfg = build_config(QuietStarConfig, load_yaml(path), args)
    assert (cfg.thought_len, cfg.n_true, cfg.policy_temperature, cfg.positive_rewards_only) == (8, 3, 3.0, False)
    with pytest.raises(ConfigError, match="QuietStarConfig.n_thoughts"):
        build_config(QuietStarConfig, {}, parser.parse_args(["--n-thoughts", "1"]))


def test_yaml_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("lr: 1e-5\nseq_len: [64\nmodel: x\n")
    with pytest.raises(ConfigError) as error:
        load_yaml(tmp_path / "broken.yaml")
    assert str(error.value).startswith(f"{tmp_path / 'broken.yaml'}:3:") and "not valid YAML" in str(error.value)
    assert "\n" not in str(error.value)
    (tmp_path / "latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not valid YAML"):
        load_yaml(tmp_path / "latin1.yaml")


def test_a_home_directory_in_a_yaml_path_is_expanded_as_the_shell_expands_a_flag(tmp_path, monkeypatch):
    from quietstar.coconut.config import CoconutDataConfig
    from quietstar.training.train_config import TrainConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: ~/runs/a\nmodel: ~/models/m\nmarker_init_text: '~'\ntrain_file: ~/data/train.jsonl\n"
                    "val_file: ~/data/valid.jsonl\n")
    values = load_yaml(path)
    train = build_config(TrainConfig, values)
    assert train.output_dir == f"{tmp_path}/runs/a" and train.model == f"{tmp_path}/models/m"
    assert build_config(QuietStarConfig, values).marker_init_text == "~"  # not a path: as written
    assert build_config(CoconutDataConfig, values).train_file == f"{tmp_path}/data/train.jsonl"
