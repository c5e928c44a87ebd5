"""Benchmark 3: the study storage at cluster scale (issue 21).

Two parts, both running hpcdl's own rank-0 worker code (worker.Worker's next_plan,
decide_prune, the heartbeat thread, _tell_result; no TensorFlow, no MPI):

1. The op model: one process runs trials against a study already holding 0 / 2,000 / 10,000
   finished trials; every call it makes to the storage is counted and timed (the storage
   object's methods wrapped in the benchmark, not in the runtime), per phase of a trial.
2. Contention: 1 ... 256 processes (forked) run trials back to back for a fixed time against
   each storage; sustained storage calls/s, p50/p99 per call, errors, lost and duplicated
   trials. With --before REV the gRPC proxy is also served by that revision's hpcdl, and the
   journal's worker processes also run that revision's hpcdl (its lock is client code), in the
   same run, row by row, for a side-by-side comparison.

Journal, SQLite, PostgreSQL (a throw-away server from Debian's postgresql, if installed) and
the gRPC proxy (`hpcdl storage serve`, an SQLite file behind it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from common import REPO, append_results, env

TREE = Path(os.environ.get("HPCDL_TREE", REPO))  # whose hpcdl runs (--before: an old one)
sys.path.insert(0, str(TREE))

EPOCHS = 10  # reports per trial (the op model's and the projection's trial)
HEARTBEAT_S = 30.0  # the config's default: beats per trial = trial seconds / 30
OPMODEL_PACE = 0.02  # seconds per epoch in the op model, so that its heartbeats fire
OPMODEL_HEARTBEAT_S = 0.05
OPMODEL_TRIALS = 6
CACHE = Path(tempfile.gettempdir()) / "hpcdl-bench-storage"  # prefilled studies, reused
KINDS = ("journal", "sqlite", "postgresql", "grpc")
# storage methods that read the storage object's own settings, not the storage: not counted
SETTINGS = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
STRAGGLER_S = 15.0  # after a contention run, how long a process may take to end its trial
OPEN_TIMEOUT_S = 1800.0  # for every process of a contention run to have opened the study


# ---------------------------------------------------------------- counting storage calls


class Counter:
    """Per (phase, storage method): calls and seconds; only the outermost call is counted
    (a storage calling its own methods is one call to it)."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.phase = "open"
        self.local = threading.local()

    def wrap(self, storage: Any) -> None:
        for name in dir(storage):
            method = getattr(storage, name)
            if name.startswith("_") or not callable(method) or name in SETTINGS:
                continue
            setattr(storage, name, self._counted(name, method))

    def _counted(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self.local, "depth", 0)
            self.local.depth = depth + 1
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.local.depth = depth
                if depth == 0:
                    phase = "heartbeat" if threading.current_thread().name.startswith(
                        "heartbeat") else self.phase
                    self.calls[(phase, name)].append(time.perf_counter() - began)

        return call

    @contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before


# ---------------------------------------------------------------- one worker's trials


def config_for(work: Path, storage: str, pruner: str = "median") -> Path:
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(name="bench", results_dir=str(work), storage=storage)
    document["train"]["epochs"] = EPOCHS
    document["search"].update(n_trials=10**7, sampler="random", pruner=pruner,
                              pruner_startup_trials=5, pruner_warmup_epochs=2)
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def rank0_worker(cfg: Any, worker_id: int, counter: Counter) -> Any:
    """worker.Worker as rank 0 of a one-rank job, without MPI or TensorFlow."""
    from hpcdl import parallel, study, worker

    storage = study.open_storage(cfg)
    w = worker.Worker.__new__(worker.Worker)
    w.config, w.worker_id, w.trial, w.nothing_completed = cfg, worker_id, None, False
    w.ranks = parallel.Ranks(0, 1, 0, 1, "single", None, socket.gethostname())
    w.study = study.open_study(cfg, worker_id, storage=storage)
    counter.wrap(study.storage_of(w.study))
    return w


