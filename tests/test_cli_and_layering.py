"""The generated command line (one flag per config field, one default per field, errors that name the flag,
typed loss configs chosen by --loss, plug-ins by import path) and the package's import layering."""

from __future__ import annotations

import ast
import pathlib
import sys
import textwrap

import pytest

from vespo_megatron.cli import CLIError
from vespo_megatron.losses import GSPOConfig, PPOClipConfig, VespoConfig
from vespo_megatron.training import cli as train_cli
from vespo_megatron.training.config import TrainerConfig

PKG = pathlib.Path(__file__).resolve().parents[1] / "vespo_megatron"


def test_no_flags_give_the_toy_config_and_each_default_is_the_base_value():
    cfg = train_cli.config_from_argv([])
    base = train_cli.toy_config()
    assert cfg.rollout == base.rollout and cfg.algorithm == base.algorithm and cfg.run == base.run
    assert cfg.model.seed == 1234 and cfg.task.seed == 0  # derived from --seed
    help_text = train_cli.make_cli().build_parser().format_help()
    # the toy run's values, read from the config, not typed twice
    assert "--staleness STALENESS" in help_text and f"(default: {base.algorithm.staleness})" in help_text
    assert f"(default: {base.algorithm.lr})" in help_text


def test_flags_reach_nested_fields_and_seeds_follow_seed():
    cfg = train_cli.config_from_argv(["--async-lag", "3", "--rollout-precision", "bf16", "--sglang-max-retries",
                                      "7", "--weight-sync-bucket-mib", "2", "--seed", "5", "--no-console"])
    assert cfg.rollout.embedded.lag == 3 and cfg.rollout.embedded.precision == "bf16"
    assert cfg.rollout.sglang.max_retries == 7 and cfg.rollout.sglang.weight_sync.bucket_bytes == 2 * 2**20
    assert cfg.run.seed == 5 and cfg.model.seed == 1239 and cfg.task.seed == 5 and cfg.run.console is False


def test_loss_name_selects_its_typed_config_and_its_flags():
    cfg = train_cli.config_from_argv(["--loss", "grpo", "--eps-high", "0.3", "--rollout-correction", "tis"])
    assert isinstance(cfg.algorithm.loss_config, PPOClipConfig)
    assert cfg.algorithm.loss_config.eps_high == 0.3 and cfg.algorithm.loss_config.rollout_correction.mode == "tis"
    assert train_cli.config_from_argv(["--loss", "vespo_sqrt"]).algorithm.loss_config.length_norm == "sqrt"
    assert isinstance(train_cli.config_from_argv(["--loss", "gspo"]).algorithm.loss_config, GSPOConfig)
    assert train_cli.config_from_argv(["--c-pos", "1", "2"]).algorithm.loss_config == VespoConfig(c_pos=(1.0, 2.0))
    with pytest.raises(CLIError, match=r"--c-pos: applies to VespoConfig, and this run uses PPOClipConfig"):
        train_cli.config_from_argv(["--loss", "grpo", "--c-pos", "1", "2"])
    with pytest.raises(CLIError, match=r"--loss: the flags given apply to GSPOConfig / PPOClipConfig; choose one"):
        train_cli.config_from_argv(["--eps-high", "0.3"])  # grpo's or gspo's? the base loss is vespo


def test_bad_values_name_the_flag_not_the_dataclass_field():
    with pytest.raises(CLIError, match=r"^--staleness: expected an int in \[1, 64\], got 0$"):
        train_cli.config_from_argv(["--staleness", "0"])
    with pytest.raises(CLIError, match=r"^--async-lag: expected an int in \[0, 64\], got 99$"):
        train_cli.config_from_argv(["--async-lag", "99"])
    with pytest.raises(CLIError, match=r"^--eps-high: expected a float in \(0, 1\)"):
        train_cli.config_from_argv(["--loss", "grpo", "--eps-high", "3"])
    with pytest.raises(CLIError, match=r"^--loss: expected one of \[.*\] or an import path"):
        train_cli.config_from_argv(["--loss", "dpo"])
    assert train_cli.main(["--staleness", "0"]) == 2  # one line on stderr, no traceback


