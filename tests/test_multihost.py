"""Real multi-process runs on the CPU: 2 processes x 4 simulated devices, joined by
`jax.distributed` on 127.0.0.1, against the reference of 1 process x 8 devices.

Each run is `tests/multihost/worker.py` (the tiny preset through `ddjax.app.run`) in processes
of its own, with a timeout; the processes stop by themselves. The 2-process runs must write the
same pair shards (sha256), train with the same losses and checkpoint values (data parallel and
FSDP), gather every evaluation sample with process 0 alone writing the report, and stop within
the heartbeat timeout when a peer is killed, the rerun resuming from the last checkpoint on
another process count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT

from ddjax.student.loading import load_training_run

WORKER = os.path.join(ROOT, "tests", "multihost", "worker.py")
DEVICES = 8  # 1 x 8 or 2 x 4
TIMEOUT_S = 480  # per launch; a run that hangs fails instead of blocking the suite
HEARTBEAT_S = 5  # the lost-peer test's heartbeat timeout
LOST_PEER_SLACK_S = 15  # the survivor must stop within HEARTBEAT_S + this after the kill
STEPS = ["train.num_steps=8", "train.checkpoint_every=4", "train.log_every=4"]
EVAL = ["eval.num_samples=32", "eval.batch_size=16"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Launch:
    """What a multi-process launch left: per process its exit code, log, JSON output (None if
    it wrote none) and the time it ended."""

    workdir: str
    returncodes: list[int]
    logs: list[str]
    outputs: list[dict | None]
    ended: list[float]

    def out(self, process: int = 0) -> dict:
        assert self.outputs[process] is not None, self.logs[process][-4000:]
        return self.outputs[process]


def launch(workdir: str, sets: list[str], num_processes: int, *, kill_at: int = -1,
           dump: bool = False, heartbeat_s: int = 10, family: str = "llamagen") -> Launch:
    """Runs the worker as `num_processes` processes of DEVICES // num_processes CPU devices.

    kill_at: process 1 kills itself once training checkpoint `kill_at` is written.
    dump: process 0 writes the latest checkpoint's values to WORKDIR/checkpoint.npz.
    """
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // num_processes}")
    port = free_port()
    procs, logs = [], []
    for p in range(num_processes):
        args = [sys.executable, WORKER, f"--process_id={p}", f"--num_processes={num_processes}",
                f"--port={port}", f"--workdir={workdir}", f"--out={workdir}/process{p}.json",
                f"--heartbeat_timeout_s={heartbeat_s}", f"--family={family}",
                *[f"--set={s}" for s in sets]]
        if dump:
            args.append(f"--dump_checkpoint={workdir}/checkpoint.npz")
        if kill_at >= 0 and p == 1:
            args.append(f"--kill_at_checkpoint={kill_at}")
        log = open(os.path.join(workdir, f"process{p}.log"), "w")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline, ended = time.time() + TIMEOUT_S, [0.0] * num_processes
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        for i, p in enumerate(procs):
            if p.poll() is not None and not ended[i]:
                ended[i] = time.time()
        time.sleep(0.1)
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for i in hung:  # each hung worker prints every thread's stack (faulthandler) into its log
        procs[i].send_signal(signal.SIGUSR1)
    time.sleep(3 if hung else 0)
    for i in hung:
        procs[i].kill()
        procs[i].wait()
    for i in range(num_processes):
        ended[i] = ended[i] or time.time()
        logs[i].close()
    texts = [open(os.path.join(workdir, f"process{p}.log")).read() for p in range(num_processes)]
    assert not hung, f"processes {hung} still ran after {TIMEOUT_S} s:\n" + "\n".join(
        f"--- process {i} ---\n{texts[i][-6000:]}" for i in hung)
    outputs = []
    for p in range(num_processes):
        path = os.path.join(workdir, f"process{p}.json")
        outputs.append(json.load(open(path)) if os.path.exists(path) else None)
    return Launch(workdir, [p.returncode for p in procs], texts, outputs, ended)


def losses(run: Launch, process: int = 0, stage: str = "train") -> dict[int, float]:
    return {int(k): v for k, v in run.out(process)["stages"][stage]["losses"].items()}


def assert_same_checkpoint(a: str, b: str) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files) and int(x["step"]) == int(y["step"])
        for k in x.files:
            np.testing.assert_allclose(x[k], y[k], rtol=0, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mode=all (pairs, data-parallel training, evaluation) on 1 x 8 and on 2 x 4 devices."""
    root = str(tmp_path_factory.mktemp("multihost"))
    sets = ["mode=all", *STEPS, *EVAL]
    one = launch(os.path.join(root, "one"), sets, 1, dump=True)
    assert one.returncodes == [0], one.logs[0][-4000:]
    two = launch(os.path.join(root, "two"), sets, 2, dump=True)
    assert two.returncodes == [0, 0], two.logs[0][-3000:] + two.logs[1][-3000:]
    return root, one, two


