"""hpcdl workflow: one sweep config -> dataset, W workers sharing one Optuna study, summary,
report and the final model. Thin on purpose: every rule calls `hpcdl <verb>`; the logic lives
in the hpcdl package.

    snakemake --profile profiles/local --configfile configs/smoke.yaml     # this machine
    snakemake --profile profiles/slurm --configfile configs/<sweep>.yaml   # a Slurm cluster
    snakemake -n --profile profiles/slurm --configfile ...                 # dry run
"""

import os
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

import hpcdl.config
from hpcdl.errors import EXIT_USER_ERROR, ConfigError


def config_layers() -> list[tuple[str, dict]]:
    """(name, document) of each config layer, lowest precedence first: the --configfile files
    in order, then --config."""
    layers = [(str(path), yaml.safe_load(Path(path).read_text()) or {})
              for path in workflow.config_settings.configfiles]
    if workflow.config_settings.config:
        layers.append(("--config", workflow.config_settings.config))
    return layers


APPTAINER = "APPTAINER" in str(workflow.deployment_settings.deployment_method).upper()
# Where Slurm answers, ask it whether the partition has the GPUs per node the config asks for
# (the executor is not known while the Snakefile is read, so: wherever sinfo works, except
# inside a Slurm job, whose allocation is already made — the jobs Snakemake submits included).
ASK_SLURM = workflow.is_main_process and "SLURM_JOB_ID" not in os.environ
# hpcdl's own checks first (schema, search space, metrics, ranks vs GPUs, container, GPUs the
# partition has): bad input is one line naming the file that sets the key, the value and what
# was expected, exit 2, and no job is submitted.
try:
    SWEEP_CONFIG = hpcdl.config.from_layers(config, config_layers(), apptainer=APPTAINER,
                                            slurm=ASK_SLURM)
