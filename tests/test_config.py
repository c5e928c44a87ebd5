"""hpcdl/config.py: one schema, defaults filled, overrides, and one clear error per mistake."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, hpcdl_env, run_hpcdl, write_sweep_config
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
    assert cfg.params["input"] == "auto" and cfg.params["stream_buffer_mb"] == 64


def test_input_mode_is_one_of_three(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL), ["train.input=stream"]).params["input"] == "stream"
    with pytest.raises(ConfigError, match=r"train\.input: 'disk' is not one of \['memory', "
                                          r"'stream', 'auto'\]"):
        config.load(write(tmp_path, MINIMAL), ["train.input=disk"])
    with pytest.raises(ConfigError, match=r"train\.stream_buffer_mb: 0 is less than"):
        config.load(write(tmp_path, MINIMAL), ["train.stream_buffer_mb=0"])


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
    config.Config(document, origin=str(path)).check_site(apptainer=False, slurm=False)
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
        config.from_layers(merged, layers, apptainer=False, slurm=False)
    assert str(info.value) == "layer.yaml: search.n_trials: 0 is less than the minimum of 1"
    assert config.layer_of("search.space.width", layers) == "smoke.yaml"
    assert config.layer_of("storage", layers) == "smoke.yaml, layer.yaml"  # a default
    cfg = config.from_layers(smoke, layers[:1], apptainer=False, slurm=False)
    assert cfg.origin == "smoke.yaml"


SPACE_BEYOND_THE_PARAMETER = [
    ("dropout", {"type": "float", "low": 0.0, "high": 1.0},
     "search.space.dropout.high: 1.0 is outside what model.dropout allows "
     "(number, minimum 0, exclusiveMaximum 1)"),
    ("depth", {"type": "int", "low": 0, "high": 3},
     "search.space.depth.low: 0 is outside what model.depth allows (integer, minimum 1)"),
    ("depth", {"type": "float", "low": 1, "high": 3},
     "search.space.depth.type: float cannot search model.depth (integer, minimum 1); "
     "use int or categorical"),
    ("activation", {"type": "categorical", "choices": ["relu", "sigmoid"]},
     "search.space.activation.choices[1]: 'sigmoid' is outside what model.activation allows "
     "(string, enum ['relu', 'elu', 'gelu', 'selu', 'tanh', 'swish'])"),
    ("optimizer", {"type": "int", "low": 1, "high": 2},
     "search.space.optimizer.type: int cannot search train.optimizer (string, enum "
     "['adam', 'sgd', 'rmsprop', 'nadam']); use categorical"),
    ("batch_size", {"type": "categorical", "choices": [32, 0.5]},
     "search.space.batch_size.choices[1]: 0.5 is outside what train.batch_size allows "
     "(integer, minimum 1)"),
]


@pytest.mark.parametrize(("param", "dist", "message"), SPACE_BEYOND_THE_PARAMETER)
def test_search_space_stays_within_the_parameters_schema(tmp_path: Path, param: str,
                                                         dist: dict, message: str) -> None:
    path = write(tmp_path, {**MINIMAL, "search": {"space": {param: dist}}})
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: {message}"


def test_search_space_within_the_schema_passes(tmp_path: Path) -> None:
    space = {"dropout": {"type": "float", "low": 0.0, "high": 0.99},
             "first_block_convs": {"type": "categorical", "choices": [None, 1, 2]},
             "warmup_epochs": {"type": "int", "low": 0, "high": 2}}
    assert config.load(write(tmp_path, {**MINIMAL, "search": {"space": space}}))


@pytest.mark.parametrize(("dataset", "message"), [
    ({"name": "nosuch"}, "dataset.name: unknown dataset 'nosuch'; expected fashion_mnist, "
     "mnist, digits, npz:FILE or hdf5:FILE"),
    ({"name": "x", "source": "csv:x.csv"}, "dataset.source: unknown dataset 'csv:x.csv'; "
     "expected fashion_mnist, mnist, digits, npz:FILE or hdf5:FILE"),
])
def test_a_dataset_prepare_cannot_produce_is_refused(tmp_path: Path, dataset: dict,
                                                     message: str) -> None:
    path = write(tmp_path, {**MINIMAL, "dataset": dataset})
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(("layer", "message"), [
    ({"search": {"space": {"dropout": {"type": "float", "low": 0.0, "high": 1.0}}}},
     SPACE_BEYOND_THE_PARAMETER[0][2]),
    ({"dataset": {"name": "nosuch"}}, "dataset.name: unknown dataset 'nosuch'"),
])
def test_snakemake_dry_run_refuses_before_any_job(tmp_path: Path, layer: dict,
                                                  message: str) -> None:
    """The Snakefile checks the merged config with config.from_layers: `snakemake -n` stops
    with one line naming the layer file and the key, exit 2, and plans no job."""
    bad = write(tmp_path, {**layer, "results_dir": str(tmp_path / "results")})
    done = subprocess.run(["snakemake", "-n", "--configfile", "configs/smoke.yaml", str(bad)],
                          cwd=REPO, env=hpcdl_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith(f"{bad}: ")]
    assert len(lines) == 1 and lines[0].startswith(f"{bad}: {message}"), done.stderr[-2000:]
    assert "Job stats" not in done.stdout + done.stderr
    assert not (tmp_path / "results").exists()


def test_worker_refuses_a_space_beyond_the_parameter(tmp_path: Path) -> None:
    path = write_sweep_config(tmp_path, search={"space": {"depth": {"type": "int", "low": 0,
                                                                    "high": 3}}})
    done = run_hpcdl("worker", "--config", str(path), timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == (
        f"hpcdl worker: error: {path}: search.space.depth.low: 0 is outside what model.depth "
        "allows (integer, minimum 1)")
    assert not (tmp_path / "sweep").exists()