def sidecars(pairs_dir: str) -> dict[str, str]:
    names = sorted(n for n in os.listdir(pairs_dir) if re.fullmatch(r"pairs-\d+\.json", n))
    return {n: json.load(open(os.path.join(pairs_dir, n)))["sha256"] for n in names}


def assert_same_shards(one: Launch, two: Launch) -> None:
    """The 4 shards of 1 process and of 2 are equal (sha256); process p wrote shards p (mod 2)."""
    ref, got = sidecars(os.path.join(one.workdir, "pairs")), sidecars(os.path.join(two.workdir, "pairs"))
    assert len(ref) == 4 and got == ref
    for p in (0, 1):
        assert two.out(p)["stages"]["generate"] == [s for s in range(4) if s % 2 == p]


def assert_same_losses(one: Launch, two: Launch) -> None:
    """Both processes of `two` logged the 8 losses of `one`, within 1e-5."""
    ref = losses(one)
    assert sorted(ref) == list(range(1, 9))
    for p in (0, 1):
        got = losses(two, p)
        assert sorted(got) == sorted(ref)
        np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=0, atol=1e-5)


def test_pairs_from_2_processes_equal_1_process_shard_by_shard(runs):
    _, one, two = runs
    assert_same_shards(one, two)


def test_data_parallel_training_on_2_processes_equals_1_process(runs):
    _, one, two = runs
    assert_same_losses(one, two)
    assert_same_checkpoint(os.path.join(one.workdir, "checkpoint.npz"),
                           os.path.join(two.workdir, "checkpoint.npz"))
    # A checkpoint of 2 processes x 4 devices loads for sampling here, on 1 process x 1 device.
    _, ema, meta = load_training_run(two.workdir)
    with np.load(os.path.join(one.workdir, "checkpoint.npz")) as ref_ckpt:
        assert meta["step"] == 8
        w = ema["layers_0"]["feed_forward"]["w1"]["kernel"]
        np.testing.assert_allclose(np.asarray(w), ref_ckpt["ema/layers_0/feed_forward/w1/kernel"],
                                   rtol=0, atol=1e-5)


def test_evaluation_gathers_every_process_and_only_process_0_writes(runs):
    _, one, two = runs
    ref = one.out()["result"]["results"]
    for p in (0, 1):
        got = two.out(p)["result"]["results"]
        assert list(got) == list(ref)
        for name, r in ref.items():
            assert got[name]["num_samples"] == r["num_samples"] == 32, name
            # Token agreement is exact; a sample lost or counted twice would move every FID.
            assert got[name]["token_agreement"] == r["token_agreement"], name
            for key in ("fid", "fid_vs_teacher", "precision", "recall"):
                if r[key] is not None:
                    np.testing.assert_allclose(got[name][key], r[key], rtol=1e-4, atol=1e-4,
                                               err_msg=f"{name} {key}")
    assert two.out(1)["stages"]["written_files"] == []
    written = two.out(0)["stages"]["written_files"]
    assert "report.md" in written and len(written) == len(ref) + 1
    assert sorted(os.listdir(os.path.join(two.workdir, "report"))) == sorted(
        os.listdir(os.path.join(one.workdir, "report")))


def test_fsdp_training_on_2_processes_equals_1_process(runs):
    root, one, _ = runs
    run = launch(os.path.join(root, "fsdp"),
                 ["mode=train", f"data.dir={one.workdir}/pairs", *STEPS, "train.sharding=fsdp",
                  "mesh.data=2", "mesh.fsdp=4"], 2, dump=True)
    assert run.returncodes == [0, 0], run.logs[0][-3000:]
    ref, got = losses(one), losses(run)
    # The reference is 1 x 8 data parallel: FSDP changes where the weights live, not the math.
    np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=0, atol=1e-5)
    assert_same_checkpoint(os.path.join(one.workdir, "checkpoint.npz"),
                           os.path.join(run.workdir, "checkpoint.npz"))


def test_var_pairs_and_training_on_2_processes_equal_1_process(tmp_path):
    """The VAR family through the same stages: shard-by-shard equal pairs (sha256), equal
    losses and checkpoint values on 2 x 4 devices and on 1 x 8."""
    sets = ["mode=generate", "data.num_pairs=64", "data.shard_size=16", "data.batch_size=8"]
    train = ["mode=train", *STEPS]
    one = launch(str(tmp_path / "one"), sets, 1, family="var")
    assert one.returncodes == [0], one.logs[0][-4000:]
    one_t = launch(str(tmp_path / "one"), [*train, f"data.dir={one.workdir}/pairs"], 1, dump=True,
                   family="var")
    assert one_t.returncodes == [0], one_t.logs[0][-4000:]
    two = launch(str(tmp_path / "two"), sets, 2, family="var")
    assert two.returncodes == [0, 0], two.logs[0][-3000:] + two.logs[1][-3000:]
    assert_same_shards(one, two)
    # 2 processes train on the 1-process pairs (equal, as just checked).
    two_t = launch(str(tmp_path / "two"), [*train, f"data.dir={one.workdir}/pairs"], 2, dump=True,
                   family="var")
    assert two_t.returncodes == [0, 0], two_t.logs[0][-3000:] + two_t.logs[1][-3000:]
    assert_same_losses(one_t, two_t)
    assert_same_checkpoint(os.path.join(one.workdir, "checkpoint.npz"),
                           os.path.join(two.workdir, "checkpoint.npz"))


