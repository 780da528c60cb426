"""The Ray engine's hard edges, through the CLI where a user meets them: a ``RAY_ADDRESS`` that
isn't a reachable Ray cluster fails in seconds with exit status 2 before any model loads;
``ray_workers`` above what a real 1-CPU cluster can place runs on what it can place, saying so;
a local Ray leaves no folder and no process behind, even when its driver is killed with -9; a
worker killed mid-run has its shard computed again on the other worker, the run's results the
local engine's.

Only loopback addresses. The 1-CPU cluster is started with ``ray start`` in a temporary folder
and stopped by its processes' marker (never ``ray stop``, which would stop every Ray of the user
on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.helpers.cli import REPO_ROOT, run_cli
from tests.helpers.corpus import CONTEXT, SETTINGS, TEXT, load_tiny
from unraveled.corpus import corpus_windows
from unraveled.engines.local import run_local
from unraveled.engines.ray_cluster import CONNECT_BUDGET_S, _remove_abandoned
from unraveled.engines.ray_watchdog import SESSION_MARKER, session_processes, sweep

DEAD_ADDRESS_BUDGET_S = 10  # the bound for a dead RAY_ADDRESS, Python's start-up included
RAY_IMPORT_SLACK_S = 30  # a child process importing Ray on a busy machine
CLEANUP_BUDGET_S = 20  # after kill -9 of the driver (Ray's agents alone linger ~60 s)
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}  # token authentication would write ~/.ray/auth_token


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _atlas_args(model: Path, corpus: Path, out: Path, *settings: str) -> list[str]:
    small = [
        "params.engine=ray",
        f"params.corpus=[{corpus}]",
        "params.context_tokens=16",
        "params.max_tokens=96",
        "params.top_k=4",
        "params.browser_samples=2",
        *settings,
    ]
    return [
        "run",
        "corpus_atlas",
        "--model",
        str(model),
        "--out",
        str(out),
        *(arg for setting in small for arg in ("--set", setting)),
    ]


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted-weights cache for the CLI runs that load the model: converted once."""
    return tmp_path_factory.mktemp("ray_weights")