def run_trial(w: Any, counter: Counter, pace: float, heartbeat_s: float,
              metric_of: Callable[[int], float]) -> int:
    """One trial as worker.run_trial runs it on rank 0; its number (-1: budget over). Epochs
    last `pace` s on average, jittered by +-50 %: paced processes must not report in lockstep,
    as real workers do not."""
    from hpcdl import liveness, study, train

    with counter.in_phase("next_plan"):
        plan = w.next_plan()
    if plan is None:
        return -1
    metric = w.config.section("search")["metric"]
    values: list[float] = []
    storage = study.storage_of(w.study)
    with counter.in_phase("heartbeat"), liveness.heartbeat(storage, study.trial_id(w.trial),
                                                           heartbeat_s):
        for epoch in range(EPOCHS):
            time.sleep(pace * random.uniform(0.5, 1.5))
            values.append(metric_of(epoch))
            with counter.in_phase("epoch"):
                if decide_prune(w, epoch, {metric: values[-1]}):
                    break
    stop = train.StopReason.PRUNED if len(values) < EPOCHS else train.StopReason.COMPLETED
    result = train.RunResult(stop, {metric: values, "loss": values}, {}, 1000, 1.0, Path("-"))
    with counter.in_phase("tell"):
        w._tell_result(result)
    return plan.number


def decide_prune(w: Any, epoch: int, metrics: dict[str, float]) -> bool:
    """worker.Worker.decide_prune; in a tree from before it existed, the same steps inline."""
    if hasattr(w, "decide_prune"):
        return bool(w.decide_prune(epoch, metrics))
    w.trial.report(metrics[w.config.section("search")["metric"]], epoch + 1)
    return bool(w.trial.should_prune())


# ---------------------------------------------------------------- prefilled studies


def template_trials(n: int) -> list[Any]:
    """n finished trials as a sweep leaves them: 70 % complete after 10 epochs, 30 % pruned."""
    import optuna

    from hpcdl import config, study

    cfg = config.load(config_for(Path(tempfile.mkdtemp()), "journal"))
    space = cfg.section("search")["space"]
    sampler = optuna.samplers.RandomSampler(seed=0)
    memory = optuna.create_study(sampler=sampler, direction="maximize")
    trials = []
    for i in range(n):
        trial = memory.ask()
        params = study.suggest(trial, space)
        epochs = EPOCHS if i % 10 < 7 else 3
        curve = {e + 1: 0.5 + 0.04 * e + 0.001 * (i % 50) for e in range(epochs)}
        state = optuna.trial.TrialState.COMPLETE if epochs == EPOCHS else (
            optuna.trial.TrialState.PRUNED)
        trials.append(optuna.trial.create_trial(
            params=params, distributions=trial.distributions, state=state,
            value=max(curve.values()) if epochs == EPOCHS else None,
            intermediate_values=curve, system_attrs={"hpcdl:worker_id": i % 64}))
    return trials


def prefill(url: str, work: Path, n: int) -> None:
    """The study, created as the first worker does, holding n finished trials."""
    import optuna

    from hpcdl import config, study

    study.open_study(config.load(config_for(work, url)))
    if n:
        # PostgreSQL: commits not waiting for the disk (one per trial), else 10,000 take long
        fast = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {
            "options": "-c synchronous_commit=off"}}) if url.startswith("postgresql") else None
        optuna.load_study(study_name="bench", storage=fast or study.open_storage(
            config.load(config_for(work, url)))).add_trials(template_trials(n))


def prefilled_file(kind: str, n: int) -> Path:
    """A journal or SQLite file holding the prefilled study, made once and then copied."""
    path = CACHE / f"{kind}-{n}" / ("bench" if kind == "journal" else "study.sqlite")
    if not path.exists():
        # made in memory (/dev/shm), where a commit does not wait for the disk
        work = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        url = "journal" if kind == "journal" else f"sqlite:///{work}/study.sqlite"
        in_child(prefill, url, work, n)
        made = work / "bench" / "study.journal" if kind == "journal" else work / "study.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(made, path.with_suffix(".part"))
        path.with_suffix(".part").rename(path)
        shutil.rmtree(work)
    return path


