# SPDX-License-Identifier: Apache-2.0
# Readers and writers of diffrepro.data on real fixtures built here (CIFAR tar.gz, EDM zip, PNG
# folders, npz, npy), the exact uint8 quantisation round trip, ordering rules and errors.
import hashlib
import io
import json
import os
import pickle
import stat
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from diffrepro import data, noise
from diffrepro.errors import RunError


def _random_images(n, c=3, r=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, r, r), dtype=np.uint8)


# --- quantisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_round_trip_is_exact(dtype):
    u = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = (u.astype(dtype) / dtype(127.5) - dtype(1)).astype(dtype)
    np.testing.assert_array_equal(data.quantize(x), u)
    np.testing.assert_array_equal(data.quantize(torch.from_numpy(x)).numpy(), u)


def test_quantize_rounds_half_up_and_clips():
    # x*127.5 + 127.5 = k + 0.5 must give k + 1 (floor of +128), outside [-1, 1] clips.
    k = np.arange(255, dtype=np.float64)
    x = (k + 0.5 - 127.5) / 127.5
    np.testing.assert_array_equal(data.quantize(x), (k + 1).astype(np.uint8))
    np.testing.assert_array_equal(data.quantize(np.array([-3.0, 1.0, 1.003, 7.0])),
                                  [0, 255, 255, 255])
    assert data.quantize(torch.tensor([0.0])).dtype == torch.uint8


def test_quantize_rejects_non_finite_and_integers():
    with pytest.raises(ValueError, match="non-finite"):
        data.quantize(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="non-finite"):
        data.quantize(torch.tensor([np.inf]))
    with pytest.raises(TypeError, match="floating"):
        data.quantize(np.zeros(3, np.uint8))


# --- CIFAR-10 python ------------------------------------------------------------------------------

@pytest.fixture
def cifar_fixture(tmp_path):
    train, labels = _random_images(50, seed=1), np.arange(50) % 10
    test, test_labels = _random_images(7, seed=2), np.arange(7)[::-1] % 10
    folder = tmp_path / "cifar-10-batches-py"
    data.write_cifar_batches(folder, train, labels, test_images=test, test_labels=test_labels)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return dict(folder=folder, archive=archive, train=train, labels=labels, test=test,
                test_labels=test_labels)


def test_cifar_batches_are_real_pickles(cifar_fixture):
    with open(cifar_fixture["folder"] / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert batch["data"].shape == (10, 3072) and batch["data"].dtype == np.uint8
    np.testing.assert_array_equal(batch["data"].reshape(-1, 3, 32, 32), cifar_fixture["train"][10:20])
    assert batch["labels"] == list(cifar_fixture["labels"][10:20])


@pytest.mark.parametrize("which", ["archive", "folder"])
def test_cifar_reader_order_and_splits(cifar_fixture, which):
    path = cifar_fixture[which]
    ds = data.load_dataset(path)
    np.testing.assert_array_equal(ds.images, cifar_fixture["train"])
    np.testing.assert_array_equal(ds.labels, cifar_fixture["labels"])
    assert ds.labels.dtype == np.int64 and ds.names[10] == "data_batch_2:0"
    test = data.load_dataset(path, split="test")
    np.testing.assert_array_equal(test.images, cifar_fixture["test"])
    np.testing.assert_array_equal(test.labels, cifar_fixture["test_labels"])
    first = data.load_dataset(path, max_images=13)
    np.testing.assert_array_equal(first.images, cifar_fixture["train"][:13])
    assert len(first.names) == 13 and len(first.labels) == 13


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Payload(), "labels": []}))
    with pytest.raises(RunError, match="data_batch_1.*references (os|posix).getcwd; expected only numpy arrays"):
        data.load_dataset(folder)


def test_cifar_archive_without_batches_is_rejected(tmp_path):
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="not a CIFAR-10 python archive"):
        data.load_dataset(archive)


# --- EDM zip --------------------------------------------------------------------------------------

def test_edm_zip_layout_and_round_trip(tmp_path):
    images, labels = _random_images(1003, r=4, seed=3), np.arange(1003) % 7
    path = tmp_path / "ds.zip"
    data.write_edm_zip(path, images, labels)
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        meta = json.loads(z.read("dataset.json"))
    assert "00000/img00000000.png" in infos and "00001/img00001002.png" in infos
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos.values())
    assert meta["labels"][1000] == ["00001/img00001000.png", 6]
    ds = data.load_dataset(path)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.names[1002] == "00001/img00001002.png"
    assert len(data.load_dataset(path, max_images=5)) == 5
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_edm_zip_grayscale_unlabelled(tmp_path):
    images = _random_images(5, c=1, r=8, seed=4)
    data.write_edm_zip(tmp_path / "g.zip", images)
    ds = data.load_dataset(tmp_path / "g.zip")
    assert ds.labels is None and ds.images.shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(ds.images, images)


