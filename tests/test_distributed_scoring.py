# SPDX-License-Identifier: Apache-2.0
"""GL scoring over sharded references and feature extraction over ranks, with real processes: gloo
process groups on ``file://`` stores (the Python API), ranks of ``python -m diffrepro`` started with
the environment torchrun sets (so that one can be killed), ``torchrun`` itself, and SLURM-style
``--part`` runs. The references are one-process runs (bitwise) and float64 brute-force oracles;
every process and wait is bounded in time."""
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import finish_processes, save_stub_sscd

from diffrepro import data, distributed, metrics
from diffrepro.cli import main
from diffrepro.sscd import load_features, save_features

ENV = {**os.environ, "DIFFREPRO_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 5  # --dist-timeout in seconds
N = 101  # reference rows: not divisible by 2 or 3
FEATURE_ARGS = ["--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Descriptors with exact duplicates in different shards (ties go to the lower global index), images
    likewise, generations that copy some of them, and a small real TorchScript descriptor model."""
    d = tmp_path_factory.mktemp("dscore")
    rng = np.random.default_rng(0)
    train = rng.standard_normal((N, 16)).astype(np.float32)
    train[70] = train[5]
    train[97] = 4 * train[40]  # same direction (exactly: a power of two): the same cosine
    gen = np.concatenate([train[[70, 5, 97, 33, 34, 67, 68, 100, 50, 51, 0]],
                          rng.standard_normal((9, 16)).astype(np.float32)])
    np.save(d / "train.npy", train)
    save_features(d / "gen.npz", gen, np.arange(100, 100 + len(gen)), {})
    images = data.default_dataset().images[:N].copy()
    images[80] = images[7]
    np.save(d / "images.npy", images)
    x = data.decode(images[[80, 7, 50, 33, 34, 100, 0]]) + 0.05 * rng.standard_normal((7, 3, 32, 32))
    x = np.concatenate([x, rng.uniform(-1, 1, (5, 3, 32, 32))]).clip(-1, 1)
    np.savez(d / "gen_x.npz", x=x, seeds=np.arange(len(x)))
    save_stub_sscd(d / "sscd.pt")
    np.savez(d / "imgs42.npz", images=data.default_dataset().images[:42])  # 11 batches of 4 (the last of 2)
    return d


def _oracle_sscd(d):
    """Nearest training descriptor by float64 cosine (np.argmax: the first, lowest index, on ties)."""
    train, gen = np.load(d / "train.npy").astype(np.float64), load_features(d / "gen.npz").features.astype(np.float64)
    cos = (gen @ train.T) / np.outer(np.linalg.norm(gen, axis=1), np.linalg.norm(train, axis=1))
    return cos.argmax(1), cos.max(1)


def _oracle_nn(d):
    train = data.decode(np.load(d / "images.npy")).reshape(N, -1)
    with np.load(d / "gen_x.npz") as z:
        x = z["x"].reshape(len(z["x"]), -1)
    dist2 = ((x[:, None, :] - train[None]) ** 2).sum(-1)
    return dist2.argmin(1), np.sqrt(dist2.min(1))


def _same(a: dict, b: dict) -> bool:
    """Bitwise equal results (arrays and numbers)."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _free_ports(k: int) -> list[int]:
    """``k`` distinct free ports (held together while chosen, so that two jobs never share one)."""
    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ranks(world: int, port: int, *argv, store: bool = False) -> list[subprocess.Popen]:
    """``world`` processes of ``python -m diffrepro`` with the variables torchrun sets: the job's store
    at ``port`` is hosted by rank 0, or with ``store`` by the caller (as torchrun's agent hosts it)."""
    procs = []
    for r in range(world):
        env = {**ENV, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": str(store)}
        procs.append(subprocess.Popen([sys.executable, "-m", "diffrepro", *map(str, argv), "--dist-timeout",
                                       str(TIMEOUT)], env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    return procs


# ------------------------------------------------------------------------------------------------
# Python API: gloo process groups of 3 ranks (and a process group of 2 of them)


def _api_worker(rank, world, store, d, queue):
    ctx = distributed.init(init_method=f"file://{store}", rank=rank, world_size=world, timeout=30)
    train, gen = np.load(d / "train.npy", mmap_mode="r"), load_features(d / "gen.npz").features
    images = np.load(d / "images.npy", mmap_mode="r")
    with np.load(d / "gen_x.npz") as z:
        x = z["x"]
    lo, hi = distributed.shard_bounds(N, world, rank)  # 34, 34 and 33 rows
    out = {"sscd": metrics.gl_sscd(gen, train[lo:hi], context=ctx, row_offset=lo, chunk_rows=7),
           "nn": metrics.gl_nn(x, images[lo:hi], normalize="nn", context=ctx, row_offset=lo, chunk_rows=5)}
    cuts = [0, 60, 60, N]  # rank 1 holds no row
    out["uneven"] = metrics.gl_sscd(gen, train[cuts[rank]:cuts[rank + 1]], context=ctx, row_offset=cuts[rank])
    pair = dist.new_group([0, 1])  # a plain process group of two ranks (a collective of all ranks)
    if rank < 2:
        refs = [train[:30], train[30:50]] if rank == 0 else train[50:]  # rank 0's rows as two shards
        out["sscd2"] = metrics.gl_sscd(gen, refs, context=pair, row_offset=50 * rank, chunk_rows=9)
        out["nn2"] = metrics.gl_nn(x, images[:50] if rank == 0 else images[50:], normalize="nn", context=pair,
                                   row_offset=50 * rank)
    bad = np.array(train)
    bad[40] = 0  # in rank 1's slice [34, 68)
    errors = []
    for call in (lambda: metrics.gl_sscd(gen, bad[lo:hi], context=ctx, row_offset=lo),
                 lambda: metrics.gl_sscd(gen, train[lo:hi], context=ctx, row_offset=lo + (rank == 2)),
                 lambda: metrics.gl_sscd(gen, train, context=ctx),
                 lambda: metrics.gl_sscd(gen[rank:], train[lo:hi], context=ctx, row_offset=lo)):
        try:
            call()
            errors.append(None)
        except ValueError as exc:  # raised on every rank alike: none is left waiting
            errors.append(str(exc))
    out["errors"] = errors
    queue.put((rank, out))
    ctx.close()


def test_api_sharded_references_equal_one_process(files, tmp_path, monkeypatch):
    """3 ranks over 101 rows (slices of 34, 34, 33, or 60, 0, 41) and a process group of 2 (one rank's
    rows as two shards): indices and similarities/distances bitwise those of one process, which match
    the float64 oracles (ties to the lowest index across shards)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world = 3
    queue = mp.get_context("spawn").Queue()
    procs = mp.start_processes(_api_worker, args=(world, tmp_path / "store", files, queue), nprocs=world, join=False,
                               start_method="spawn")
    got = dict(queue.get(timeout=120) for _ in range(world))
    while not procs.join(timeout=120):
        pass
    with np.load(files / "gen_x.npz") as z:
        x = z["x"]
    one = {"sscd": metrics.gl_sscd(files / "gen.npz", np.load(files / "train.npy")),
           "nn": metrics.gl_nn(x, np.load(files / "images.npy"), normalize="nn")}
    index, sim = _oracle_sscd(files)
    assert one["sscd"]["nn_index"].tolist() == index.tolist() and index[0] == 5 and index[2] == 40
    np.testing.assert_allclose(one["sscd"]["max_sim"], sim, rtol=0, atol=1e-13)
    index, dist_ = _oracle_nn(files)
    assert one["nn"]["nn_index"].tolist() == index.tolist() and index[0] == 7
    np.testing.assert_allclose(one["nn"]["dist"], dist_, rtol=1e-12)
    for rank, out in got.items():
        assert _same(out["sscd"], one["sscd"]) and _same(out["uneven"], one["sscd"]), rank
        assert _same(out["nn"], one["nn"]), rank
        if rank < 2:
            assert _same(out["sscd2"], one["sscd"]) and _same(out["nn2"], one["nn"]), rank
        assert out["errors"] == got[0]["errors"], rank
    zero, gap, overlap, queries = got[0]["errors"]
    assert zero.startswith("reference set: row 40 is all zero (norm 0)")
    assert "must tile [0, N): rows [68, 69) are in no rank's slice" in gap
    assert "must tile [0, N): rows [0, 101) are in two slices (each rank passes its own rows" in overlap
    assert queries == "queries differ across ranks: every rank must pass the same queries"


# ------------------------------------------------------------------------------------------------
# The commands under torchrun: rank 0 writes, results equal one process


def _per_generation(json_path) -> dict:
    with np.load(str(json_path)[:-5] + ".npz") as z:
        return {k: z[k] for k in z.files}


def _result(json_path) -> dict:
    out = json.loads(open(json_path).read())
    out.pop("per_generation")
    return out


def test_score_ranks_equal_one_process(files, tmp_path):
    """gl-sscd on 3 ranks and gl-nn on 2 ranks (at once) write what one process writes, rank 0 alone."""
    ports = _free_ports(2)
    sscd = _ranks(3, ports[0], "score", "gl-sscd", "--gen", files / "gen.npz", "--train", files / "train.npy",
                     "--chunk-rows", 8, "--json", tmp_path / "sscd3.json")
    nn = _ranks(2, ports[1], "score", "gl-nn", "--gen", files / "gen_x.npz", "--train", files / "images.npy",
                   "--normalize", "nn", "--json", tmp_path / "nn2.json")
    ends = finish_processes(sscd + nn)
    assert [code for code, _, _ in ends] == [0] * 5, [e for _, _, e in ends]
    assert "searched by 3 processes" in ends[0][1] and "searched by 2 processes" in ends[3][1]
    assert [o for _, o, _ in ends[1:3] + ends[4:]] == [""] * 3  # rank 0 alone prints
    assert "warning: --gen, --train: no model/preprocessing metadata" in ends[0][2]
    assert not ends[1][2] and not ends[2][2]  # nor warns
    assert main(["score", "gl-sscd", "--gen", str(files / "gen.npz"), "--train", str(files / "train.npy"),
                 "--json", str(tmp_path / "sscd1.json")]) == 0
    assert main(["score", "gl-nn", "--gen", str(files / "gen_x.npz"), "--train", str(files / "images.npy"),
                 "--normalize", "nn", "--json", str(tmp_path / "nn1.json")]) == 0
    for a, b in (("sscd3", "sscd1"), ("nn2", "nn1")):
        assert _result(tmp_path / f"{a}.json") == _result(tmp_path / f"{b}.json")
        assert _same(_per_generation(tmp_path / f"{a}.json"), _per_generation(tmp_path / f"{b}.json"))
    assert _per_generation(tmp_path / "sscd1.json")["nn_index"].tolist() == _oracle_sscd(files)[0].tolist()
    assert _per_generation(tmp_path / "nn1.json")["nn_index"].tolist() == _oracle_nn(files)[0].tolist()


def _features(path) -> dict:
    with np.load(path) as z:
        return {"features": z["features"], "ids": z["ids"], "meta": json.loads(str(z["meta"]))}


def _same_features(a, b) -> bool:
    fa, fb = _features(a), _features(b)
    return np.array_equal(fa["features"], fb["features"]) and np.array_equal(fa["ids"], fb["ids"]) and \
        fa["meta"] == fb["meta"]


@pytest.fixture(scope="module")
def one_features(files, tmp_path_factory):
    """The one-process feature file of the 42 images."""
    out = tmp_path_factory.mktemp("one") / "f.npz"
    assert main(["features", "--images", str(files / "imgs42.npz"), "--model", str(files / "sscd.pt"), "--out",
                 str(out), *FEATURE_ARGS]) == 0
    return out


def test_torchrun_features_equal_one_process(files, one_features, tmp_path):
    out = tmp_path / "f.npz"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "diffrepro", "features", "--images", str(files / "imgs42.npz"), "--model",
                           str(files / "sscd.pt"), "--out", str(out), *FEATURE_ARGS, "--dist-timeout", "30"],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("features: 42 x 16 descriptors") == 1 and "2 processes" in proc.stdout
    assert _same_features(out, one_features)
    assert sorted(os.listdir(tmp_path)) == ["f.npz"]  # the ranks' part files were assembled and removed


# ------------------------------------------------------------------------------------------------
# SLURM-style parts


def test_parts_then_assembly_equal_one_process(files, one_features, tmp_path, capsys):
    out = tmp_path / "f.npz"
    args = ["features", "--images", str(files / "imgs42.npz"), "--model", str(files / "sscd.pt"), "--out", str(out),
            *FEATURE_ARGS]
    # 11 batches of 4: part 0/3 = rows [0, 16), 1/3 = [16, 32), 2/3 = [32, 42)
    assert main([*args, "--part", "2/3"]) == 0
    assert main([*args, "--part", "0/3"]) == 0
    assert "part 0/3: rows [0, 16) of 42" in capsys.readouterr().out
    meta = _features(tmp_path / "f.rows-32-42.npz")["meta"]
    assert meta["part"] == "2/3" and meta["rows"] == [32, 42] and meta["batch_size"] == 4
    assert {k: meta[k] for k in ("images_sha256", "model_sha256", "preprocess")} == \
        {k: _features(one_features)["meta"][k] for k in ("images_sha256", "model_sha256", "preprocess")}
    # A part of another run (another batch size: its descriptors may round differently) is not used;
    # a part of this run whose content is not its rows' is computed again.
    assert main([*args[:-3], "--batch-size", "3", "--no-progress", "--part", "1/3"]) == 0  # rows [15, 30)
    part0 = _features(tmp_path / "f.rows-0-16.npz")
    save_features(tmp_path / "f.rows-0-16.npz", part0["features"], part0["ids"][::-1], part0["meta"])
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "42 x 16 descriptors (p1_pil320, ids: int64 seeds; 32 computed, 10 from part files)" in captured.out
    assert "f.rows-15-30.npz' belongs to another run (its batch_size differ)" in captured.err
    assert "f.rows-0-16.npz' does not hold the descriptors of its rows" in captured.err
    assert _same_features(out, one_features)
    assert sorted(os.listdir(tmp_path)) == ["f.npz", "f.rows-0-16.npz", "f.rows-15-30.npz"]  # used part removed
    assert main(args) == 0 and "is up to date" in capsys.readouterr().out
    assert main([*args, "--part", "1/3"]) == 0 and "is up to date" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["3/3", "1", "a/b"])
def test_bad_part_is_a_usage_error(files, tmp_path, text, capsys):
    assert main(["features", "--images", str(files / "imgs42.npz"), "--model", str(files / "sscd.pt"), "--out",
                 str(tmp_path / "f.npz"), f"--part={text}"]) == 2
    assert "diffrepro features: error: --part: got" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_part_file_never_replaces_a_foreign_file(files, tmp_path, capsys):
    (tmp_path / "f.rows-32-42.npz").write_bytes(b"mine")
    assert main(["features", "--images", str(files / "imgs42.npz"), "--model", str(files / "sscd.pt"), "--out",
                 str(tmp_path / "f.npz"), *FEATURE_ARGS, "--part", "2/3"]) == 2
    assert "is not a feature file written by diffrepro; refusing to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "f.rows-32-42.npz").read_bytes() == b"mine"


# ------------------------------------------------------------------------------------------------
# A rank killed mid-run


def _agent_store(port: int):
    """The job's store, hosted here as torchrun's agent hosts it (it outlives every rank)."""
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=60))


def _kill_when_running(*jobs) -> None:
    """For each ``(procs, store, victim)``: freeze then kill rank ``victim`` as soon as it has joined its
    job (its heartbeat is in the job's store), all jobs polled at once."""
    todo, deadline = list(jobs), time.monotonic() + 120
    while todo:
        assert time.monotonic() < deadline, "a victim never joined its job"
        for job in list(todo):
            procs, store, victim = job
            ended = [p.returncode for p in procs if p.poll() is not None]
            assert not ended, f"a job ended before the fault could be injected: exit {ended}"
            if store.check([f"diffrepro/hb/{victim}"]):
                procs[victim].send_signal(signal.SIGSTOP)
                procs[victim].send_signal(signal.SIGKILL)
                todo.remove(job)
        time.sleep(0.01)


@pytest.fixture(scope="module")
def slow(files):
    """Work that takes each rank long enough to be killed mid-run: 150 images, 200,000 descriptors."""
    np.savez(files / "imgs150.npz", images=data.default_dataset().images[:150])
    np.save(files / "train200k.npy", np.random.default_rng(1).standard_normal((200_000, 16)).astype(np.float32))
    return files


def test_killed_rank_is_named_and_a_rerun_completes(slow, tmp_path, capsys):
    """Rank 2 of 3 extracting features and rank 1 of 2 scoring are killed: the survivors stop within the
    timeout with one line naming the lost rank, nothing partial is visible, and one process finishes."""
    port_f, port_s = _free_ports(2)
    store_f, store_s = _agent_store(port_f), _agent_store(port_s)
    feats = _ranks(3, port_f, "features", "--images", slow / "imgs150.npz", "--model", slow / "sscd.pt", "--out",
                           tmp_path / "f.npz", "--batch-size", 2, "--no-progress", store=True)
    score = _ranks(2, port_s, "score", "gl-sscd", "--gen", slow / "gen.npz", "--train", slow / "train200k.npy",
                           "--chunk-rows", 64, "--json", tmp_path / "gl.json", store=True)
    _kill_when_running((feats, store_f, 2), (score, store_s, 1))
    t = time.monotonic()
    survivors = finish_processes(feats[:2] + score[:1], timeout=TIMEOUT + 60)
    seconds = time.monotonic() - t
    for p in (feats[2], score[1]):
        p.wait(timeout=30)
    for (code, _, err), lost in zip(survivors, (2, 2, 1)):
        assert code == 1, err[-2000:]
        errors = [line for line in err.splitlines() if ": error: " in line]
        named = re.search(r"lost ranks? ([0-9, ]+) \(killed or hung: no heartbeat for 5 s\)", "".join(errors[:1]))
        # A survivor whose collective broke only when another survivor left names both (rank 0 of 3 stops first).
        assert len(errors) == 1 and named and str(lost) in named.group(1).split(", "), err[-2000:]
        assert "Traceback" not in err and all(": warning: " in line for line in err.splitlines() if line not in errors)
    assert seconds < TIMEOUT + 30  # the timeout plus process exit on a loaded 2-core machine: no hang
    assert not (tmp_path / "f.npz").exists() and not (tmp_path / "gl.json").exists()
    assert not (tmp_path / "gl.npz").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not (tmp_path / "f.rows-100-150.npz").exists()  # the victim's share was never written
    kept = sum(int(b) - int(a) for a, b in (re.fullmatch(r"f\.rows-(\d+)-(\d+)\.npz", p.name).groups()
                                            for p in tmp_path.glob("f.rows-*.npz")))
    args = ["features", "--images", str(slow / "imgs150.npz"), "--model", str(slow / "sscd.pt"), "--batch-size", "2",
            "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "f.npz")]) == 0  # computes only what the survivors did not write
    assert f"{150 - kept} computed, {kept} from part files" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    assert _same_features(tmp_path / "f.npz", tmp_path / "one.npz")
    assert main(["score", "gl-sscd", "--gen", str(slow / "gen.npz"), "--train", str(slow / "train200k.npy"),
                 "--json", str(tmp_path / "gl.json")]) == 0


# ------------------------------------------------------------------------------------------------
# linearity and distill under torchrun: the σ are shared out, rank 0 writes what one process writes


def test_linearity_and_distill_ranks_equal_one_process(tmp_path):
    images = data.default_dataset().images[:24, :, :8, :8].copy()  # d = 192: a small least-squares problem
    np.save(tmp_path / "train.npy", images[:16])
    np.save(tmp_path / "held.npy", images[16:])
    common = ["--train", tmp_path / "train.npy", "--images", tmp_path / "held.npy", "--sigmas", "0.05,0.4,2,10,80",
              "--no-progress"]
    lin = ["linearity", "--denoiser", "empirical", "--pairs", 4, "--inputs", "pure", *common]
    dis = ["distill", "--denoiser", "gaussian", "--M", 400, *common]
    ports = _free_ports(2)
    ends = finish_processes(_ranks(3, ports[0], *lin, "--json", tmp_path / "lin3.json", "--plot", tmp_path / "lin3.png")
                   + _ranks(2, ports[1], *dis, "--json", tmp_path / "dis2.json"))
    assert [code for code, _, _ in ends] == [0] * 5, [e for _, _, e in ends]
    assert [o for _, o, _ in ends[1:3] + ends[4:]] == [""] * 3  # rank 0 alone prints
    assert main([*map(str, lin), "--json", str(tmp_path / "lin1.json"), "--plot", str(tmp_path / "lin1.png")]) == 0
    assert main([*map(str, dis), "--json", str(tmp_path / "dis1.json")]) == 0
    one, three = (json.loads((tmp_path / f"lin{k}.json").read_text()) for k in (1, 3))
    assert one["cos"] == three["cos"] and one["nmse"] == three["nmse"]  # bitwise: same noise, same σ
    # distill: the same fits up to the BLAS's reduction order (the ranks run one thread each)
    one, two = (json.loads((tmp_path / f"dis{k}.json").read_text()) for k in (1, 2))
    assert one["sigma"] == two["sigma"] and one["M"] == two["M"]
    np.testing.assert_allclose(one["weight_nmse"], two["weight_nmse"], rtol=0, atol=1e-15)
    with np.load(tmp_path / "dis1.npz") as a, np.load(tmp_path / "dis2.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if a[k].dtype.kind == "f":
                np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12)
            else:
                assert np.array_equal(a[k], b[k]), k