def in_child(function: Callable[..., Any], *args: Any) -> None:
    """Run in a forked child: the parent keeps no database connection or gRPC channel."""
    process = mp.get_context("fork").Process(target=function, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        sys.exit(f"{function.__name__}{args} failed")


# ---------------------------------------------------------------- storages to measure


class Postgres:
    """A throw-away PostgreSQL server from Debian's package, as tests/conftest.py starts one."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        self.bin = bins[-1] if bins else None
        self.base: Path | None = None
        self.port = free_port()
        self.databases: set[str] = set()

    def start(self) -> None:
        assert self.bin is not None
        self.base = Path(tempfile.mkdtemp(prefix="hpcdl-bench-pg-"))
        shutil.chown(self.base, "postgres")
        self._as_postgres("initdb", "-D", f"{self.base}/data", "-A", "trust", "-U", "postgres")
        self._as_postgres("pg_ctl", "-D", f"{self.base}/data", "-l", f"{self.base}/log", "-w",
                          "start", "-o", f"-p {self.port} -k {self.base} -c "
                          "listen_addresses=127.0.0.1 -c max_connections=700 -c fsync=on")

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def database(self, name: str, template: str | None = None) -> str:
        args = ["-T", template] if template else []
        self._as_postgres("createdb", "-h", "127.0.0.1", "-p", str(self.port), *args, name)
        return self.url(name)

    def stop(self) -> None:
        if self.base is not None:
            self._as_postgres("pg_ctl", "-D", f"{self.base}/data", "-m", "fast", "-w", "stop")
            shutil.rmtree(self.base, ignore_errors=True)

    def _as_postgres(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
                       check=True, capture_output=True, timeout=300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def grpc_server(work: Path, db: Path, tree: Path) -> Iterator[str]:
    """`hpcdl storage serve` of `tree`'s hpcdl in front of the SQLite file `db`."""
    port = free_port()
    cfg_path = config_for(work, f"grpc://127.0.0.1:{port}")
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hpcdl.cli import main; sys.exit(main())",
         "storage", "serve", "--config", str(cfg_path),
         "--host", "127.0.0.1", "--backend", f"sqlite:///{db}"],
        env=env(PYTHONPATH=str(tree)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if server.poll() is not None:
                sys.exit("hpcdl storage serve did not start")
            time.sleep(0.2)
        yield f"grpc://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


@contextmanager
def storage_at(kind: str, n: int, work: Path, pg: Postgres | None,
               tree: Path = TREE) -> Iterator[str]:
    """A fresh copy of the study with n finished trials, as a storage URL for config_for."""
    if kind == "journal":
        (work / "bench").mkdir(parents=True)
        shutil.copy(prefilled_file("journal", n), work / "bench" / "study.journal")
        yield "journal"
    elif kind == "sqlite":
        shutil.copy(prefilled_file("sqlite", n), work / "study.sqlite")
        yield f"sqlite:///{work}/study.sqlite"
    elif kind == "postgresql":
        assert pg is not None
        template = f"prefilled_{n}"
        if template not in pg.databases:
            in_child(prefill, pg.database(template), work, n)
            pg.databases.add(template)
        yield pg.database(f"run_{time.monotonic_ns()}", template)
    else:
        shutil.copy(prefilled_file("sqlite", n), work / "study.sqlite")
        with grpc_server(work, work / "study.sqlite", tree) as url:
            yield url


# ---------------------------------------------------------------- part 1: the op model


def opmodel_child(url: str, work: str, trials: int, out: str) -> None:
    """One worker's trials, every storage call counted: {phase/method: [seconds...]}."""
    from hpcdl import config

    cfg = config.load(config_for(Path(work), url))
    counter = Counter()
    w = rank0_worker(cfg, 0, counter)
    for _ in range(trials):
        run_trial(w, counter, OPMODEL_PACE, OPMODEL_HEARTBEAT_S,
                  lambda epoch: 0.95 + 0.001 * epoch)  # above the median: never pruned
    result = {f"{phase}/{name}": calls for (phase, name), calls in counter.calls.items()}
    Path(out).write_text(json.dumps({"trials": trials, "calls": result}))


def opmodel(kind: str, n: int, trials: int, pg: Postgres | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, storage_at(kind, n, Path(tmp), pg) as url:
        out = Path(tmp) / "opmodel.json"
        in_child(opmodel_child, url, tmp, trials, str(out))
        return json.loads(out.read_text())


def opmodel_tables(results: dict[tuple[str, int], dict[str, Any]], sizes: tuple[int, ...]
                   ) -> list[list[str]]:
    table = [["storage", "phase / storage call", "calls per trial"]
             + [f"ms per call, study of {n:,}" for n in sizes]]
    for kind in dict.fromkeys(k for k, _ in results):
        keys = sorted({key for (k, _), r in results.items() if k == kind for key in r["calls"]})
        for key in keys:
            first = results[(kind, sizes[0])]
            per_trial = len(first["calls"].get(key, [])) / first["trials"]
            cells = []
            for n in sizes:
                calls = results.get((kind, n), {"calls": {}})["calls"].get(key)
                cells.append(f"{statistics.median(calls) * 1000:.2f}" if calls else "-")
            table.append([kind, key, f"{per_trial:.2f}", *cells])
    return table


# ---------------------------------------------------------------- part 2: contention


def contention_child(cfg_path: Path, worker_id: int, seconds: float, pace: float,
                     queue: Any, start: Any) -> None:
    """Open the study, wait for every other process to have opened it too (`start`, a
    barrier), then trials back to back until `seconds` pass: (told, call latencies, errors,
    seconds to open)."""
    from hpcdl import config

    told: list[tuple[int, str]] = []
    errors: list[str] = []
    counter = Counter()
    began = time.monotonic()
    try:
        try:
            w = rank0_worker(config.load(cfg_path), worker_id, counter)
        finally:
            opened = time.monotonic() - began
            start.wait(OPEN_TIMEOUT_S)
        time.sleep(random.uniform(0, pace))  # nor start in lockstep
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                number = run_trial(w, counter, pace, HEARTBEAT_S,
                                   lambda epoch: 0.95 + 0.001 * epoch)
                state = w.study._storage.get_trial(w.trial._trial_id).state
                told.append((number, state.name))
            except Exception as exc:
                errors.append(type(exc).__name__ + ": " + str(exc).splitlines()[0][:80])
                time.sleep(0.1)
    except Exception as exc:
        errors.append("open: " + type(exc).__name__ + ": " + str(exc).splitlines()[0][:80])
    latencies = [s for (phase, _), calls in counter.calls.items() if phase != "open"
                 for s in calls]
    queue.put((told, latencies, errors, opened))


def contention(kind: str, n: int, processes: int, seconds: float, pg: Postgres | None,
               tree: Path = TREE, pace: float = 0.0) -> list[str]:
    import optuna

    from hpcdl import config, study

    name = kind if tree == TREE else f"{kind} (before: {tree.name})"
    name += f", paced {pace * EPOCHS:g}-s trials" if pace else ""
    with tempfile.TemporaryDirectory() as tmp, storage_at(kind, n, Path(tmp), pg, tree) as url:
        cfg_path = config_for(Path(tmp), url)  # once: a child must not read it half-written
        fork = mp.get_context("fork")
        queue, start = fork.Queue(), fork.Barrier(processes + 1)
        procs = [fork.Process(target=contention_child,
                              args=(cfg_path, i, seconds, pace, queue, start))
                 for i in range(processes)]
        for p in procs:
            p.start()
        # opening a large study takes each process seconds, here all on 2 cores: the clock
        # starts when every process has it open, as workers that started a while ago
        start.wait(OPEN_TIMEOUT_S)
        began = time.perf_counter()
        # a process may begin a trial just before the end: it has that trial's time too
        results = collect(queue, procs, seconds + 1.5 * pace * EPOCHS + STRAGGLER_S)
        elapsed = time.perf_counter() - began
        stored = optuna.load_study(study_name="bench", storage=study.open_storage(
            config.load(cfg_path))).get_trials(deepcopy=False)
    told = [t for r in results for t in r[0]]
    latencies = sorted(s * 1000 for r in results for s in r[1])
    errors = [e for r in results for e in r[2]]
    by_number = {t.number: t.state.name for t in stored}
    lost = sum(1 for number, state in told if by_number.get(number) != state)
    duplicated = len(told) - len({number for number, _ in told})
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    per_trial = f"{sum(latencies) / len(told):.0f}" if told else "-"
    opened = [r[3] for r in results if r[3] is not None]
    return [name, f"{n:,}", str(processes), str(len(told)), f"{len(latencies) / elapsed:.0f}",
            f"{statistics.median(latencies):.1f}" if latencies else "-", f"{p99:.0f}", per_trial,
            str(lost), str(duplicated), f"{len(errors)}" + (f" ({errors[0]})" if errors else ""),
            f"{statistics.median(opened):.1f}" if opened else "-"]


def contention_in_tree(tree: Path, kind: str, n: int, processes: int, seconds: float,
                       pace: float = 0.0) -> list[str]:
    """contention() with `tree`'s hpcdl in the worker processes: this script again, in a
    subprocess whose hpcdl is that tree's (the journal's lock is client code)."""
    done = subprocess.run(
        [sys.executable, __file__, "--one-row", json.dumps([kind, n, processes, seconds, pace])],
        env=env(HPCDL_TREE=str(tree)), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"contention row in {tree} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.splitlines()[-1])
    row[0] = row[0].replace(kind, f"{kind} (before: {tree.name})", 1)
    return row


def collect(queue: Any, procs: list[Any], seconds: float) -> list[Any]:
    """Every process's results; one still inside a storage call after `seconds` is killed
    and counted as an error (SQLite under many writers can wait that long for its lock)."""
    import queue as queues

    results, deadline = [], time.monotonic() + seconds
    for _ in procs:
        try:
            results.append(queue.get(timeout=max(0.1, deadline - time.monotonic())))
        except queues.Empty:
            break
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    stuck = len(procs) - len(results)
    return results + [([], [], ["killed: still in a storage call"], None)] * stuck


def fits_in_memory(kind: str, n: int, processes: int) -> bool:
    """Will the processes' own memory (measured: 35 MiB, plus per 1,000 trials in the study
    22 MiB with an RDB's client cache, 3-5 MiB for journal and gRPC) take at most half of
    what is available? Other helpers share the machine."""
    mib_each = 35 + n / 1000 * (22 if kind in ("sqlite", "postgresql") else 5)
    available = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                     .splitlines() if line.startswith("MemAvailable")) / 1024
    return processes * mib_each < 0.5 * available


# ---------------------------------------------------------------- gRPC proxy: before / after


def proxy_ab_child(urls: list[str], works: list[str], rounds: int, out: str) -> None:
    """One client, trials alternated between the two servers: per server, seconds to open
    the study (the client's first listing) and storage seconds per trial."""
    from hpcdl import config

    counters = [Counter() for _ in urls]
    workers, opened = [], []
    for url, work, counter in zip(urls, works, counters, strict=True):
        began = time.perf_counter()
        w = rank0_worker(config.load(config_for(Path(work), url)), 0, counter)
        w.study.get_trials(deepcopy=False)
        opened.append(time.perf_counter() - began)
        workers.append(w)
    per_trial: list[list[float]] = [[] for _ in urls]
    for _ in range(rounds):
        for w, counter, times in zip(workers, counters, per_trial, strict=True):
            before = sum(sum(calls) for calls in counter.calls.values())
            run_trial(w, counter, 0.0, HEARTBEAT_S, lambda epoch: 0.95 + 0.001 * epoch)
            times.append(sum(sum(calls) for calls in counter.calls.values()) - before)
    Path(out).write_text(json.dumps({"opened": opened, "per_trial": per_trial}))


def proxy_ab(n: int, rounds: int, before: Path) -> list[str]:
    """The gRPC proxy of this tree and of `before`, side by side on copies of one study."""
    with tempfile.TemporaryDirectory() as tmp:
        works = [Path(tmp) / "after", Path(tmp) / "before"]
        for work in works:
            work.mkdir()
            shutil.copy(prefilled_file("sqlite", n), work / "study.sqlite")
        with grpc_server(works[0], works[0] / "study.sqlite", TREE) as after_url, \
                grpc_server(works[1], works[1] / "study.sqlite", before) as before_url:
            out = Path(tmp) / "ab.json"
            in_child(proxy_ab_child, [after_url, before_url], [str(w) for w in works],
                     rounds, str(out))
        result = json.loads(out.read_text())
    after_ms, before_ms = (statistics.median(t) * 1000 for t in result["per_trial"])
    return [f"{n:,}", str(rounds), f"{result['opened'][1]:.2f}", f"{result['opened'][0]:.2f}",
            f"{before_ms:.0f}", f"{after_ms:.0f}", f"{before_ms / after_ms:.1f}x"]


# ---------------------------------------------------------------- projection


def ops_per_trial(model: dict[str, Any], trial_s: float) -> tuple[float, float]:
    """(calls, storage seconds) one worker spends per trial of trial_s seconds with EPOCHS
    epochs and a heartbeat every HEARTBEAT_S: the op model's per-trial calls, its heartbeats
    rescaled from the op model's rate to the real one."""
    calls = seconds = 0.0
    for key, latencies in model["calls"].items():
        per_trial = len(latencies) / model["trials"]
        if key.startswith("heartbeat/"):
            per_trial = trial_s / HEARTBEAT_S
        calls += per_trial
        seconds += per_trial * statistics.median(latencies)
    return calls, seconds


def projection(model: dict[str, Any], capacity: float, kind: str, n: int) -> list[str]:
    """Workers a storage carries with its time < 1 % of a trial: see the notes."""
    row = [kind, f"{n:,}", f"{capacity:.0f}"]
    for trial_s in (60.0, 600.0):
        calls, seconds = ops_per_trial(model, trial_s)
        by_capacity = 0.5 * capacity * trial_s / calls
        fits = 2 * seconds < 0.01 * trial_s
        row += [f"{calls:.1f}", f"{seconds * 1000:.0f}",
                f"{by_capacity:,.0f}" if fits else "0 (alone over 1 %)"]
    return row


class LoadAverage:
    """The machine's 1-minute load average, sampled every 10 s while the benchmark runs: the
    results say how idle the 2 cores were, measured, not assumed."""

    def __init__(self) -> None:
        self.samples = [os.getloadavg()[0]]
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            time.sleep(10)
            self.samples.append(os.getloadavg()[0])

    def span(self) -> str:
        return (f"1-minute load average during the run: {min(self.samples):.1f}-"
                f"{max(self.samples):.1f} (median {statistics.median(self.samples):.1f}) on "
                f"{os.cpu_count()} cores; the benchmark's own processes are part of it.")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="1 and 16 processes, studies of 0 and 2,000, 4 s per run")
    parser.add_argument("--processes", default="1,16,64,128,256")
    parser.add_argument("--sizes", default="0,2000,10000")
    parser.add_argument("--seconds", type=float, default=12.0, help="per contention run")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--proxy-ab", type=int, default=0, metavar="TRIALS",
                        help="with --before: only the gRPC proxy, this tree's and the old "
                        "one's side by side, one client alternating TRIALS trials on each")
    parser.add_argument("--paced", type=float, default=0.0, metavar="S",
                        help="then each storage at its largest process count and study with "
                        f"S seconds of sleep per epoch ({EPOCHS} epochs a trial)")
    parser.add_argument("--pg-max-size", type=int, default=2000,
                        help="largest study on PostgreSQL (filling one with 10,000 trials "
                        "takes about 10 min on 2 shared cores)")
    parser.add_argument("--before", help="also run the journal's workers and serve the gRPC "
                        "proxy with this git revision's hpcdl, side by side (e.g. main)")
    parser.add_argument("--one-row", help=argparse.SUPPRESS)  # contention_in_tree's child
    args = parser.parse_args()
    if args.one_row:
        kind, n, processes, seconds, pace = json.loads(args.one_row)
        print(json.dumps(contention(kind, n, processes, seconds, None, pace=pace)))
        return
    counts = (1, 16) if args.quick else tuple(int(p) for p in args.processes.split(","))
    sizes = (0, 2000) if args.quick else tuple(int(n) for n in args.sizes.split(","))
    seconds = 4.0 if args.quick else args.seconds
    kinds = [k for k in args.kinds.split(",") if k != "postgresql" or Postgres().bin]
    pg = Postgres() if "postgresql" in kinds else None
    before = export_tree(args.before) if args.before else None
    try:
        if before and args.proxy_ab:
            write_proxy_ab([proxy_ab(n, args.proxy_ab, before) for n in sizes], before.name)
            return
        if pg:
            pg.start()
        run_all(kinds, counts, sizes, seconds, pg, before, args.pg_max_size, args.paced)
    finally:
        if pg:
            pg.stop()
        if before:
            shutil.rmtree(before.parent, ignore_errors=True)