@pytest.fixture(scope="module")
def ray_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray_corpus") / "caesar.txt"
    path.write_text(TEXT * 2, encoding="utf-8")
    return path


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder with a short path: Ray's Unix socket paths below it stay < 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="u-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _assert_refused_before_the_model_loaded(
    done: subprocess.CompletedProcess[str], out: Path, cache: Path, *said: str
) -> None:
    """Exit status 2 with ``said`` and no traceback; nothing written, and the model never loaded
    (loading converts it into the weights cache)."""
    assert done.returncode == 2, done.stderr
    for message in said:
        assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize(
    ("address", "said"),
    [
        (
            "127.0.0.1:1",
            "connecting to 127.0.0.1:1 failed: Connection refused "
            "(tried a TCP connection to 127.0.0.1:1)",
        ),
        ("not an address", "is not an address (tried reading it as an address)"),
        ("http://127.0.0.1:8265", "is a http:// URL (a Ray Jobs or dashboard address?)"),
    ],
)
def test_a_dead_or_malformed_ray_address_exits_2_in_seconds_before_the_model_loads(
    address: str, said: str, tiny_gpt2_dir: Path, ray_corpus: Path, tmp_path: Path
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    started = time.perf_counter()
    done = run_cli(
        _atlas_args(tiny_gpt2_dir, ray_corpus, out),
        {"RAY_ADDRESS": address, "UNRAVELED_CACHE": str(cache), **NO_AUTH},
    )
    seconds = time.perf_counter() - started

    _assert_refused_before_the_model_loaded(
        done, out, cache, f"error: RAY_ADDRESS: {address!r}: {said}"
    )
    assert "params.engine=ray (" in done.stderr and "from --set" in done.stderr
    assert seconds < DEAD_ADDRESS_BUDGET_S, f"{address}: {seconds:.1f} s to the error"
    print(f"time to the error for RAY_ADDRESS={address}: {seconds:.2f} s")


def test_a_port_that_answers_but_is_no_ray_cluster_exits_2_within_the_connect_budget(
    tiny_gpt2_dir: Path, ray_corpus: Path, tmp_path: Path
) -> None:
    # Accepts connections (the kernel completes them) and never says a word, as a wrong service
    # would.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        out, cache = tmp_path / "out", tmp_path / "cache"
        started = time.perf_counter()
        done = run_cli(
            _atlas_args(tiny_gpt2_dir, ray_corpus, out),
            {"RAY_ADDRESS": address, "UNRAVELED_CACHE": str(cache), **NO_AUTH},
        )
        seconds = time.perf_counter() - started

    _assert_refused_before_the_model_loaded(
        done,
        out,
        cache,
        f"error: RAY_ADDRESS: {address!r}: no Ray cluster answered within {CONNECT_BUDGET_S:.0f} s",
        f"tried ray.init(address={address!r}) in a child process",
    )
    assert CONNECT_BUDGET_S <= seconds < CONNECT_BUDGET_S + RAY_IMPORT_SLACK_S, f"{seconds:.1f} s"
    print(f"time to the error for a silent port: {seconds:.2f} s")


@pytest.mark.parametrize(
    ("prints", "answer"),
    [
        (
            'print("starting"); print("imported"); print("{not json")',
            "answered something unreadable: '{not json'",
        ),
        ('print("imported"); print("[1, 2]")', "ended without an answer"),
        ('print("imported"); print("{\\"total\\": 3}")', "answered something unreadable"),
        (  # Ray's own lines around it: the last line that is a JSON object is the answer
            'print("imported"); print("{ray log line"); '
            'print(json.dumps({"total": {"CPU": 2}, "free": {"CPU": 1}})); print("bye")',
            {"total": {"CPU": 2}, "free": {"CPU": 1}},
        ),
    ],
)
def test_the_probe_s_answer_is_its_last_json_line_and_garbage_is_an_error_not_a_traceback(
    prints: str, answer: str | dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    from unraveled.engines import ray_cluster

    script = f"import json, os\n{prints.replace('; ', chr(10))}\nos._exit(0)\n"
    monkeypatch.setattr(ray_cluster, "_PROBE", script)
    answered = ray_cluster.probe_cluster("127.0.0.1:9")
    if isinstance(answer, dict):
        assert answered == answer
    else:
        assert answer in answered["error"], answered


def _running_gcs() -> list[str]:
    """Command lines of Ray GCS processes on this machine (any user's), which ``RAY_ADDRESS=auto``
    finds."""
    found = []
    for process in psutil.process_iter():
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if command and (
            command[0].endswith("gcs_server")
            or any(part.startswith("--gcs-address") for part in command)
        ):
            found.append(" ".join(command)[:80])
    return found


def test_ray_address_auto_with_no_cluster_exits_2_before_the_model_loads(
    tiny_gpt2_dir: Path, ray_corpus: Path, tmp_path: Path
) -> None:
    # Ray looks for TMPDIR/ray/ray_current_cluster (isolated here) and for running GCS processes
    # (not isolable: those of anyone on this machine).
    if running := _running_gcs():
        pytest.skip(f"a Ray runs on this machine, which RAY_ADDRESS=auto would find: {running[0]}")
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {
        "RAY_ADDRESS": "auto",
        "RAY_TMPDIR": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "UNRAVELED_CACHE": str(cache),
        **NO_AUTH,
    }
    done = run_cli(_atlas_args(tiny_gpt2_dir, ray_corpus, out), env)

    _assert_refused_before_the_model_loaded(
        done,
        out,
        cache,
        "error: RAY_ADDRESS: 'auto': ConnectionError: Could not find any running Ray instance",
        "tried ray.init(address='auto') in a child process",
    )


def _start(command: list[str], **options: object) -> psutil.Process:
    process = psutil.Process(subprocess.Popen(command, stdin=subprocess.DEVNULL, **options).pid)  # type: ignore[call-overload]
    return process


def _wait_until(condition: object, budget_s: float = 10) -> None:
    started = time.perf_counter()
    while not condition() and time.perf_counter() - started < budget_s:  # type: ignore[operator]
        time.sleep(0.05)


def _titled(process: psutil.Process, title: str) -> bool:
    """Whether ``process`` runs under ``title`` yet (its command line is empty for a moment after
    it starts)."""
    return process.cmdline()[:1] == [title]


def _alive(process: psutil.Process) -> bool:
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


def test_a_sweep_stops_the_session_s_ray_processes_and_nothing_else_of_the_user_s(
    short_tmp: Path,
) -> None:
    folder = short_tmp / "unraveled-ray-1-session"
    (folder / "logs").mkdir(parents=True)
    log = folder / "logs" / "raylet.out"
    log.write_text("raylet\n")
    marked = {
        **os.environ,
        SESSION_MARKER: str(folder),
    }  # as a process another thread started during ray.init
    shell = _start(["sleep", "60"], cwd=folder, env=marked)  # a user's shell cd'd into the folder
    reader = _start(["tail", "-f", str(log)], env=marked)  # a user reading Ray's log
    worker = _start(
        ["bash", "-c", "exec -a ray::FakeWorker sleep 60"], env=marked
    )  # a Ray worker of the session
    try:
        _wait_until(
            lambda: (
                any(opened.path == str(log) for opened in reader.open_files())
                and _titled(worker, "ray::FakeWorker")
            )
        )
        stopped = sweep(str(folder), [shell, reader])  # also as the driver's descendants

        assert stopped == 1 and not _alive(worker)
        assert _alive(shell) and _alive(reader)
        assert not folder.exists()
    finally:
        for process in (shell, reader, worker):
            if process.is_running():
                process.kill()
                process.wait()


def test_an_abandoned_ray_folder_is_swept_only_if_a_real_folder_of_the_user_s_with_a_dead_driver(
    short_tmp: Path,
) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("the user's\n")
    link = short_tmp / f"unraveled-ray-{dead}"
    link.symlink_to(elsewhere)  # anyone can put such a link in the shared temporary folder
    ours = short_tmp / f"unraveled-ray-{os.getpid()}-running"  # this process's own: it lives
    ours.mkdir()
    abandoned = short_tmp / f"unraveled-ray-{dead}-abandoned"
    abandoned.mkdir()
    # Ray-looking processes "of" the linked folder: in it, holding a file open there, marked with
    # it.
    inside = _start(
        ["bash", "-c", "exec -a ray::Victim sleep 60"],
        cwd=elsewhere,
        env={**os.environ, SESSION_MARKER: str(link)},
    )
    try:
        _wait_until(lambda: _titled(inside, "ray::Victim"))
        _remove_abandoned(str(short_tmp))

        assert _alive(inside)
        assert link.is_symlink() and (elsewhere / "keep.txt").read_text() == "the user's\n"
        assert ours.is_dir() and not abandoned.exists()
    finally:
        inside.kill()
        inside.wait()


@pytest.fixture(scope="module")
def one_cpu_cluster() -> Iterator[str]:
    """``ray start --head --num-cpus=1`` on loopback ports, its files in a temporary folder; its
    processes carry the session marker, by which they are all stopped afterwards."""
    folder = tempfile.mkdtemp(prefix="u-rc-", dir="/tmp")
    port = _free_port()
    env = {**os.environ, **NO_AUTH, SESSION_MARKER: folder}
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--num-cpus=1",
        f"--port={port}",
        f"--temp-dir={folder}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    try:
        subprocess.run(command, env=env, cwd=folder, check=True, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        sweep(folder)
        assert session_processes(folder) == []


def test_ray_workers_above_what_the_cluster_can_place_run_on_what_it_can(
    one_cpu_cluster: str, tiny_gpt2_dir: Path, ray_corpus: Path, tmp_path: Path, weights_cache: Path
) -> None:
    env = {"UNRAVELED_CACHE": str(weights_cache), **NO_AUTH}
    on_ray = run_cli(
        _atlas_args(tiny_gpt2_dir, ray_corpus, tmp_path / "ray", "params.ray_workers=2"),
        {"RAY_ADDRESS": one_cpu_cluster, **env},
        timeout=300,
    )
    assert on_ray.returncode == 0, on_ray.stderr
    said = " ".join(on_ray.stderr.split())  # the log handler wraps long lines
    assert (
        f"params.ray_workers=2 but the cluster at {one_cpu_cluster} has 1 free CPU(s) of 1 now"
        in said
    )  # before the model loaded
    assert (
        "params.ray_workers=2, but the cluster at" in said
        and "can place 1 worker(s) now (1 CPU each): running 1" in said
    )
    assert "corpus atlas (ray, 1 workers)" in on_ray.stderr

    # The result equals the local engine's: test_corpus_ray.py::
    # test_ray_engine_equals_local_engine_also_when_a_worker_is_killed.
    assert (
        json.loads((tmp_path / "ray" / "tiny-gpt2" / "corpus_atlas" / "metrics.json").read_text())[
            "corpus"
        ]["engine"]
        == "ray"
    )


def test_a_local_ray_keeps_its_files_in_the_run_s_own_temporary_folder_and_removes_them(
    tiny_gpt2_dir: Path,
    weights_cache: Path,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    corpus_file: Path,
) -> None:
    import ray

    from unraveled.engines.ray import run_ray

    assert not ray.is_initialized()
    monkeypatch.setattr(
        tempfile, "tempdir", str(short_tmp)
    )  # the system temporary folder, for this test
    for name, value in NO_AUTH.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("UNRAVELED_CACHE", str(weights_cache))
    model = load_tiny(tiny_gpt2_dir, weights_cache)
    windows = corpus_windows(model.tokenizer, [str(corpus_file)], CONTEXT, None, seed=0).tokens
    seen: list[str] = []
    started: list[psutil.Process] = []
    commands: list[str] = []  # read while they run
    real_init = ray.init

    def watching_init(*args: object, **kwargs: object) -> object:
        seen.append(str(kwargs["_temp_dir"]))
        before = {process.pid for process in psutil.Process().children(recursive=True)}
        try:
            return real_init(*args, **kwargs)
        finally:
            # The raylet starts its agents a moment after ray.init returns.
            deadline = time.perf_counter() + 60
            while not started or (
                "ray::DashboardAgent" not in commands and time.perf_counter() < deadline
            ):
                started[:] = [
                    process
                    for process in psutil.Process().children(recursive=True)
                    if process.pid not in before
                ]
                commands[:] = [_command(process) for process in started]
                time.sleep(0.2)

    monkeypatch.setattr(ray, "init", watching_init)
    state = run_ray(model, windows, SETTINGS, workers=1, progress=False)

    assert (
        state.n_windows
        == len(windows)
        == run_local(model, windows, SETTINGS, progress=False).n_windows
    )
    assert (
        len(seen) == 1
        and Path(seen[0]).parent == short_tmp
        and Path(seen[0]).name.startswith(f"unraveled-ray-{os.getpid()}-")
    )
    assert not ray.is_initialized()
    assert list(short_tmp.iterdir()) == []  # no session_* folder, no ray/ folder left
    assert (
        any("raylet" in command for command in commands) and "ray::DashboardAgent" in commands
    )  # the processes that used to linger were watched
    assert [_command(process) for process in started if process.is_running()] == []


def _same_numbers(ours: object, theirs: object, where: str = "metrics") -> None:
    """Equal, floats up to the rounding of the merge order (shards are merged as they finish)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            _same_numbers(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for index, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
            _same_numbers(mine, other, f"{where}[{index}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-7), where
    else:
        assert ours == theirs, where


def test_a_killed_worker_s_shard_is_computed_again_on_the_other_worker_through_the_cli(
    tiny_gpt2_dir: Path, ray_corpus: Path, tmp_path: Path, short_tmp: Path, weights_cache: Path
) -> None:
    """A worker process killed with SIGKILL mid-run (by the engine's fault-injection seam, as the
    out-of-memory killer would): the run exits 0, says what happened, and its results are the
    local engine's on the same windows."""
    from unraveled.engines.ray import KILL_WORKER_ENV

    killed = tmp_path / "killed"
    env = {
        **NO_AUTH,
        "RAY_ADDRESS": "",  # a Ray of this run's own
        "TMPDIR": str(short_tmp),  # Ray's Unix socket paths below it must stay short
        "UNRAVELED_CACHE": str(weights_cache),
    }
    # 6 windows in batches of 2: 3 shards on 2 workers, so one worker is given a second shard.
    workers = ["params.ray_workers=2", "params.batch_windows=2"]
    on_ray = run_cli(
        _atlas_args(tiny_gpt2_dir, ray_corpus, tmp_path / "ray", *workers),
        {**env, KILL_WORKER_ENV: str(killed)},
        timeout=600,
    )
    assert on_ray.returncode == 0, on_ray.stderr
    assert killed.exists()  # a worker really was killed
    said = " ".join(on_ray.stderr.split())  # the log handler wraps long lines
    assert "ray: worker" in said and "died while computing windows" in said
    assert "(ActorDiedError" in said and "1 of 2 workers left" in said
    assert "ray: 1 of 2 workers died; 1 shard(s) were computed again" in said
    assert "Traceback" not in on_ray.stderr

    local = run_cli(
        _atlas_args(tiny_gpt2_dir, ray_corpus, tmp_path / "local", *workers, "params.engine=local"),
        env,
    )
    assert local.returncode == 0, local.stderr
    runs = [tmp_path / engine / "tiny-gpt2" / "corpus_atlas" for engine in ("ray", "local")]
    distributed, alone = (json.loads((run / "metrics.json").read_text()) for run in runs)
    for metrics in (distributed, alone):
        metrics.pop("tokens_per_second")
        metrics["corpus"].pop("engine")
    _same_numbers(alone, distributed)
    with np.load(runs[0] / "neurons.npz") as theirs, np.load(runs[1] / "neurons.npz") as ours:
        assert sorted(theirs.files) == sorted(ours.files)
        for name in ours.files:
            np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_kill_9_of_the_driver_leaves_no_ray_process_or_folder_for_long(
    tiny_gpt2_dir: Path, ray_corpus: Path, tmp_path: Path, short_tmp: Path, weights_cache: Path
) -> None:
    env = {
        **os.environ,
        **NO_AUTH,
        "TMPDIR": str(short_tmp),
        "UNRAVELED_CACHE": str(weights_cache),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("RAY_ADDRESS", None)
    args = _atlas_args(
        tiny_gpt2_dir,
        ray_corpus,
        tmp_path / "out",
        "params.ray_workers=1",
        "params.max_tokens=null",
    )
    with subprocess.Popen(
        [sys.executable, "-m", "unraveled", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as driver:
        try:
            folder, ray_processes = _wait_for_local_ray(short_tmp, driver)
        finally:
            driver.kill()  # SIGKILL: nothing of the driver's own cleanup runs
        driver.wait()
        killed = time.perf_counter()

    def left() -> list[str]:
        return [
            _command(process)
            for process in ray_processes
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        ]

    while (left() or folder.exists()) and time.perf_counter() - killed < CLEANUP_BUDGET_S:
        time.sleep(0.5)
    still = left()
    sweep(str(folder), ray_processes)  # whatever the test found, nothing outlives it
    assert still == [] and not folder.exists(), (
        f"after {CLEANUP_BUDGET_S} s: {still}, folder exists: {folder.exists()}"
    )
    print(f"Ray gone {time.perf_counter() - killed:.1f} s after kill -9 of the driver")


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()).strip()[:80]
    except psutil.Error:
        return "(gone)"


def _wait_for_local_ray(
    root: Path, driver: subprocess.Popen[bytes], budget_s: float = 240
) -> tuple[Path, list[psutil.Process]]:
    """The driver's Ray folder and processes once its raylet's agents (the ones that used to
    linger) run."""
    started = time.perf_counter()
    while time.perf_counter() - started < budget_s:
        assert driver.poll() is None, "the run ended before its Ray was up"
        processes = psutil.Process(driver.pid).children(recursive=True)
        commands = " ".join(_command(process) for process in processes)
        folders = list(root.glob("unraveled-ray-*"))
        if (
            folders
            and "raylet" in commands
            and "ray::DashboardAgent" in commands
            and "ray::RuntimeEnvAgent" in commands
        ):
            return folders[0], processes
        time.sleep(0.5)
    raise AssertionError(f"no local Ray with its agents within {budget_s} s")


def _sae_args(model: Path, corpus: Path, out: Path, *settings: str) -> list[str]:
    small = [
        "params.engine=ray",
        f"params.corpus=[{corpus}]",
        "params.context_tokens=16",
        "params.eval_tokens=32",
        "params.width=32",
        "params.k=4",
        "params.training_tokens=512",
        "params.batch_tokens=64",
        "params.buffer_tokens=128",
        "params.planted_check=false",
        "params.attribution=false",
        *settings,
    ]
    return [
        "run",
        "sae_features",
        "--model",
        str(model),
        "--out",
        str(out),
        *(arg for setting in small for arg in ("--set", setting)),
    ]


def test_a_killed_worker_s_sae_activation_batches_are_computed_again_through_the_cli(
    tiny_gpt2_dir: Path, ray_corpus: Path, tmp_path: Path, short_tmp: Path, weights_cache: Path
) -> None:
    """SAE training activations on 2 Ray workers, one killed with SIGKILL mid-stream by the fault
    seam: the run exits 0, names the dead worker and the batches computed again, and trains the
    SAE a local run trains (bitwise: the same activations in the same order, the same seed)."""
    from unraveled.engines.ray import KILL_WORKER_ENV

    killed = tmp_path / "killed"
    env = {
        **NO_AUTH,
        "RAY_ADDRESS": "",
        "TMPDIR": str(short_tmp),
        "UNRAVELED_CACHE": str(weights_cache),
    }
    # Batches of 2 windows (32 tokens): each worker is given several, so one is given a second.
    workers = ["params.ray_workers=2", "params.batch_windows=2"]
    on_ray = run_cli(
        _sae_args(tiny_gpt2_dir, ray_corpus, tmp_path / "ray", *workers),
        {**env, KILL_WORKER_ENV: str(killed)},
        timeout=600,
    )
    assert on_ray.returncode == 0, on_ray.stderr
    assert killed.exists()  # a worker really was killed
    said = " ".join(on_ray.stderr.split())  # the log handler wraps long lines
    assert "ray: worker" in said and "died while computing windows" in said, said
    assert "(ActorDiedError" in said and "1 of 2 workers left" in said, said
    assert "computed again on worker(s)" in said and "in their place in the stream" in said, said
    assert "Traceback" not in on_ray.stderr

    local = run_cli(
        _sae_args(tiny_gpt2_dir, ray_corpus, tmp_path / "local", *workers, "params.engine=local"),
        env,
    )
    assert local.returncode == 0, local.stderr
    runs = [tmp_path / engine / "tiny-gpt2" / "sae_features" for engine in ("ray", "local")]
    distributed, alone = (json.loads((run / "metrics.json").read_text()) for run in runs)
    for metrics in (distributed, alone):
        for timing in ("seconds", "generated_tokens_per_second", "engine"):
            metrics["training"].pop(timing)
    assert distributed == alone
    from safetensors.numpy import load_file

    weights = [load_file(run / "sae" / "sae_weights.safetensors") for run in runs]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[1]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
