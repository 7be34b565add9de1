"""Every stage config is versioned: it writes its config_version, reads older files (fields
added since take their defaults) and refuses newer ones."""

import pytest

from qpdeploy.config import VERSION_KEY, QuantizeConfig, TrainConfig, check_all
from qpdeploy.demo import DemoConfig
from qpdeploy.errors import QPDeployError
from qpdeploy.evaluate import EvaluateConfig
from qpdeploy.exporters.config import ExportConfig
from qpdeploy.runtimes.config import GenerateConfig, RuntimeConfig

CONFIGS = [QuantizeConfig(weight_bits=4), TrainConfig("a photo of sks dog", train_token=True), ExportConfig(),
           RuntimeConfig(), GenerateConfig(), DemoConfig(subject="zwx"), EvaluateConfig(identifier="sks")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trip_carries_the_version(config):
    data = config.to_json()
    assert data[VERSION_KEY] == type(config).VERSION == 1
    assert type(config).from_json(data) == config


def test_older_files_load_and_newer_ones_are_refused():
    data = TrainConfig("a photo of sks dog").to_json()
    older = {k: v for k, v in data.items() if k not in (VERSION_KEY, "train_token", "token_lr")}
    assert TrainConfig.from_json(older) == TrainConfig("a photo of sks dog")  # fields added since: defaults
    with pytest.raises(QPDeployError, match="config_version 2; this qpdeploy reads 1..1"):
        TrainConfig.from_json({**data, VERSION_KEY: 2}, "pack.json")
    with pytest.raises(QPDeployError, match="config_version '1'"):
        TrainConfig.from_json({**data, VERSION_KEY: "1"})


def test_check_all_raises_the_first_failed_message():
    check_all([(True, "never")])
    with pytest.raises(QPDeployError, match="^second$"):
        check_all([(True, "first"), (False, "second"), (False, "third")])
    with pytest.raises(QPDeployError, match="learning rate must be positive"):
        DemoConfig(lr=0)
    with pytest.raises(QPDeployError, match="images per prompt must be in 1..1024"):
        EvaluateConfig(images_per_prompt=0)


def test_training_defaults_agree_everywhere():
    """``qpdeploy train``, ``qpdeploy demo``, the demo's config and the fidelity benchmark all
    take their training defaults from TrainConfig (chosen by the dev sweep, README)."""
    import typer

    from benchmarks.fidelity import build_parser
    from qpdeploy.cli import app
    from qpdeploy.config import TrainConfig
    from qpdeploy.demo import DemoConfig

    commands = typer.main.get_command(app).commands
    train = {p.name: p.default for p in commands["train"].params}
    for name in ("strategy", "steps", "lr", "weight_decay", "token_lr", "train_input_scales", "prior_weight"):
        assert train[name] == getattr(TrainConfig, name), name
    demo = {p.name: p.default for p in commands["demo"].params}
    assert demo["steps"] == DemoConfig.steps == TrainConfig.steps
    assert demo["lr"] == DemoConfig.lr == TrainConfig.lr
    bench = vars(build_parser().parse_args(["--out", "x.json"]))
    assert (bench["lr"], bench["steps"], bench["token_lr"], bench["weight_decay"]) == (
        TrainConfig.lr, TrainConfig.steps, TrainConfig.token_lr, TrainConfig.weight_decay)


def test_the_pack_strength_defaults_to_the_pack_as_trained_everywhere():
    import typer

    from qpdeploy.cli import app
    from qpdeploy.config import parse_strength
    from qpdeploy.evaluate import EvaluateConfig
    from qpdeploy.exporters.config import ExportConfig

    commands = typer.main.get_command(app).commands
    defaults = {name: parse_strength({p.name: p.default for p in commands[name].params}["pack_strength"])
                for name in ("export", "evaluate")}
    assert defaults == {"export": ExportConfig.pack_strength, "evaluate": EvaluateConfig.pack_strength}
    assert ExportConfig.pack_strength == EvaluateConfig.pack_strength == 1.0