def export_tree(rev: str) -> Path:
    """`rev`'s hpcdl package in a temporary directory (git archive), for --before."""
    target = Path(tempfile.mkdtemp(prefix="hpcdl-before-")) / rev
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "hpcdl", "configs"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def run_all(kinds: list[str], counts: tuple[int, ...], sizes: tuple[int, ...],
            seconds: float, pg: Postgres | None, before: Path | None, pg_max: int,
            paced: float) -> None:
    load = LoadAverage()
    models = {}
    for kind in kinds:
        for n in sizes:
            if kind == "postgresql" and n > pg_max:
                continue
            models[(kind, n)] = opmodel(kind, n, OPMODEL_TRIALS, pg)
            print(f"op model {kind} {n}: done", flush=True)
    model_table = opmodel_tables(models, sizes)
    write_opmodel(model_table, load.span())  # now: the contention runs take long
    table = [["storage", "study size", "processes", "trials", "storage calls/s",
              "p50 ms/call", "p99 ms/call", "storage ms/trial (mean)", "lost", "duplicated",
              "errors", "open s (median)"]]
    capacity: dict[tuple[str, int], float] = {}
    for n in sizes:
        for processes in counts:
            for kind in kinds:
                if not fits_in_memory(kind, n, processes) or (
                        kind == "postgresql" and n > pg_max):
                    print(f"{kind} {n} {processes}: skipped (memory or size)", flush=True)
                    continue
                table.append(contention(kind, n, processes, seconds, pg))
                capacity[(kind, n)] = max(capacity.get((kind, n), 0), float(table[-1][4]))
                print(" | ".join(table[-1]), flush=True)
                if before and kind == "grpc" and processes <= 64:
                    table.append(contention(kind, n, processes, seconds, pg, before))
                    print(" | ".join(table[-1]), flush=True)
                if before and kind == "journal":
                    table.append(contention_in_tree(before, kind, n, processes, seconds))
                    print(" | ".join(table[-1]), flush=True)
    for kind in kinds if paced else ():
        largest = max((c for c in counts if fits_in_memory(kind, sizes[-1], c)), default=1)
        n = min(sizes[-1], pg_max) if kind == "postgresql" else sizes[-1]
        run_s = max(seconds, 3 * paced * EPOCHS)
        table.append(contention(kind, n, largest, run_s, pg, pace=paced))
        print(" | ".join(table[-1]), flush=True)
        if before and kind == "journal":
            table.append(contention_in_tree(before, kind, n, largest, run_s, paced))
            print(" | ".join(table[-1]), flush=True)
    projected = [["storage", "study size", "capacity calls/s"]
                 + [f"{t} s trial: {c}" for t in (60, 600)
                    for c in ("calls/trial", "ms/trial alone", "workers at < 1 %")]]
    projected += [projection(models[key], capacity[key], *key) for key in capacity]
    write_results(table, projected, seconds, load.span())