def test_zip_sorted_names_and_image_extensions_only(tmp_path):
    images = _random_images(3, r=4, seed=5)
    names = ["b/0.png", "a/9.bmp", "a/10.png"]  # sorted: a/10.png, a/9.bmp, b/0.png
    path = tmp_path / "mixed.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, img in zip(names, images):
            buf = io.BytesIO()
            fmt = "bmp" if name.endswith(".bmp") else "png"
            PIL.Image.fromarray(img.transpose(1, 2, 0)).save(buf, format=fmt)
            z.writestr(name, buf.getvalue())
        z.writestr("notes.txt", "not an image")
        z.writestr("dataset.json", json.dumps({"labels": [[n, i] for i, n in enumerate(names)]}))
    ds = data.load_dataset(path)
    assert ds.names == ["a/10.png", "a/9.bmp", "b/0.png"]
    np.testing.assert_array_equal(ds.images, images[[2, 1, 0]])
    np.testing.assert_array_equal(ds.labels, [2, 1, 0])


# --- folders --------------------------------------------------------------------------------------

def test_png_folder_walk_sorted_with_labels(tmp_path):
    images = _random_images(4, r=8, seed=6)
    rel = ["x/000002.png", "000010.png", "x/000001.png", "000009.png"]
    for name, img in zip(rel, images):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        data.save_png(tmp_path / name, img)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, 3] for n in rel]}))
    ds = data.load_dataset(tmp_path)
    assert ds.names == sorted(rel)
    np.testing.assert_array_equal(ds.images, images[[3, 1, 2, 0]])
    np.testing.assert_array_equal(ds.labels, [3, 3, 3, 3])
    with PIL.Image.open(tmp_path / "000010.png") as im:
        assert im.mode == "RGB" and im.size == (8, 8)


def test_folder_of_sample_npz_files(tmp_path):
    a, b = _random_images(3, r=4, seed=7), _random_images(2, r=4, seed=8)
    np.savez(tmp_path / "samples_1.npz", samples=b.transpose(0, 2, 3, 1))
    np.savez(tmp_path / "samples_0.npz", samples=a.transpose(0, 2, 3, 1))
    ds = data.load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.images, np.concatenate([a, b]))
    assert ds.names[3] == "samples_1.npz:0"
    assert len(data.load_dataset(tmp_path, max_images=2)) == 2


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="neither image files nor"):
        data.load_dataset(tmp_path)
    data.save_png(tmp_path / "a.png", _random_images(1, r=8)[0])
    data.save_png(tmp_path / "b.png", _random_images(1, r=4)[0])
    with pytest.raises(ValueError, match="all must match"):
        data.load_dataset(tmp_path)
    PIL.Image.new("RGBA", (8, 8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="mode 'RGBA'"):
        data.load_dataset(tmp_path)
    (tmp_path / "b.png").unlink()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["zzz.png", 1]]}))
    with pytest.raises(ValueError, match="no label for 'a.png'"):
        data.load_dataset(tmp_path)


# --- npz / npy ------------------------------------------------------------------------------------

