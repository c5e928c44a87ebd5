"""Sweep config: YAML -> validated, defaults-filled, read-only config, plus the paths it implies.

configs/schema.yaml is the one schema: this loader and the Snakefile's snakemake.utils.validate
both read it, and both fill in the defaults it declares.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from hpcdl import sinfo, sources
from hpcdl.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "configs" / "schema.yaml"
# Trial parameters live in these sections; their keys are disjoint, so a param is a bare name.
PARAM_SECTIONS = ("model", "train")
# What a run records per epoch, and per run: the metrics a sweep may optimise.
EPOCH_METRICS = (
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "epoch_seconds",
    "samples_per_second",
    "elapsed_seconds",
)
RUN_METRICS = ("n_params", "wall_seconds")


@cache
def schema() -> dict[str, Any]:
    with SCHEMA_PATH.open() as handle:
        return yaml.safe_load(handle)


def _validator_filling_defaults() -> type[jsonschema.protocols.Validator]:
    """The schema's draft (2020-12, the one Snakemake's `validate` always uses) with each
    property's `default` written into the instance, as Snakemake fills them."""
    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def fill_then_check(
        validator: Any, properties: dict[str, Any], instance: Any, subschema: dict[str, Any]
    ) -> Iterable[jsonschema.ValidationError]:
        if isinstance(instance, dict):
            for key, prop in properties.items():
                if "default" in prop:
                    instance.setdefault(key, copy.deepcopy(prop["default"]))
        yield from check_properties(validator, properties, instance, subschema)

    return jsonschema.validators.extend(base, {"properties": fill_then_check})


def param_sections() -> dict[str, str]:
    """Every tunable parameter name -> the config section that holds it."""
    props = schema()["properties"]
    return {key: section for section in PARAM_SECTIONS for key in props[section]["properties"]}


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate(document: dict[str, Any], origin: str) -> dict[str, Any]:
    """Check `document` against the schema and fill defaults; one ConfigError naming the key."""
    filled = copy.deepcopy(document)
    errors = list(_validator_filling_defaults()(schema()).iter_errors(filled))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        raise ConfigError(f"{origin}: {_where(error)}: {error.message}")
    source_key = "dataset.source" if "source" in filled["dataset"] else "dataset.name"
    filled["dataset"].setdefault("source", filled["dataset"]["name"])
    _check_dataset_source(filled["dataset"], f"{origin}: {source_key}")
    res = filled["resources"]
    if res["gpus_per_node"] and res["ranks_per_node"] > res["gpus_per_node"]:
        raise ConfigError(f"{origin}: resources.ranks_per_node: {res['ranks_per_node']} ranks "
                          f"per node but only {res['gpus_per_node']} GPUs per node; one rank "
                          "drives one GPU")
    _check_search_space(filled, origin)
    return filled


def _check_dataset_source(dataset: dict[str, Any], where: str) -> None:
    """A dataset `hpcdl prepare` cannot produce is refused here, before anything is submitted;
    `where` is "FILE: KEY", the key (dataset.source, or dataset.name it defaults to) that set it."""
    problem = sources.source_problem(dataset["source"])
    if problem:
        raise ConfigError(f"{where}: {problem}")


def _allowed(prop: Mapping[str, Any]) -> str:
    """What the schema allows for a parameter, e.g. 'number, minimum 0, exclusiveMaximum 1'."""
    rules = [f"{key} {prop[key]}" for key in ("minimum", "exclusiveMinimum", "maximum",
                                               "exclusiveMaximum", "enum") if key in prop]
    kinds = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    return ", ".join(["/".join(kinds), *rules])


def _check_space_against_param(name: str, dist: Mapping[str, Any], origin: str) -> None:
    """A search-space entry may only draw values its parameter accepts: the schema's type,
    bounds and enum of model.NAME / train.NAME apply to low, high and every choice."""
    section = param_sections()[name]
    prop = schema()["properties"][section]["properties"][name]
    param, allowed = f"{section}.{name}", _allowed(prop)
    kinds = set(prop["type"] if isinstance(prop["type"], list) else [prop["type"]])
    where = f"{origin}: search.space.{name}"
    fits = {"int": {"integer", "number"}, "float": {"number"}}.get(dist["type"])
    if fits is not None and not kinds & fits:
        instead = "int or categorical" if "integer" in kinds else "categorical"
        raise ConfigError(f"{where}.type: {dist['type']} cannot search {param} ({allowed}); "
                          f"use {instead}")
    check = jsonschema.Draft202012Validator(prop)
    values = ([(f"choices[{i}]", c) for i, c in enumerate(dist["choices"])]
              if dist["type"] == "categorical" else
              [(bound, dist[bound]) for bound in ("low", "high")])
    for key, value in values:
        error = next(iter(check.iter_errors(value)), None)
        if error is not None:
            raise ConfigError(f"{where}.{key}: {value!r} is outside what {param} allows "
                              f"({allowed})")