def write_proxy_ab(rows: list[list[str]], rev: str) -> None:
    append_results(
        "3d. gRPC proxy before / after, side by side (issue 21)",
        [["study size", "trials each", f"open s ({rev})", "open s (now)",
          f"storage ms/trial ({rev})", "storage ms/trial (now)", "speed-up"], *rows],
        f"Two `hpcdl storage serve` at once, each on its own copy of the same SQLite study: "
        f"{rev}'s (raw RDBStorage behind Optuna's proxy) and this tree's (Optuna's "
        "_CachedStorage and hpcdl's ListingCache behind it). One client process runs the "
        "rank-0 worker code, alternating trials between them (no training; 10 reports, "
        "median pruner), so machine load falls on both alike. open: opening the study "
        "and its first full listing (the client's cache fill). Other helpers were loading "
        "the 2 cores (load average 20-30) during the run.")


def write_opmodel(model: list[list[str]], load: str) -> None:
    append_results(
        "3a. Study storage: the op model of one worker (issue 21)", model,
        f"One process runs {OPMODEL_TRIALS} trials with hpcdl's rank-0 worker code "
        "(Worker.next_plan, decide_prune per epoch, the heartbeat thread, _tell_result; "
        f"sampler random, median pruner, {EPOCHS} epochs, {OPMODEL_PACE} s each, heartbeat every "
        f"{OPMODEL_HEARTBEAT_S} s so that beats are measured) against a study already holding "
        "0 / 2,000 / 10,000 finished trials. Every call to the storage object is counted "
        "and timed (its methods wrapped by the benchmark; outermost calls only), by phase: "
        "next_plan (stale sweep when due, budget, ask, owner attributes, params, surplus "
        "check), epoch (report + prune check), heartbeat, tell. Heartbeat calls per trial "
        "are at the op model's rate; at the real rate they are trial seconds / "
        f"{HEARTBEAT_S:g}. {load}")


