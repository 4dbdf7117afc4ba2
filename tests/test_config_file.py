"""Config files with variants and --config.key=value overrides, as `jaxsr train` reads them."""

from pathlib import Path

import pytest

from jaxsr.cli import main as cli_main
from jaxsr.train.config_file import load_config

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "seesr_train.py")


def test_variant_and_typed_overrides():
    config = load_config(CONFIG + ":tiny", [
        "--config.total_steps=7", "--config.optim.learning_rate=1", "--config.ema_decay=0.99",
        "--config.data.source=folder:/data/photos", "--config.init.controlnet_from_unet=True",
        "--config.mesh=[('data', 4), ('fsdp', 2)]"])
    assert config.variant == "tiny" and config.model.unet.layers_per_block == 1
    assert config.total_steps == 7
    assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
    assert config.ema_decay == 0.99
    assert config.data.source == "folder:/data/photos"
    assert config.init.controlnet_from_unet is True
    assert list(config.mesh) == [("data", 4), ("fsdp", 2)]
    assert load_config(CONFIG).variant == "base"


@pytest.mark.parametrize("item, message", [
    ("--config.total_stepz=3", "no field 'total_stepz'"),
    ("--config.optim.nope=1", "no field 'optim.nope'"),
    ("--config.total_steps=many", "expected int"),
    ("--config.init.controlnet_from_unet=1", "expected True or False"),
    ("--config.total_steps", "overrides look like"),
])
def test_bad_overrides_are_named(item, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG + ":tiny", [item])


def test_cli_reports_config_errors(capsys, tmp_path):
    assert cli_main(["train", "--config", str(tmp_path / "none.py"), "--workdir",
                     str(tmp_path / "w")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["train", "--config", CONFIG + ":huge", "--workdir",
                     str(tmp_path / "w")]) == 2
    assert "'base' or 'tiny'" in capsys.readouterr().err
    with pytest.raises(SystemExit):          # overrides belong to config-reading commands
        cli_main(["sr", "x.png", "--weights", "w", "--output", "o", "--config.x=1"])