def test_a_lost_peer_stops_the_other_and_a_rerun_on_1_process_resumes(runs):
    root, one, _ = runs
    workdir = os.path.join(root, "killed")
    sets = ["mode=train", f"data.dir={one.workdir}/pairs", *STEPS]
    run = launch(workdir, sets, 2, kill_at=4, heartbeat_s=HEARTBEAT_S)
    assert run.returncodes[1] == -9, run.logs[1][-3000:]
    assert run.returncodes[0] != 0 and run.outputs[0] is None, run.logs[0][-3000:]
    # JAX's coordination service names the lost task: "... (stopped sending heartbeats):\n1".
    assert re.search(r"stopped sending heartbeats\):\s*1\b", run.logs[0]), run.logs[0][-3000:]
    killed_at = float(re.search(r"killing myself at ([\d.]+)", run.logs[1]).group(1))
    stopped_after = run.ended[0] - killed_at
    print(f"lost peer: process 0 stopped {stopped_after:.1f} s after process 1 was killed "
          f"(heartbeat timeout {HEARTBEAT_S} s)")
    assert stopped_after <= HEARTBEAT_S + LOST_PEER_SLACK_S
    ckpts = sorted(int(n) for n in os.listdir(os.path.join(workdir, "student", "checkpoints"))
                   if n.isdigit())
    assert ckpts and 4 <= ckpts[-1] < 8, ckpts

    rerun = launch(workdir, sets, 1, dump=True)
    assert rerun.returncodes == [0], rerun.logs[0][-4000:]
    train = rerun.out()["stages"]["train"]
    assert train["start_step"] == ckpts[-1] and train["step"] == 8
    ref, got = losses(one), losses(rerun)
    assert sorted(got) == list(range(ckpts[-1] + 1, 9))
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=0, atol=1e-5)
    assert_same_checkpoint(os.path.join(one.workdir, "checkpoint.npz"),
                           os.path.join(workdir, "checkpoint.npz"))


def test_main_joins_2_processes_with_explicit_flags(tmp_path):
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "ddjax.main", "--config=configs/llamagen.py:tiny",
         "--config.mode=info", f"--workdir={tmp_path}/p{p}", "--distributed",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={p}",
         "--heartbeat_timeout_seconds=10", "--shutdown_timeout_seconds=30"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in (0, 1)]
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    for p, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, out[-3000:]
        assert f"process {p}/2" in out, out[-3000:]


def test_dd2_on_2_processes_equals_1_process(tmp_path):
    """DD2's stages (teacher samples, adapt, tune, CSD) on 2 x 4 devices: the same samples,
    CSD losses and saved generator as on 1 x 8."""
    from helpers import read_scalars

    from ddjax.dd2.train import load_generator

    sets = ["mode=train_dd2", "method=dd2"]
    one = launch(str(tmp_path / "one"), sets, 1)
    assert one.returncodes == [0], one.logs[0][-4000:]
    two = launch(str(tmp_path / "two"), sets, 2)
    assert two.returncodes == [0, 0], two.logs[0][-3000:] + two.logs[1][-3000:]
    with np.load(f"{one.workdir}/dd2/samples.npz") as a, np.load(f"{two.workdir}/dd2/samples.npz") as b:
        np.testing.assert_array_equal(a["ids"], b["ids"])
    ref, got = (dict(read_scalars(f"{r.workdir}/dd2/csd/logs")["csd"]) for r in (one, two))
    assert sorted(got) == sorted(ref) and ref
    np.testing.assert_allclose([got[k] for k in sorted(ref)], [ref[k] for k in sorted(ref)], rtol=0,
                               atol=1e-5)
    (cfg_a, a), (cfg_b, b) = load_generator(one.workdir), load_generator(two.workdir)
    assert cfg_a == cfg_b
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)


def test_back_to_back_steps_with_settle_finish_on_2_processes(tmp_path):
    """The loop of benchmarks/multiprocess_cpu_dispatch.py (one all-reduce per jitted step, 150
    steps) with `sharding.settle` after each step ends on both processes with one value. The same
    loop dispatched asynchronously hangs in most runs (that benchmark counts them), which is why
    the training loops settle each step on multi-process CPU runs."""
    script = os.path.join(ROOT, "benchmarks", "multiprocess_cpu_dispatch.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, script, "--worker", str(p), "--port", str(port),
                               "--steps", "150", "--mode", "settle"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in range(2)]
    try:
        texts = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], texts[0][-2000:] + texts[1][-2000:]
    done = [re.findall(r"^done (\S+)$", t, re.M) for t in texts]
    assert done[0] and done[0] == done[1], done