def write_results(table: list[list[str]], projected: list[list[str]], seconds: float,
                  load: str) -> None:
    append_results(
        "3b. Study storage under contention at scale (issue 21)", table,
        f"Each of N forked processes runs trials back to back for {seconds:g} s with the "
        f"same rank-0 worker code ({EPOCHS} reports, no training between them: the storage "
        "saturated, the worst case). calls/s: storage calls of all processes per second; "
        "p50/p99 per call; lost: a trial told but stored in another state; duplicated: one "
        "trial number told twice; open: a process's seconds to open the study (all "
        "processes open it at once, on these 2 cores; the clock of the run starts when every "
        "one has). PostgreSQL: a local server from Debian's package, "
        "max_connections=700. gRPC: `hpcdl storage serve` with an SQLite file behind; a "
        "'before' row serves it with that revision's hpcdl in the same run; a journal "
        "'before' row runs that revision's hpcdl in the worker processes (the journal's lock "
        "is theirs), right after this tree's row. errors include 'killed': a process still "
        f"inside a storage call {STRAGGLER_S:g} s after the run's end (paced rows: after the "
        "end of the trial it began last). Paced rows: epochs of the given mean, each jittered "
        "by +-50 %, and each process starts within one epoch of the others, so that they do "
        f"not report in lockstep. Runs whose processes would not fit in memory are left out. "
        f"{load}")
    append_results(
        "3c. Study storage: workers carried with storage time < 1 % of a trial (issue 21)",
        projected,
        f"Extrapolation. A trial of T s has {EPOCHS} epochs and T/{HEARTBEAT_S:g} "
        "heartbeats; calls/trial and ms/trial alone come from the op model (3a, median ms per "
        "call at this study size, one process). Capacity: the most storage calls/s the "
        "storage sustained in 3b at this study size (on 2 shared cores, where the journal's "
        "readers and the clients compete with the storage for the same CPU: pessimistic for a "
        "cluster, where each worker reads on its own node). Workers = 0.5 x capacity x T / "
        "calls per trial: the storage kept half busy, where queueing at most doubles a "
        "call's time; valid when twice the alone time is < 1 % of T, else 0.")


if __name__ == "__main__":
    main()
