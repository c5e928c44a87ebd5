"""hpcdl/config.py: one schema, defaults filled, overrides, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hpcdl import config
from hpcdl.errors import ConfigError


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


MINIMAL = {"name": "s", "dataset": {"name": "digits"}, "model": {"family": "mlp"}}


def test_defaults_are_filled(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL))
    assert cfg.params["width"] == 64 and cfg.params["epochs"] == 10
    assert (
        cfg.section("search")["sampler"] == "tpe" and cfg.section("search")["pruner"] == "hyperband"
    )
    assert cfg.section("dataset")["source"] == "digits"
    assert cfg.dataset_file == Path("results/data/digits.h5")
    assert cfg.trial_file(3) == Path("results/s/trials/3.h5")


def test_overrides_bare_and_dotted(tmp_path: Path) -> None:
    cfg = config.load(
        write(tmp_path, MINIMAL),
        ["width=128", "train.epochs=3", "results_dir=/scratch/r", "learning_rate=1e-3"],
    )
    assert cfg.params["width"] == 128 and cfg.params["epochs"] == 3
    assert cfg.params["learning_rate"] == 0.001
    assert cfg.sweep_dir == Path("/scratch/r/s")
    assert cfg.with_params({"dropout": 0.25}).params["dropout"] == 0.25
    assert cfg.params["dropout"] == 0.0  # with_params returns a copy


def test_snakemake_validate_accepts_the_same_schema(tmp_path: Path) -> None:
    from snakemake.utils import validate

    document = yaml.safe_load(Path("configs/smoke.yaml").read_text())
    validate(document, str(config.SCHEMA_PATH))
    ours = config.load("configs/smoke.yaml").as_dict()
    del ours["dataset"]["source"]  # derived by our loader, not a schema default
    assert document == ours  # snakemake filled exactly the defaults our loader fills


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({**MINIMAL, "model": {}}, "model: 'family' is a required property"),
        ({**MINIMAL, "name": "a b"}, "name: 'a b' does not match"),
        (
            {**MINIMAL, "search": {"n_trials": 0}},
            "search.n_trials: 0 is less than the minimum of 1",
        ),
        ({**MINIMAL, "search": {"sampler": "bayes"}}, "search.sampler: 'bayes' is not one of"),
        ({**MINIMAL, "search": {"pruner": "asha"}}, "search.pruner: 'asha' is not one of"),
        (
            {**MINIMAL, "search": {"space": {"width": {"type": "int", "low": 9, "high": 3}}}},
            "search.space.width: empty range, low 9 > high 3",
        ),
        (
            {
                **MINIMAL,
                "search": {
                    "space": {"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}
                },
            },
            "search.space.learning_rate: log range must be > 0",
        ),
        (
            {
                **MINIMAL,
                "search": {"space": {"activation": {"type": "categorical", "choices": []}}},
            },
            "search.space.activation: categorical needs a non-empty 'choices' list",
        ),
        (
            {
                **MINIMAL,
                "search": {
                    "sampler": "grid",
                    "space": {"dropout": {"type": "float", "low": 0, "high": 0.5}},
                },
            },
            "grid cannot cover continuous parameter(s) ['dropout']",
        ),
        (
            {**MINIMAL, "search": {"space": {"colour": {"type": "categorical", "choices": [1]}}}},
            "search.space.colour: unknown parameter",
        ),
        ({**MINIMAL, "resources": {"workers": 0}}, "resources.workers: 0 is less than the minimum"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, document: dict, message: str) -> None:
    path = write(tmp_path, document)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load("configs/smoke.yaml", ["width"])


def test_demo_config_loads_and_validates() -> None:
    """configs/demo.yaml is what `make demo` runs: it passes Snakemake's validation with the one
    schema and hpcdl's own checks, and is the sweep the README describes."""
    from snakemake.utils import validate

    path = REPO / "configs" / "demo.yaml"
    document = yaml.safe_load(path.read_text())
    validate(document, str(config.SCHEMA_PATH))
    config.Config(document, origin=str(path)).check_container(apptainer=False)
    cfg = config.load(path)
    search, resources = cfg.section("search"), cfg.section("resources")
    assert cfg.section("dataset")["name"] == "fashion_mnist" and cfg.params["family"] == "mlp"
    assert (search["n_trials"], search["sampler"], search["pruner"]) == (24, "tpe", "hyperband")
    assert set(search["space"]) == {"width", "depth", "learning_rate", "dropout"}
    assert cfg.params["epochs"] == 30
    assert (resources["workers"], resources["ranks_per_node"]) == (2, 1)
    assert cfg.dataset_file == Path("results/data/fashion_mnist.h5")


def test_an_error_names_the_layer_that_sets_the_key() -> None:
    """Snakemake merges several --configfile layers: the error sends the user to the one file
    that set the bad value (or its section), not to the merged whole."""
    smoke = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    layers = [("smoke.yaml", smoke), ("layer.yaml", {"search": {"n_trials": 0}})]
    merged = {**smoke, "search": {**smoke["search"], "n_trials": 0}}
    with pytest.raises(ConfigError) as info:
        config.from_layers(merged, layers, apptainer=False)
    assert str(info.value) == "layer.yaml: search.n_trials: 0 is less than the minimum of 1"
    assert config.layer_of("search.space.width", layers) == "smoke.yaml"
    assert config.layer_of("storage", layers) == "smoke.yaml, layer.yaml"  # a default
    cfg = config.from_layers(smoke, layers[:1], apptainer=False)
    assert cfg.origin == "smoke.yaml"