def test_npz_and_npy_inputs(tmp_path):
    images, labels = _random_images(6, r=4, seed=9), np.arange(6, dtype=np.int32)
    np.savez(tmp_path / "p2.npz", images=images, labels=labels)
    ds = data.load_dataset(tmp_path / "p2.npz", max_images=4)
    np.testing.assert_array_equal(ds.images, images[:4])
    assert ds.labels.dtype == np.int64 and list(ds.labels) == [0, 1, 2, 3]
    np.savez(tmp_path / "s.npz", samples=images.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(data.load_dataset(tmp_path / "s.npz").images, images)
    np.save(tmp_path / "big.npy", images)
    mm = data.load_dataset(tmp_path / "big.npy", max_images=5)
    assert isinstance(mm.images, np.memmap) and mm.labels is None
    np.testing.assert_array_equal(mm.images, images[:5])
    assert data.dataset_hash(mm.images) == data.dataset_hash(images[:5])


def test_unknown_inputs_name_the_argument(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="path .*x.txt.* is not a recognised data set"):
        data.load_dataset(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset(tmp_path / "missing.zip")
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="'images'.*'samples'"):
        data.load_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        data.load_dataset(tmp_path / "f.npz")
    with pytest.raises(ValueError, match="split"):
        data.load_dataset(tmp_path / "f.npz", split="test")
    with pytest.raises(ValueError, match="split must be"):
        data.load_dataset(tmp_path / "f.npz", split="val")
    with pytest.raises(ValueError, match="max_images"):
        data.load_dataset(tmp_path / "f.npz", max_images=-1)


# --- hashing, grids, atomic writes, embedded data -------------------------------------------------

def test_dataset_hash_is_sha256_of_nchw_bytes():
    images = _random_images(3, r=4, seed=10)
    assert data.dataset_hash(images) == hashlib.sha256(images.tobytes()).hexdigest()
    nhwc_view = np.ascontiguousarray(images.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert data.dataset_hash(nhwc_view) == data.dataset_hash(images)
    assert data.dataset_hash(torch.from_numpy(images)) == data.dataset_hash(images)
    with pytest.raises(ValueError, match="images must be a uint8"):
        data.dataset_hash(images.astype(np.float32))


def test_image_grid_row_major(tmp_path):
    images = np.stack([np.full((3, 2, 2), i, np.uint8) for i in range(6)])
    grid = data.image_grid(images, 2, 3)
    assert grid.shape == (3, 4, 6)
    assert grid[0, 0, 4] == 2 and grid[0, 2, 0] == 3 and grid[0, 3, 5] == 5
    assert torch.equal(data.image_grid(torch.from_numpy(images), 2, 3), torch.from_numpy(grid))
    with pytest.raises(ValueError, match="rows\\*cols"):
        data.image_grid(images, 2, 2)
    x = torch.from_numpy(images).double() / 127.5 - 1
    data.save_grid_png(tmp_path / "g.png", x, 2, 3)
    with PIL.Image.open(tmp_path / "g.png") as im:
        np.testing.assert_array_equal(np.asarray(im).transpose(2, 0, 1), grid)


def test_atomic_writes_leave_no_partial_files(tmp_path):
    data.atomic_save_npz(tmp_path / "stats.bin", a=np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["stats.bin"]
    with np.load(tmp_path / "stats.bin") as z:
        np.testing.assert_array_equal(z["a"], np.arange(3))
    data.atomic_write_bytes(tmp_path / "stats.bin", b"new")
    with pytest.raises(TypeError):
        data.atomic_write_bytes(tmp_path / "stats.bin", 12345)
    assert sorted(os.listdir(tmp_path)) == ["stats.bin"]
    assert (tmp_path / "stats.bin").read_bytes() == b"new"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, umask):
    from diffrepro import plots

    images = _random_images(2, r=4)
    saved = os.umask(umask)
    try:
        data.atomic_write_bytes(tmp_path / "a.json", b"{}")
        data.atomic_save_npz(tmp_path / "b.npz", x=np.zeros(2))
        data.save_png(tmp_path / "c.png", images[0])
        data.write_edm_zip(tmp_path / "d.zip", images)
        plots.nn_grid(images, images, np.array([1, 0]), tmp_path / "e.png")
        with open(tmp_path / "plain", "w"):  # what open() gives: the reference
            pass
    finally:
        os.umask(saved)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.json", "b.npz", "c.png", "d.zip", "e.png", "plain"], 0o666 & ~umask)


@pytest.fixture
def damaged_files(tmp_path):
    images = _random_images(4, r=8)
    data.write_edm_zip(tmp_path / "set.zip", images)
    raw = (tmp_path / "set.zip").read_bytes()
    (tmp_path / "trunc.zip").write_bytes(raw[:len(raw) // 2])
    member = raw.index(b"IDAT") + 12  # inside the first PNG's data: its CRC-32 no longer matches
    (tmp_path / "crc.zip").write_bytes(raw[:member] + bytes([raw[member] ^ 0xFF]) + raw[member + 1:])
    folder = tmp_path / "pngs"
    folder.mkdir()
    data.save_png(folder / "a.png", images[0])
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes()[:-30])
    np.savez(tmp_path / "set.npz", images=images)
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "set.npz").read_bytes()[:-50])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "set.npy", images)
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "set.npy").read_bytes()[:150])
    (tmp_path / "text.npy").write_bytes(b"not an array at all")
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    data.write_cifar_batches(cifar, _random_images(10), np.arange(10))
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(cifar, arcname="cifar-10-batches-py")
    (tmp_path / "trunc.tar.gz").write_bytes((tmp_path / "c.tar.gz").read_bytes()[:1500])
    (cifar / "data_batch_2").write_bytes((cifar / "data_batch_2").read_bytes()[:100])
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    data.save_png(labelled / "a.png", images[0])
    (labelled / "dataset.json").write_text('{"labels": [["a.png", 1]')
    return tmp_path


