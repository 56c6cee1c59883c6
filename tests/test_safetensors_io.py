"""Torch-free safetensors reader/writer (cross-checked against the official package) and atomic
writes."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st_np

from stride_jax.io import (
    SafetensorsError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    load_file,
    load_npy,
    load_sharded,
    read_header,
    save_file,
    save_npy,
)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "w.bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
        "w.f16": rng.standard_normal((7,)).astype(np.float16),
        "w.f64": rng.standard_normal((2, 2)).astype(np.float64),
        "ids": rng.integers(-5, 5, size=(2, 3, 4), dtype=np.int32),
        "ids64": np.array([2**40, -1], dtype=np.int64),
        "bytes": np.arange(9, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_round_trip_all_dtypes_and_shapes(tmp_path):
    t = _tensors()
    p = tmp_path / "m.safetensors"
    save_file(t, p, metadata={"format": "np", "fp": "abc"})
    got = load_file(p)
    _assert_same(t, got)
    assert got["scalar"].shape == () and got["empty"].shape == (0, 4)
    assert all(a.flags.writeable for a in got.values())
    infos, meta = read_header(p)
    assert meta == {"format": "np", "fp": "abc"}
    assert infos["w.bf16"].dtype == "BF16" and infos["w.bf16"].shape == (4, 2)
    assert infos["mask"].dtype == "BOOL" and infos["scalar"].shape == ()
    # Header is padded to 8 bytes and every tensor is aligned to its itemsize.
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert n % 8 == 0
    for info in infos.values():
        assert info.file_range[0] % info.np_dtype.itemsize == 0
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_load_subset_and_unknown_name(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(_tensors(), p)
    got = load_file(p, ["ids", "w.f32"])
    assert list(got) == ["ids", "w.f32"]
    with pytest.raises(SafetensorsError, match=r"no tensor\(s\) named \['w.f33'\].*did you mean"):
        load_file(p, ["w.f33"])


def test_loaded_arrays_are_writable_and_independent_of_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": np.ones(4, np.float32)}, p)
    a = load_file(p)["a"]
    os.remove(p)
    a[0] = 5.0  # owns its memory: neither read-only nor tied to the deleted file
    assert a.tolist() == [5.0, 1.0, 1.0, 1.0]


def test_accepts_non_contiguous_big_endian_and_jax_arrays(tmp_path):
    import jax.numpy as jnp

    p = tmp_path / "m.safetensors"
    src = np.arange(12, dtype=">f4").reshape(3, 4).T
    save_file({"t": src, "j": jnp.arange(3, dtype=jnp.bfloat16)}, p)
    got = load_file(p)
    np.testing.assert_array_equal(got["t"], src)
    assert got["t"].dtype == np.float32 and got["t"].dtype.isnative
    assert got["j"].dtype == ml_dtypes.bfloat16


def test_official_reader_reads_ours(tmp_path):
    t = {k: v for k, v in _tensors().items() if k != "w.bf16"}  # numpy backend lacks bf16
    p = tmp_path / "ours.safetensors"
    save_file(t, p, metadata={"k": "v"})
    _assert_same(t, st_np.load_file(str(p)))


def test_we_read_official_files(tmp_path):
    t = {k: v for k, v in _tensors().items() if k != "w.bf16"}
    p = tmp_path / "theirs.safetensors"
    st_np.save_file(t, str(p), metadata={"k": "v"})
    _assert_same(t, load_file(p))
    assert read_header(p)[1] == {"k": "v"}


def test_bf16_cross_check_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch as st_torch

    ours = tmp_path / "ours.safetensors"
    x = np.array([[1.5, -2.0, 3.140625], [0.0, 1e-3, -7.0]], dtype=ml_dtypes.bfloat16)
    save_file({"x": x}, ours)
    tx = st_torch.load_file(str(ours))["x"]
    assert tx.dtype == torch.bfloat16
    np.testing.assert_array_equal(tx.float().numpy(), x.astype(np.float32))

    theirs = tmp_path / "theirs.safetensors"
    ty = torch.linspace(-3, 3, 10, dtype=torch.bfloat16).reshape(2, 5)
    st_torch.save_file({"y": ty, "z": torch.arange(4, dtype=torch.int32)}, str(theirs))
    got = load_file(theirs)
    assert got["y"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["y"].astype(np.float32), ty.float().numpy())
    np.testing.assert_array_equal(got["z"], np.arange(4, dtype=np.int32))


def test_save_rejects_bad_input(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(SafetensorsError, match="complex128 has no safetensors equivalent"):
        save_file({"c": np.zeros(2, np.complex128)}, p)
    with pytest.raises(SafetensorsError, match="reserved"):
        save_file({"__metadata__": np.zeros(2, np.float32)}, p)
    with pytest.raises(SafetensorsError, match="metadata must map strings to strings"):
        save_file({"a": np.zeros(2, np.float32)}, p, metadata={"n": 3})
    assert not p.exists()


# ---- damaged files ----------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": np.arange(100, dtype=np.float32), "b": np.ones((4, 4), np.float32)}, p)
    return p


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_missing_file(tmp_path):
    with pytest.raises(SafetensorsError, match="not found"):
        load_file(tmp_path / "nope.safetensors")


def test_shorter_than_prefix(good_file):
    with open(good_file, "r+b") as f:
        f.truncate(5)
    with pytest.raises(SafetensorsError, match="5 bytes, fewer than the 8-byte"):
        read_header(good_file)


def test_header_size_beyond_file(good_file):
    with open(good_file, "r+b") as f:
        f.truncate(20)
    with pytest.raises(SafetensorsError, match="truncated or not a safetensors file"):
        load_file(good_file)


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_text("hello world, this is plainly text")
    with pytest.raises(SafetensorsError, match="truncated or not a safetensors file"):
        read_header(p)


def test_data_truncated(good_file):
    size = good_file.stat().st_size
    with open(good_file, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(SafetensorsError) as e:
        load_file(good_file)
    msg = str(e.value)
    assert f"truncated: expected at least {size} bytes, file has {size - 10}" in msg
    assert "re-download or re-export the checkpoint" in msg


def test_header_not_json(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 8) + b"{not js}")
    with pytest.raises(SafetensorsError, match="header is not valid UTF-8 JSON"):
        read_header(p)


def test_unknown_dtype(tmp_path):
    p = tmp_path / "x.safetensors"
    _write_raw(p, {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(SafetensorsError, match="tensor 'a': unknown dtype 'C64'; supported: F64"):
        load_file(p)


def test_offsets_inconsistent_with_shape(tmp_path):
    p = tmp_path / "x.safetensors"
    _write_raw(p, {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(24))
    with pytest.raises(SafetensorsError, match=r"span 20 bytes but dtype F32 with shape \[2, 3\] needs 24"):
        load_file(p)
    _write_raw(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, bytes(8))
    with pytest.raises(SafetensorsError, match="data_offsets must be"):
        load_file(p)


# ---- sharded checkpoints ---------------------------------------------------------------------


def _make_sharded(d):
    t = _tensors()
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[:5],
              "model-00002-of-00002.safetensors": names[5:]}
    weight_map = {}
    for fname, ns in shards.items():
        save_file({n: t[n] for n in ns}, d / fname)
        weight_map.update({n: fname for n in ns})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return t, weight_map


def test_load_sharded_index(tmp_path):
    t, _ = _make_sharded(tmp_path)
    _assert_same(t, load_sharded(tmp_path))
    sub = load_sharded(tmp_path, ["ids", "w.f32"])
    assert list(sub) == ["ids", "w.f32"]


def test_load_sharded_prefers_single_file(tmp_path):
    _make_sharded(tmp_path)
    save_file({"only": np.zeros(1, np.float32)}, tmp_path / "model.safetensors")
    assert list(load_sharded(tmp_path)) == ["only"]


def test_sharded_errors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SafetensorsError, match=r"neither model.safetensors nor .*holds \['config.json'\]"):
        load_sharded(tmp_path)
    with pytest.raises(SafetensorsError, match="directory not found"):
        load_sharded(tmp_path / "nope")

    _, weight_map = _make_sharded(tmp_path)
    second = tmp_path / "model-00002-of-00002.safetensors"
    second.rename(tmp_path / "moved")
    with pytest.raises(SafetensorsError, match="names shard 'model-00002-of-00002.safetensors'"):
        load_sharded(tmp_path)
    (tmp_path / "moved").rename(second)

    weight_map = {**weight_map, "ghost": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SafetensorsError, match=r"assigns \['ghost'\] to 'model-00001-of-00002"):
        load_sharded(tmp_path)

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"files": []}))
    with pytest.raises(SafetensorsError, match="weight_map"):
        load_sharded(tmp_path)


# ---- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_bytes_and_text(tmp_path):
    p = tmp_path / "a" / "b.txt"
    atomic_write_text(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert os.listdir(p.parent) == ["b.txt"]


def test_atomic_path_keeps_old_file_when_writer_raises(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(p) as tmp:
            assert tmp.parent == p.parent and tmp != p
            tmp.write_bytes(b"half-written")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_save_file_failure_keeps_old_checkpoint(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": np.ones(3, np.float32)}, p)
    with pytest.raises(SafetensorsError):
        save_file({"a": np.ones(3, np.float32), "z": np.zeros(1, np.complex64)}, p)
    np.testing.assert_array_equal(load_file(p)["a"], np.ones(3, np.float32))


def test_save_load_npy(tmp_path):
    p = tmp_path / "x.npy"
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    save_npy(p, x)
    np.testing.assert_array_equal(load_npy(p), x)
    with pytest.raises(ValueError, match="object array"):
        save_npy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]