def _check_search_space(document: dict[str, Any], origin: str) -> None:
    sections = param_sections()
    search = document["search"]
    for name, dist in search["space"].items():
        where = f"{origin}: search.space.{name}"
        if name not in sections:
            raise ConfigError(f"{where}: unknown parameter; expected one of {sorted(sections)}")
        if dist["type"] == "categorical":
            if not dist.get("choices"):
                raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
            _check_space_against_param(name, dist, origin)
            continue
        if "low" not in dist or "high" not in dist:
            raise ConfigError(f"{where}: {dist['type']} needs 'low' and 'high'")
        low, high = dist["low"], dist["high"]
        if low > high:
            raise ConfigError(f"{where}: empty range, low {low} > high {high}")
        if dist["log"] and low <= 0:
            raise ConfigError(f"{where}: log range must be > 0, got low {low}")
        if dist["log"] and dist["step"] not in (None, 1):
            raise ConfigError(f"{where}: 'step' cannot be combined with log=true")
        if dist["type"] == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: int range needs integer bounds, got {low}..{high}")
        _check_space_against_param(name, dist, origin)
    if search["metric"] not in EPOCH_METRICS:
        raise ConfigError(
            f"{origin}: search.metric: unknown metric {search['metric']!r}; "
            f"expected one of {list(EPOCH_METRICS)}"
        )
    second = search["second_objective"]
    if second:
        if second["metric"] not in EPOCH_METRICS + RUN_METRICS:
            raise ConfigError(
                f"{origin}: search.second_objective.metric: unknown metric "
                f"{second['metric']!r}; expected one of "
                f"{list(EPOCH_METRICS + RUN_METRICS)}"
            )
        if search["pruner"] != "none":
            raise ConfigError(
                f"{origin}: search.pruner: Optuna cannot prune a two-objective "
                f"sweep; set pruner: none (got {search['pruner']!r})"
            )
    if search["sampler"] == "grid":
        continuous = [
            n for n, d in search["space"].items() if d["type"] == "float" and d["step"] is None
        ]
        if continuous:
            raise ConfigError(
                f"{origin}: search.sampler: grid cannot cover continuous "
                f"parameter(s) {continuous}; give them a 'step' or use categorical"
            )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` (value parsed as YAML) -> (path, value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
    path = key.split(".")
    if len(path) == 1 and path[0] in param_sections():
        path = [param_sections()[path[0]], path[0]]
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        # YAML 1.1 reads 1e-3 as a string; on the command line a number is meant
        with contextlib.suppress(ValueError):
            value = float(value)
    return path, value


def apply_overrides(document: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    result = copy.deepcopy(document)
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return result


class Config:
    """A validated sweep config. Read-only: accessors hand out copies."""

    def __init__(self, document: dict[str, Any], origin: str = "<config>") -> None:
        self._doc = validate(document, origin)
        self.origin = origin

    def __repr__(self) -> str:
        return f"Config({self.name!r} from {self.origin})"

    def section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self._doc[name])

    def as_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc)

    def to_json(self) -> str:
        return json.dumps(self._doc, sort_keys=True)

    @property
    def name(self) -> str:
        return self._doc["name"]

    @property
    def params(self) -> dict[str, Any]:
        """The fixed model + train parameters (a trial's params override these)."""
        return {
            key: value for section in PARAM_SECTIONS for key, value in self._doc[section].items()
        }

    def with_params(self, params: Mapping[str, Any]) -> Config:
        """A copy with trial parameters (bare names) put into their sections, re-validated."""
        sections = param_sections()
        doc = copy.deepcopy(self._doc)
        for key, value in params.items():
            if key not in sections:
                raise ConfigError(f"{self.origin}: unknown parameter {key!r}")
            doc[sections[key]][key] = value
        return Config(doc, self.origin)

    def check_site(self, apptainer: bool, slurm: bool) -> None:
        """What must hold where the jobs go, before any is submitted: with Apptainer, the image
        exists; with `slurm` (ask Slurm, where sinfo answers), a node of the partition has the
        GPUs asked per node."""
        resources = self._doc["resources"]
        if apptainer and resources["container"]:
            require_container(resources["container"], self.origin)
        if slurm:
            sinfo.check_gpus_per_node(resources, self.origin)

    @property
    def storage_url(self) -> str:
        return self._doc["storage"]

    @property
    def paths(self) -> SweepPaths:
        """Every file and folder this sweep reads or writes (DESIGN.md, "Paths")."""
        return SweepPaths(Path(self._doc["results_dir"]), self.name, self._doc["dataset"]["name"])

    # the three paths nearly every caller needs, kept short
    @property
    def results_dir(self) -> Path:
        return self.paths.results_dir

    @property
    def dataset_file(self) -> Path:
        return self.paths.dataset_file

    @property
    def sweep_dir(self) -> Path:
        return self.paths.sweep_dir

    def trial_file(self, number: int | str) -> Path:
        return self.paths.trial_file(number)


def layer_of(key: str, layers: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The config layer (file) a dotted key's value came from: the last layer that sets it, or
    its nearest parent, so the user is sent to the file to fix; all layers if none does."""
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):
        for name, document in reversed(layers):
            node: Any = document
            for part in parts[:depth]:
                if not isinstance(node, Mapping) or part not in node:
                    break
                node = node[part]
            else:
                return name
    return ", ".join(name for name, _ in layers) or "(no --configfile given)"


def from_layers(document: dict[str, Any], layers: Sequence[tuple[str, Mapping[str, Any]]],
                apptainer: bool, slurm: bool) -> Config:
    """Snakemake's merged config, checked; an error names the layer that set the bad key.
    `layers`: (name, document) lowest precedence first (the --configfile files, --config)."""
    try:
        Config(document, origin="").check_site(apptainer=apptainer, slurm=slurm)
    except ConfigError as exc:
        problem = str(exc).removeprefix(": ")  # "<key>: <what is wrong>"
        raise ConfigError(f"{layer_of(problem.split(': ', 1)[0], layers)}: {problem}") from None
    return Config(document, origin=" + ".join(name for name, _ in layers))


def require_container(image: str, origin: str) -> None:
    """The Apptainer image a job would run in exists (the one check and message for it)."""
    if not Path(image).is_file():
        raise ConfigError(f"{origin}: resources.container: {image} does not exist "
                          "(build it with: apptainer build hpcdl.sif containers/hpcdl.def)")


def dataset_path(results_dir: Path, dataset: str) -> Path:
    """Where the dataset file named `dataset` lives under a results directory."""
    return results_dir / "data" / f"{dataset}.h5"


def default_dataset_path(dataset: str) -> Path:
    """`hpcdl prepare DATASET`'s output without a config: under the schema's default results_dir."""
    return dataset_path(Path(schema()["properties"]["results_dir"]["default"]), dataset)


@dataclass(frozen=True)
class SweepPaths:
    """The one owner of the sweep's file layout: every tool, the Snakefile and the tests ask
    here instead of spelling a path out. Methods taking a number also take a Snakemake
    wildcard such as "{worker}"."""

    results_dir: Path
    name: str
    dataset: str

    @property
    def dataset_file(self) -> Path:
        return dataset_path(self.results_dir, self.dataset)

    @property
    def sweep_dir(self) -> Path:
        return self.results_dir / self.name

    @property
    def config_file(self) -> Path:
        """The validated config (defaults filled) that every job of the sweep reads."""
        return self.sweep_dir / "config.yaml"

    @property
    def journal(self) -> Path:
        return self.sweep_dir / "study.journal"

    @property
    def proxy_db(self) -> Path:
        """The SQLite file `hpcdl storage serve` keeps the study in, behind the gRPC proxy."""
        return self.sweep_dir / "study.sqlite"

    @property
    def trials_dir(self) -> Path:
        return self.sweep_dir / "trials"

    def trial_file(self, number: int | str) -> Path:
        return self.trials_dir / f"{number}.h5"

    def worker_done(self, worker: int | str) -> Path:
        return self.sweep_dir / "workers" / f"{worker}.done"

    @property
    def logs_dir(self) -> Path:
        return self.sweep_dir / "logs"

    def log(self, job: str) -> Path:
        return self.logs_dir / f"{job}.log"

    def benchmark(self, job: str) -> Path:
        """Snakemake's time/memory record of a job."""
        return self.sweep_dir / "benchmarks" / f"{job}.tsv"

    @property
    def summary_h5(self) -> Path:
        return self.sweep_dir / "summary.h5"

    @property
    def summary_csv(self) -> Path:
        return self.sweep_dir / "summary.csv"

    @property
    def figures_dir(self) -> Path:
        return self.sweep_dir / "figures"

    @property
    def report_html(self) -> Path:
        return self.sweep_dir / "report.html"

    @property
    def best_dir(self) -> Path:
        return self.sweep_dir / "best"

    @property
    def best_model(self) -> Path:
        return self.best_dir / "model.keras"

    @property
    def best_run(self) -> Path:
        return self.best_dir / "run.h5"

    @property
    def scaling_h5(self) -> Path:
        return self.sweep_dir / "scaling.h5"

    def scaling_run(self, ranks: int) -> Path:
        return self.sweep_dir / "scaling" / f"ranks-{ranks}.h5"

    @property
    def slurm_dir(self) -> Path:
        return self.sweep_dir / "slurm"

    def sbatch_script(self, job: str) -> Path:
        return self.slurm_dir / f"{job}.sbatch"

    def run_file(self, label: str) -> Path:
        """A run outside the sweep (`hpcdl train` without --out, a reproduced trial)."""
        return self.results_dir / "runs" / f"{label}.h5"


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config, apply `--set` overrides, validate; ConfigError names file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(document).__name__}")
    return Config(apply_overrides(document, overrides), str(path))