@pytest.mark.parametrize("name,named,expected", [
    ("trunc.zip", "trunc.zip'", "EDM dataset zip"),
    ("crc.zip", "crc.zip:00000/img00000000.png'", "Bad CRC-32"),
    ("pngs", "pngs/b.png'", "image file is truncated"),
    ("trunc.npz", "trunc.npz'", "numpy .npz archive"),
    ("empty.npz", "empty.npz'", "numpy .npz archive"),
    ("trunc.npy", "trunc.npy'", ".npy array"),
    ("text.npy", "text.npy'", ".npy array"),
    ("trunc.tar.gz", "trunc.tar.gz'", "gzip-compressed tar archive"),
    ("cifar/cifar-10-batches-py", "data_batch_2'", "CIFAR-10 python batch"),
    ("labelled", "labelled/dataset.json", "JSON"),
])
def test_damaged_files_raise_run_error_naming_them(damaged_files, name, named, expected):
    with pytest.raises(RunError) as info:
        data.load_dataset(damaged_files / name)
    message = str(info.value)
    assert named in message and expected in message and "\n" not in message


def _fake_generate_run(folder, seeds_text, seeds, subdirs=False, status="complete"):
    """A folder laid out as diffrepro generate writes it: per-seed PNGs, grid.png, batches/, manifest."""
    images = {s: _random_images(1, r=4, seed=s)[0] for s in seeds}
    for s, img in images.items():
        (folder / noise.seed_filename(s, subdirs)).parent.mkdir(parents=True, exist_ok=True)
        data.save_png(folder / noise.seed_filename(s, subdirs), img)
    data.save_png(folder / "grid.png", _random_images(1, r=8)[0])
    (folder / "batches").mkdir()
    np.savez(folder / "batches" / "batch-000000.npz", samples=_random_images(2, r=4).transpose(0, 2, 3, 1))
    (folder / "manifest.json").write_text(json.dumps({"config": {"seeds": seeds_text, "subdirs": subdirs},
                                                      "status": status}))
    return images


@pytest.mark.parametrize("subdirs", [False, True])
def test_a_generate_output_folder_reads_exactly_its_seeds(tmp_path, subdirs):
    run = tmp_path / "run"
    images = _fake_generate_run(run, "1002,7-8", [1002, 7, 8], subdirs)
    ds = data.load_dataset(run)
    assert ds.names == [noise.seed_filename(s, subdirs) for s in (1002, 7, 8)]  # the manifest's order
    np.testing.assert_array_equal(ds.images, np.stack([images[s] for s in (1002, 7, 8)]))
    assert len(data.load_dataset(run, max_images=2)) == 2
    (run / noise.seed_filename(7, subdirs)).unlink()
    with pytest.raises(RunError, match=f"1 of the 3 PNGs its manifest lists are missing .first: "
                                       f"'{noise.seed_filename(7, subdirs)}'"):
        data.load_dataset(run)
    with pytest.raises(ValueError, match="holds diffrepro generate runs in its sub-folders \\(run\\)"):
        data.load_dataset(tmp_path)


def test_an_unfinished_generate_run_is_refused(tmp_path):
    _fake_generate_run(tmp_path, "0-1", [0, 1], status="running")
    with pytest.raises(RunError, match="unfinished diffrepro generate run .manifest status 'running'"):
        data.load_dataset(tmp_path)


def test_default_dataset_matches_real_subset(cifar_subset):
    ds = data.default_dataset()
    assert ds.images.shape == (500, 3, 32, 32) and ds.labels.shape == (500,)
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(10))
    assert data.dataset_hash(ds.images) == \
        "9c4b52b489792be87e060db47c894aa35c3b3024e4de51a1d3b9da14bc95dea6"
    np.testing.assert_array_equal(ds.images, cifar_subset[:500])