def test_dataset_flags_select_the_math_task_and_refuse_toy_flags(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    cfg = train_cli.config_from_argv(["--prompt-data", str(data), "--tokenizer", str(tmp_path), "--seed", "3"])
    assert type(cfg.task).__name__ == "MathTaskConfig" and cfg.task.data.seed == 3
    with pytest.raises(CLIError, match=r"--task: the flags given belong to different configs \(ArithmeticTaskConfig, "
                                        r"MathTaskConfig\)"):
        train_cli.config_from_argv(["--prompt-data", str(data), "--max-operand", "5"])
    with pytest.raises(CLIError, match=r"--prompt-data: required for PromptDataConfig"):
        train_cli.config_from_argv(["--task", "math"])


def test_loss_engine_and_advantage_from_outside_the_package(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(textwrap.dedent("""
        from vespo_megatron.losses import PolicyLoss, PPOClipConfig
        from vespo_megatron.losses.baselines import grpo_loss

        def build():
            return PolicyLoss("my_grpo", grpo_loss, PPOClipConfig, {})

        def half_advantages(rewards, groups, eps):
            return [r / 2 for r in rewards]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = train_cli.config_from_argv(["--loss", "my_plugins:build", "--eps-low", "0.1",
                                      "--advantage", "my_plugins:half_advantages"])
    assert cfg.algorithm.policy_loss.name == "my_grpo" and cfg.algorithm.loss_config.eps_low == 0.1
    from vespo_megatron.training.advantages import resolve_advantage

    assert resolve_advantage(cfg.algorithm.advantage)([1.0, 0.0], [0, 0], 0.0) == [0.5, 0.0]
    sys.modules.pop("my_plugins", None)


def test_a_registered_engine_is_one_line(monkeypatch):
    from vespo_megatron.rollout import factory

    seen = {}
    monkeypatch.setitem(factory.ENGINES, "mine", lambda cfg, ctx: seen.setdefault("built", (cfg.engine, ctx)))
    cfg = TrainerConfig().rollout.__class__(engine="mine")
    factory.build_engine(cfg, "ctx")
    assert seen["built"] == ("mine", "ctx")


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            rel = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
            names.add(".".join(rel + ((node.module,) if node.module else ())))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("vespo_megatron")}


# Which floors a floor may import (the rule of issue 12): training -> rollout -> {hf, routing, parallel,
# megatron}; nothing imports training except the top floor (testing, experiments); base imports nobody.
FORBIDDEN = {
    "base": ("vespo_megatron.",),
    "losses": ("vespo_megatron.parallel", "vespo_megatron.routing", "vespo_megatron.rollout",
               "vespo_megatron.training", "vespo_megatron.megatron"),
    "routing": ("vespo_megatron.losses", "vespo_megatron.rollout", "vespo_megatron.training"),
    "parallel": ("vespo_megatron.rollout", "vespo_megatron.training"),
    "hf": ("vespo_megatron.rollout", "vespo_megatron.training"),
    "megatron": ("vespo_megatron.rollout", "vespo_megatron.training"),
    "models": ("vespo_megatron.rollout", "vespo_megatron.training"),
    "rollout": ("vespo_megatron.training",),
    "metrics": ("vespo_megatron.rollout", "vespo_megatron.training"),
}


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_imports_run_one_way(floor):
    bad = []
    for path in sorted((PKG / floor).rglob("*.py")):
        for name in _imports(path):
            if any(name.startswith(f) and not name.startswith(f"vespo_megatron.{floor}") for f in FORBIDDEN[floor]):
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "\n".join(bad)


def test_every_subpackage_is_installed():
    """pyproject lists packages by hand (patches/ is mapped in): a new subpackage left out would be missing
    from a non-editable install while every editable-install test still passes."""
    import tomllib

    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PKG.parent).parts) for p in PKG.rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
    assert listed - found == {"vespo_megatron.patches"}