except ConfigError as exc:
    print(exc, file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
# The one schema, shared with hpcdl's own loader: fills the same defaults into `config`.
validate(config, "configs/schema.yaml")

# every file of the sweep, from the one owner of the layout
PATHS = SWEEP_CONFIG.paths
DATASET = str(PATHS.dataset_file)
RES = config["resources"]
WORKERS = range(RES["workers"])
# Apptainer image: used when Snakemake runs with --software-deployment-method apptainer.
CONTAINER = RES["container"]
# MPI rules are not wrapped by Snakemake (that would put srun inside the image): the host's
# srun starts one container per rank, whose Open MPI meets srun's PMIx (the hybrid model).
RANK_EXEC = (
    f"apptainer exec --nv --bind {os.getcwd()} {CONTAINER}" if APPTAINER and CONTAINER else ""
)


def launched_per_rank(image):
    """`container:` of the MPI rules: names the image their ranks run in (RANK_EXEC) for the
    reader and `snakemake --lint`, but yields no image when Snakemake asks, so Snakemake never
    wraps the launcher itself: srun stays on the host and starts one container per rank."""

    def no_wrapping(wildcards):
        return None

    no_wrapping.image = image
    return no_wrapping


# Where jobs go: only what the sweep config names (never one site's values hard-coded).
SITE = {key: RES[name] for key, name in (("slurm_partition", "partition"),
                                         ("slurm_account", "account")) if RES[name]}
# GPUs are asked per node (--gres=gpu:N, as `hpcdl submit`'s --gpus-per-node), so a job of
# fewer nodes (scaling) asks for fewer GPUs; a whole-job count (`gpu`, i.e. --gpus) was kept
# when scaling shrank to one node and Slurm refused it. tasks_per_gpu 0: the executor plugin
# would otherwise add --ntasks-per-gpu=<tasks>. Each rank sees its node's GPUs and pins one by
# local rank (hpcdl.parallel.gpu_placement).
GPUS = {"gres": f"gpu:{RES['gpus_per_node']}", "tasks_per_gpu": 0} if RES["gpus_per_node"] else {}
MPI_JOB = dict(
    **SITE,
    nodes=RES["nodes"],
    tasks=RES["nodes"] * RES["ranks_per_node"],
    cpus_per_task=RES["cpus_per_task"],
    runtime=RES["runtime_min"],
    mem_mb=RES["mem_mb"],
    **GPUS,
)


rule all:
    input:
        str(PATHS.report_html),
        str(PATHS.best_model),
        str(PATHS.scaling_h5),
    default_target: True


rule sweep_config:
    """The validated config (defaults filled, --config overrides applied) that every
    hpcdl command of this sweep reads."""
    output:
        str(PATHS.config_file),
    params:
        text=yaml.safe_dump(config, sort_keys=False),
    log:
        str(PATHS.log("sweep_config")),
    localrule: True
    container:
        CONTAINER
    shell:
        "printf '%s\\n' {params.text:q} > {output} 2> {log}"


rule prepare:
    """The dataset file, shared by every sweep on that dataset; rerun only when the dataset
    section changes."""
    input:
        ancient(rules.sweep_config.output),
    output:
        DATASET,
    params:
        dataset=config["dataset"],
    log:
        str(PATHS.log("prepare")),
    benchmark:
        str(PATHS.benchmark("prepare"))
    resources:
        **SITE,
    container:
        CONTAINER
    shell:
        "hpcdl prepare --config {input} --force > {log} 2>&1"


rule worker:
    """One worker: a multi-rank job pulling trials from the sweep's study until its budget
    is spent."""
    input:
        config=rules.sweep_config.output,
        data=DATASET,
    output:
        touch(str(PATHS.worker_done("{worker}"))),
    wildcard_constraints:
        worker=r"\d+",
    log:
        str(PATHS.log("worker-{worker}")),
    benchmark:
        str(PATHS.benchmark("worker-{worker}"))
    threads: MPI_JOB["tasks"] * RES["cpus_per_task"]
    resources:
        **MPI_JOB,
    params:
        rank_exec=RANK_EXEC,
    container:
        launched_per_rank(CONTAINER)
    shell:
        "{resources.mpi} -n {resources.tasks} {params.rank_exec} hpcdl worker --config {input.config}"
        " --worker-id {wildcards.worker} > {log} 2>&1"


rule aggregate:
    input:
        config=rules.sweep_config.output,
        workers=[str(PATHS.worker_done(w)) for w in WORKERS],
    output:
        h5=str(PATHS.summary_h5),
        csv=report(str(PATHS.summary_csv), caption="configs/report/summary.rst",
                   category="Summary"),
    log:
        str(PATHS.log("aggregate")),
    benchmark:
        str(PATHS.benchmark("aggregate"))
    resources:
        **SITE,
    container:
        CONTAINER
    shell:
        "hpcdl aggregate --config {input.config} > {log} 2>&1"


rule final:
    """Retrain the best trial's params on train+val for the full epochs; test; save."""
    input:
        config=rules.sweep_config.output,
        data=DATASET,
        workers=[str(PATHS.worker_done(w)) for w in WORKERS],
    output:
        model=str(PATHS.best_model),
        run=str(PATHS.best_run),
    log:
        str(PATHS.log("final")),
    benchmark:
        str(PATHS.benchmark("final"))
    threads: MPI_JOB["tasks"] * RES["cpus_per_task"]
    resources:
        **MPI_JOB,
    params:
        rank_exec=RANK_EXEC,
    container:
        launched_per_rank(CONTAINER)
    shell:
        "{resources.mpi} -n {resources.tasks} {params.rank_exec} hpcdl final"
        " --config {input.config} > {log} 2>&1"


rule scaling:
    """The best params at resources.scaling_ranks ranks: speed-up and parallel efficiency."""
    input:
        config=rules.sweep_config.output,
        data=DATASET,
        workers=[str(PATHS.worker_done(w)) for w in WORKERS],
    output:
        str(PATHS.scaling_h5),
    log:
        str(PATHS.log("scaling")),
    benchmark:
        str(PATHS.benchmark("scaling"))
    threads: max(RES["scaling_ranks"]) * RES["cpus_per_task"]
    resources:
        **{**MPI_JOB, "tasks": max(RES["scaling_ranks"]),
           "nodes": -(-max(RES["scaling_ranks"]) // RES["ranks_per_node"])},
    params:
        rank_exec=RANK_EXEC,
    container:
        launched_per_rank(CONTAINER)
    shell:
        "hpcdl scaling --config {input.config}"
        " --launcher '{resources.mpi}' --rank-exec '{params.rank_exec}' > {log} 2>&1"


rule report:
    input:
        config=rules.sweep_config.output,
        summary=rules.aggregate.output.h5,
        final=rules.final.output.run,
        scaling=rules.scaling.output,
    output:
        html=report(str(PATHS.report_html), caption="configs/report/report.rst",
                    category="Report"),
        figures=report(directory(str(PATHS.figures_dir)), patterns=["{name}.png"],
                       caption="configs/report/figure.rst", category="Figures"),
    log:
        str(PATHS.log("report")),
    benchmark:
        str(PATHS.benchmark("report"))
    resources:
        **SITE,
    container:
        CONTAINER
    shell:
        "hpcdl report --config {input.config} > {log} 2>&1"
