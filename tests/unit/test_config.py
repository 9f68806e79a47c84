from __future__ import annotations

import pytest

from trainer.config import (
    RECIPES_DIR,
    STAGES,
    JobConfig,
    build_config,
    parse_overrides,
    recipe_path,
    save_run_yaml,
)
from trainer.errors import ConfigError

BASE = {"tokenizer": "tok"}


def test_overrides_parse_as_yaml_and_win_over_the_recipe():
    cfg = build_config(
        base={**BASE, "optim": {"lr": 1.0e-4}},
        overrides=[
            "--optim.lr",
            "3e-4",
            "--data.train",
            "[a.parquet, b/*.parquet]",
            "--optim.betas=[0.8, 0.9]",
            "--data.pack",
            "false",
            "--train.max_steps",
            "7",
        ],
    )
    assert cfg.optim.lr == 3e-4
    assert cfg.data.train == ["a.parquet", "b/*.parquet"]
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.data.pack is False
    assert cfg.train.max_steps == 7


def test_typo_names_the_closest_key():
    with pytest.raises(ConfigError, match=r"--optim\.lerning_rate: did you mean --optim\.lr\?"):
        build_config(base=BASE, overrides=["--optim.lerning_rate", "1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean --train\.micro_batch_size"):
        build_config(base=BASE, overrides=["--train.micro_batch_sise", "4"])
    with pytest.raises(ConfigError, match=r"did you mean --optim"):
        build_config(base={**BASE, "optimm": {}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--train.micro_batch_size", "0"], r"--train\.micro_batch_size must be >= 1"),
        (["--optim.lr", "fast"], r"--optim\.lr must be a number"),
        (["--schedule.name", "cosin"], r"--schedule\.name must be one of .*did you mean cosine"),
        (["--zero.stage", "4"], r"--zero\.stage must be 0, 1, 2, 3 or auto"),
        (["--zero.offload_params", "true"], r"offload_params needs --zero\.stage 3"),
        (["--data.validation_fraction", "1.5"], r"--data\.validation_fraction must be in"),
        (["--optim.betas", "[0.9]"], r"--optim\.betas must be two numbers"),
        (["--train.epochs"], r"--train\.epochs needs a value"),
    ],
)
def test_bad_values_name_the_flag(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(base=BASE, overrides=override)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_default_recipe_and_it_loads(stage):
    cfg = build_config(stage=stage)
    assert cfg.stage == stage and recipe_path(stage).is_file()


def test_the_pretrain_recipe_is_the_documented_architecture():
    cfg = build_config(stage="pretrain")
    assert cfg.model.overrides["hidden_size"] == 512 and cfg.model.overrides["num_hidden_layers"] == 12
    assert cfg.data.max_seq_len == 512 and cfg.schedule.name == "cosine" and cfg.schedule.warmup_steps > 0


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_built_in_recipe_is_a_valid_config(recipe):
    cfg = build_config(config_path=recipe_path(recipe))
    assert cfg.output_dir == f"runs/{recipe}", "each recipe writes to its own runs/<name>"


def test_run_yaml_round_trips(tmp_path):
    cfg = build_config(base=BASE, overrides=["--optim.lr", "5e-4", "--model.overrides", "{hidden_size: 64}"])
    path = save_run_yaml(cfg, tmp_path)
    again = build_config(config_path=path)
    assert again == cfg
    assert isinstance(again, JobConfig)


def test_parse_overrides_nests_and_accepts_negative_numbers():
    assert parse_overrides(["--a.b.c", "1", "--x.y", "-2"]) == {"a": {"b": {"c": 1}}, "x": {"y": -2}}


def test_cpt_needs_pretrained_weights():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        build_config(base={**BASE, "stage": "cpt"})


def test_help_rows_cover_every_field():
    rows = {flag: help_text for flag, _, help_text in JobConfig.help_rows()}
    assert "--optim.lr" in rows and "--data.buffer_size" in rows and "--zero.stage" in rows
    assert all(help_text for flag, help_text in rows.items()), "every field has help text"


def test_readme_documents_every_recipe_key():
    """README's recipe reference is exactly what the config's defaults and help texts say."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", script)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    current = reference.readme_table(reference.README.read_text(encoding="utf-8"))
    assert current == reference.table(), (
        "README's recipe reference is stale: python scripts/config_reference.py --write"
    )


def test_a_dotted_override_changes_one_architecture_field_and_keeps_the_rest():
    cfg = build_config(config_path=recipe_path("demo"), overrides=["--model.overrides.hidden_size", "128"])
    assert cfg.model.overrides["hidden_size"] == 128
    assert cfg.model.overrides["num_hidden_layers"] == 4 and cfg.model.overrides["intermediate_size"] == 704
