# SPDX-License-Identifier: Apache-2.0
"""Multi-process runs with real processes: ``torchrun -m diffrepro generate``, ranks started by
hand with the environment torchrun sets (so that one can be killed or stopped), gloo process
groups on ``file://`` stores, SLURM-style parts and two independent jobs on one folder. Every
process and wait is bounded in time; the references are one-process runs and float64 oracles."""
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_f32_accuracy, finish_processes, naive_float32_denoiser, output_tree

from diffrepro import data, distributed, generation, nn_search, nn_search_partial, reference
from diffrepro.cli import main
from diffrepro.denoisers import EmpiricalDenoiser

# One kernel thread in every process, so that each batch is computed the same way everywhere.
ENV = {**os.environ, "DIFFREPRO_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 5  # --dist-timeout in seconds (a starved but live process still beats within it)
ARGS = ["generate", "--max-train", "100", "--seeds", "0-35", "--batch", "2", "--steps", "6", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(world: int, outdir, *extra, port: int | None = None) -> list[subprocess.Popen]:
    """``world`` processes of ``python -m diffrepro generate`` with the variables torchrun sets: rank 0
    hosts the TCP store on the loopback interface, or, given ``port``, the caller's store there (as
    torchrun's agent hosts it, outliving every rank)."""
    agent = port is not None
    port = _free_port() if port is None else port
    procs = []
    for r in range(world):
        env = {**ENV, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": str(agent)}
        procs.append(subprocess.Popen([sys.executable, "-m", "diffrepro", *ARGS, "--outdir", str(outdir),
                                       "--dist-timeout", str(TIMEOUT), *extra], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _records(outdir) -> int:
    try:
        return sum(1 for f in os.listdir(os.path.join(outdir, "batches")) if f.endswith(".npz"))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The one-process run every multi-process run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "out"
    old = os.environ.get("DIFFREPRO_NUM_THREADS")
    os.environ["DIFFREPRO_NUM_THREADS"] = "1"
    try:
        assert main([*ARGS, "--outdir", str(out)]) == 0
    finally:
        os.environ.pop("DIFFREPRO_NUM_THREADS") if old is None else os.environ.update(DIFFREPRO_NUM_THREADS=old)
    return out


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("DIFFREPRO_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for spawned processes, as torchrun sets it


# ------------------------------------------------------------------------------------------------
# Seed-parallel generation: world-size invariance, resume with another world size, parts


def test_torchrun_two_processes_byte_identical(ref, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "diffrepro", *ARGS, "--outdir", str(out), "--dist-timeout", "30"],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("36 images in") == 1 and "on 2 processes" in proc.stdout  # rank 0 alone prints
    assert output_tree(out) == output_tree(ref)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["processes"]["world_size"] == 2


def test_parts_then_assembly_equal_one_process(ref, tmp_path, one_thread, capsys):
    out = tmp_path / "out"
    for part in ("1/2", "0/2"):
        assert main([*ARGS, "--outdir", str(out), "--part", part]) == 0
    assert "part 0/2 done" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    assert main([*ARGS, "--outdir", str(out)]) == 0  # checks every record and PNG, computes nothing
    assert "complete (0 generated, 36 reused)" in capsys.readouterr().out
    assert output_tree(out) == output_tree(ref)


@pytest.mark.parametrize("text", ["2/2", "1", "-1/2", "a/b"])
def test_bad_part_is_a_usage_error(text, tmp_path, capsys):
    assert main([*ARGS, "--outdir", str(tmp_path / "out"), f"--part={text}"]) == 2
    assert "--part: got" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Faults: a killed or stopped rank is named by the others within the timeout; a rerun completes


def _visible_outputs_are_whole(outdir) -> None:
    """Every non-hidden file is complete: PNGs decode, records load."""
    for root, _dirs, files in os.walk(outdir):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".png"):
                with PIL.Image.open(path) as img:
                    img.load()
            elif f.endswith(".npz"):
                with np.load(path) as z:
                    assert z["images"].shape[0] == len(z["seeds"])


@pytest.mark.parametrize("world, victim, sig", [(3, 2, signal.SIGKILL), (2, 1, signal.SIGSTOP)])
def test_lost_rank_is_named_then_any_world_size_finishes(ref, tmp_path, one_thread, world, victim, sig):
    """Part 0 of 3 in this process (a SLURM array task), then ``world`` ranks resume the run (another
    world size) until one is killed or stopped; the others name it within the timeout, and one
    process finishes the run byte-identical to an uninterrupted one."""
    out = tmp_path / "out"
    assert main([*ARGS, "--outdir", str(out), "--part", "0/3"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running" and not (out / "grid.png").exists() and _records(out) == 6
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))  # torchrun's agent hosts the store
    procs = _ranks(world, out, port=port)
    deadline = time.monotonic() + 120
    while _records(out) < 7 and time.monotonic() < deadline and procs[victim].poll() is None:
        time.sleep(0.01)
    procs[victim].send_signal(signal.SIGSTOP)  # freeze it first: it cannot finish the run meanwhile
    assert procs[victim].poll() is None, "the run ended before the fault could be injected"
    procs[victim].send_signal(sig)
    t = time.monotonic()
    survivors = finish_processes([p for r, p in enumerate(procs) if r != victim], timeout=TIMEOUT + 60)
    seconds = time.monotonic() - t
    procs[victim].kill()
    procs[victim].wait(timeout=30)
    del store
    for code, _, err in survivors:
        assert code == 1, err[-2000:]
        assert f"lost rank {victim} (killed or hung: no heartbeat for {TIMEOUT} s)" in err, err[-2000:]
        assert "rerun with any number of processes to resume" in err
    assert seconds < TIMEOUT + 30  # the timeout plus process exit on a loaded 2-core machine: no hang
    _visible_outputs_are_whole(out)
    assert main([*ARGS, "--outdir", str(out)]) == 0  # one process finishes what the ranks left
    assert output_tree(out) == output_tree(ref)
    assert not [p for p in out.rglob(".*")]  # stale lock of the lost rank broken, no temporaries
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and 0 < m["timing"]["reused"] < 36


# ------------------------------------------------------------------------------------------------
# Two independent jobs on one folder


def test_a_batch_claimed_by_a_live_job_is_left_to_it(ref, tmp_path, one_thread, capsys):
    out = tmp_path / "out"
    (out / "batches").mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = out / "batches" / ".batch-000004.npz.lock"  # the third batch
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "since": "earlier"}))
        assert main([*ARGS, "--outdir", str(out)]) == 0
        captured = capsys.readouterr()
        assert (f"warning: 1 batch(es) in {str(out)!r} are claimed by another job (pid {other.pid} on host "
                f"{socket.gethostname()} since earlier); left to it") in captured.err
        assert "incomplete (see the warning above) (34 generated, 0 reused)" in captured.out
        assert json.loads((out / "manifest.json").read_text())["status"] == "running"
        assert not (out / "batches" / "batch-000004.npz").exists() and not (out / "grid.png").exists()
        assert isinstance(distributed.claim(lock), dict)  # still the other job's
    finally:
        other.kill()
        other.wait()
    # The other job died without finishing: its lock is stale and the rerun completes the run.
    assert main([*ARGS, "--outdir", str(out)]) == 0
    assert output_tree(out) == output_tree(ref)


def test_claim_is_exclusive_and_breaks_only_dead_owners(tmp_path):
    lock = tmp_path / ".x.lock"
    mine = distributed.claim(lock)
    assert isinstance(mine, distributed.Claim) and json.loads(lock.read_text())["pid"] == os.getpid()
    mine.release()
    assert not lock.exists() and not list(tmp_path.iterdir())
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for owner, taken in ((live.pid, False), (dead.pid, True)):
            lock.write_text(json.dumps({"pid": owner, "host": socket.gethostname()}))
            got = distributed.claim(lock)
            assert isinstance(got, distributed.Claim) == taken
            if taken:
                got.release()
            else:
                assert got["pid"] == live.pid
        lock.write_text(json.dumps({"pid": live.pid, "host": "another-host"}))
        assert distributed.claim(lock)["host"] == "another-host"  # never broken: liveness unknown
    finally:
        live.kill()
        live.wait()
    lock.unlink()
    assert not list(tmp_path.iterdir())  # no claim temporaries left behind


# ------------------------------------------------------------------------------------------------
# Sharded training set and sharded top-k, with gloo process groups


N_ROWS = 101  # not divisible by 2 or 3


def _sharded_worker(rank, world, store, outdir, queue):
    ctx = distributed.init(init_method=f"file://{store}", rank=rank, world_size=world, timeout=30)
    ds = data.default_dataset()
    images, labels = ds.images[:N_ROWS], ds.labels[:N_ROWS].copy()
    labels[labels == 9] = 8
    labels[:5] = 9  # class 9 lives in shard 0 only
    lo, hi = distributed.shard_bounds(N_ROWS, world, rank)
    den = distributed.ShardedEmpiricalDenoiser(images[lo:hi], lo, ctx, labels=labels[lo:hi], label_dim=10)
    gen = torch.Generator().manual_seed(1)
    x = data.decode(torch.from_numpy(images[[3, 50, 97, 2]])) + 0.3 * torch.randn(4, 3, 32, 32, generator=gen,
                                                                                  dtype=torch.float64)
    out = {"uncond": den(x.float(), 0.4), "class9": den(x.float(), 0.4, torch.tensor([9, 9, 9, 9])),
           "nearest": den.nearest(x.float(), 0.4)[0], "nearest9": den.nearest(x.float(), 0.4, class_labels=9)[0],
           "count9": den.class_count(9)}
    feats = torch.randn(N_ROWS, 16, generator=torch.Generator().manual_seed(2))
    feats = feats / feats.norm(dim=1, keepdim=True)
    out["topk"] = distributed.all_gather_topk(nn_search_partial(feats[:7], feats[lo:hi], 5, row_offset=lo), ctx)
    out["same_on_all_ranks"] = all(torch.equal(o, out["uncond"]) for o in ctx.all_gather_object(out["uncond"]))
    m = generation.generate(den, "0-5", outdir, steps=6, batch=4, context=ctx, progress=False)
    out["status"] = m["status"]
    if rank == 0:
        # numpy, not tensors: a tensor in a queue is shared memory that dies with this process
        out["topk"] = (out["topk"].values, out["topk"].indices)
        queue.put({k: tuple(t.numpy() for t in v) if k == "topk" else v.numpy() if torch.is_tensor(v) else v
                   for k, v in out.items()})
    ctx.close()


def test_sharded_training_set_equals_one_process(tmp_path, one_thread):
    """3 ranks over 101 rows (shards of 34, 34, 33); class 9 only in shard 0."""
    world = 3
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_sharded_worker, args=(world, tmp_path / "store", tmp_path / "sharded", queue),
                               nprocs=world, join=False, start_method="spawn")
    got = queue.get(timeout=120)  # before joining: rank 0 exits only once its result is taken
    while not procs.join(timeout=120):
        pass
    ds = data.default_dataset()
    images, labels = ds.images[:N_ROWS], ds.labels[:N_ROWS].copy()
    labels[labels == 9] = 8
    labels[:5] = 9
    gen = torch.Generator().manual_seed(1)
    x = data.decode(torch.from_numpy(images[[3, 50, 97, 2]])) + 0.3 * torch.randn(4, 3, 32, 32, generator=gen,
                                                                                  dtype=torch.float64)
    x = x.float().double()
    y = torch.from_numpy(images)
    assert got["same_on_all_ranks"] and got["count9"] == 5
    got = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in got.items()}
    assert_f32_accuracy(got["uncond"], reference.empirical_denoiser_reference(x, y, 0.4),
                        naive_float32_denoiser(x, data.decode(y), 0.4))
    y9 = y[labels == 9]
    assert_f32_accuracy(got["class9"], reference.empirical_denoiser_reference(x, y9, 0.4),
                        naive_float32_denoiser(x, data.decode(y9), 0.4))
    assert got["nearest"].tolist() == reference.empirical_denoiser_info_reference(x, y, 0.4)["nearest_index"].tolist()
    near9 = reference.empirical_denoiser_info_reference(x, y9, 0.4)["nearest_index"]
    assert got["nearest9"].tolist() == np.flatnonzero(labels == 9)[near9.numpy()].tolist()

    feats = torch.randn(N_ROWS, 16, generator=torch.Generator().manual_seed(2))
    feats = feats / feats.norm(dim=1, keepdim=True)
    values, indices = nn_search(feats[:7], feats, 5)
    assert np.array_equal(got["topk"][1], indices.numpy()) and np.array_equal(got["topk"][0], values.numpy())

    # generate() with the sharded denoiser: rank 0 writes; equal to one process up to float rounding.
    assert got["status"] == "complete"
    generation.generate(EmpiricalDenoiser(images), "0-5", tmp_path / "one", steps=6, batch=4, progress=False)
    a, b = generation.load_outputs(tmp_path / "sharded")[1], generation.load_outputs(tmp_path / "one")[1]
    assert np.abs(a - b).max() < 1e-4
    assert json.loads((tmp_path / "sharded" / "manifest.json").read_text())["config"]["denoiser"]["class"] == \
        "ShardedEmpiricalDenoiser"
    shutil.rmtree(tmp_path / "one")
