"""hpcdl workflow: one sweep config -> dataset, W workers sharing one Optuna study, summary,
report and the final model. Thin on purpose: every rule calls `hpcdl <verb>`; the logic lives
in the hpcdl package.

    snakemake --profile profiles/local --configfile configs/smoke.yaml     # this machine
    snakemake --profile profiles/slurm --configfile configs/<sweep>.yaml   # a Slurm cluster
    snakemake -n --profile profiles/slurm --configfile ...                 # dry run
"""

import os

import yaml
from snakemake.utils import validate

import hpcdl.config


# The one schema, shared with hpcdl's own loader; fills in the same defaults. Then hpcdl's
# checks beyond the schema (search space, metrics, ranks vs GPUs, container), so that bad
# input stops here, before any job is submitted.
validate(config, "configs/schema.yaml")
APPTAINER = "APPTAINER" in str(workflow.deployment_settings.deployment_method).upper()
hpcdl.config.Config(config, origin="--configfile").check_container(apptainer=APPTAINER)

RESULTS = config["results_dir"]
SWEEP = f"{RESULTS}/{config['name']}"
DATASET = f"{RESULTS}/data/{config['dataset']['name']}.h5"
RES = config["resources"]
WORKERS = range(RES["workers"])
# Apptainer image: used when Snakemake runs with --software-deployment-method apptainer.
CONTAINER = RES["container"]
# MPI rules are not wrapped by Snakemake (that would put srun inside the image): the host's
# srun starts one container per rank, whose Open MPI meets srun's PMIx (the hybrid model).
RANK_EXEC = (
    f"apptainer exec --nv --bind {os.getcwd()} {CONTAINER}" if APPTAINER and CONTAINER else ""
)
# Where jobs go: only what the sweep config names (never one site's values hard-coded).
SITE = {key: RES[name] for key, name in (("slurm_partition", "partition"),
                                         ("slurm_account", "account")) if RES[name]}
MPI_JOB = dict(
    **SITE,
    nodes=RES["nodes"],
    tasks=RES["nodes"] * RES["ranks_per_node"],
    cpus_per_task=RES["cpus_per_task"],
    runtime=RES["runtime_min"],
    mem_mb=RES["mem_mb"],
    **({"gpu": RES["gpus_per_node"] * RES["nodes"], "tasks_per_gpu": 1}
       if RES["gpus_per_node"] else {}),
)


rule all:
    input:
        f"{SWEEP}/report.html",
        f"{SWEEP}/best/model.keras",
        f"{SWEEP}/scaling.h5",
    default_target: True


rule sweep_config:
    """The validated config (defaults filled, --config overrides applied) that every
    hpcdl command of this sweep reads."""
    output:
        f"{SWEEP}/config.yaml",
    params:
        text=yaml.safe_dump(config, sort_keys=False),
    log:
        f"{SWEEP}/logs/sweep_config.log",
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
        f"{SWEEP}/logs/prepare.log",
    benchmark:
        f"{SWEEP}/benchmarks/prepare.tsv"
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
        touch(f"{SWEEP}/workers/{{worker}}.done"),
    wildcard_constraints:
        worker=r"\d+",
    log:
        f"{SWEEP}/logs/worker-{{worker}}.log",
    benchmark:
        f"{SWEEP}/benchmarks/worker-{{worker}}.tsv"
    threads: MPI_JOB["tasks"] * RES["cpus_per_task"]
    resources:
        **MPI_JOB,
    params:
        rank_exec=RANK_EXEC,
    container:
        None
    shell:
        "{resources.mpi} -n {resources.tasks} {params.rank_exec} hpcdl worker --config {input.config}"
        " --worker-id {wildcards.worker} > {log} 2>&1"


rule aggregate:
    input:
        config=rules.sweep_config.output,
        workers=expand(f"{SWEEP}/workers/{{worker}}.done", worker=WORKERS),
    output:
        h5=f"{SWEEP}/summary.h5",
        csv=report(f"{SWEEP}/summary.csv", caption="configs/report/summary.rst",
                   category="Summary"),
    log:
        f"{SWEEP}/logs/aggregate.log",
    benchmark:
        f"{SWEEP}/benchmarks/aggregate.tsv"
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
        workers=expand(f"{SWEEP}/workers/{{worker}}.done", worker=WORKERS),
    output:
        model=f"{SWEEP}/best/model.keras",
        run=f"{SWEEP}/best/run.h5",
    log:
        f"{SWEEP}/logs/final.log",
    benchmark:
        f"{SWEEP}/benchmarks/final.tsv"
    threads: MPI_JOB["tasks"] * RES["cpus_per_task"]
    resources:
        **MPI_JOB,
    params:
        rank_exec=RANK_EXEC,
    container:
        None
    shell:
        "{resources.mpi} -n {resources.tasks} {params.rank_exec} hpcdl final"
        " --config {input.config} > {log} 2>&1"


rule scaling:
    """The best params at resources.scaling_ranks ranks: speed-up and parallel efficiency."""
    input:
        config=rules.sweep_config.output,
        data=DATASET,
        workers=expand(f"{SWEEP}/workers/{{worker}}.done", worker=WORKERS),
    output:
        f"{SWEEP}/scaling.h5",
    log:
        f"{SWEEP}/logs/scaling.log",
    benchmark:
        f"{SWEEP}/benchmarks/scaling.tsv"
    threads: max(RES["scaling_ranks"]) * RES["cpus_per_task"]
    resources:
        **{**MPI_JOB, "tasks": max(RES["scaling_ranks"]),
           "nodes": -(-max(RES["scaling_ranks"]) // RES["ranks_per_node"])},
    params:
        rank_exec=RANK_EXEC,
    container:
        None
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
        html=report(f"{SWEEP}/report.html", caption="configs/report/report.rst",
                    category="Report"),
        figures=report(directory(f"{SWEEP}/figures"), patterns=["{name}.png"],
                       caption="configs/report/figure.rst", category="Figures"),
    log:
        f"{SWEEP}/logs/report.log",
    benchmark:
        f"{SWEEP}/benchmarks/report.tsv"
    resources:
        **SITE,
    container:
        CONTAINER
    shell:
        "hpcdl report --config {input.config} > {log} 2>&1"
