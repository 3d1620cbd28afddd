"""Benchmark the integrity checks on a 3.6 GB-shaped Hugging Face checkpoint, against `unzip -t`.

    python bench/bench_verify.py [--repeat 5] [--keep]

Builds, under /tmp (deleted afterwards unless --keep), `checkpoint-500/` as the Trainer leaves
it for a ~300M-parameter fp32 model:

- `model.safetensors`, 1.2 GB: a real header (150 layers of tensors covering the whole buffer),
  the data a sparse hole;
- `optimizer.pt`, 2.4 GB: a real `torch.save`-shaped zip archive written by `zipfile`
  (ZIP_STORED, zip64): `optimizer/data.pkl` pickled with torch's globals and persistent storage
  references (no torch needed), and one member per AdamW state tensor (`exp_avg`, `exp_avg_sq`,
  `step`); the zeros of the large members are left as holes in the file ("sparse-ish": every
  local header, CRC and directory entry is real, and reading it returns the zeros);
- `scheduler.pt`, `rng_state.pth`, `training_args.bin` (small real archives), `config.json`,
  `trainer_state.json`.

Then, in the same run:

- cheap check: `check_checkpoint(root, "checkpoint-500", "hf")`, the best and median of
  `--repeat` runs (page cache warm after the first, which is shown too). Target: <= 50 ms.
- deep pass: `check_checkpoint(..., deep=True)` (every member's CRC-32) in MB/s of member
  bytes, against `unzip -t -qq optimizer.pt` on the same file: each run alternately, best of
  `--repeat`. Target: >= 0.8x unzip's MB/s.

Prints a table; exits 1 when a target is missed. Needs `unzip` (apt-get install unzip).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.integrity.check import check_checkpoint

CHEAP_TARGET_MS = 50.0
DEEP_RATIO_TARGET = 0.8
PARAMETERS = 300_000_000  # fp32: 1.2 GB of weights, 2.4 GB of AdamW state
LAYERS = 150
ZERO_BLOCK = bytes(16 << 20)


# --- torch-shaped pickles without torch ---------------------------------------------------------


class _Storage:
    def __init__(self, key: int, numel: int) -> None:
        self.key = key
        self.numel = numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage = storage
        self.shape = shape


def _torch_module() -> dict[str, Any]:
    """Stand-ins registered as `torch` and `torch._utils` so pickle writes torch's globals."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    float_storage = type("FloatStorage", (), {"__module__": "torch"})

    def _rebuild_tensor_v2(*args: Any) -> None:
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage = float_storage  # type: ignore[attr-defined]
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    return {"torch": torch, "torch._utils": utils}


class _TorchPickler(pickle.Pickler):
    def __init__(self, stream: io.BytesIO, modules: dict[str, Any]) -> None:
        super().__init__(stream, protocol=2)
        self.modules = modules

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            storage_type = self.modules["torch"].FloatStorage
            return ("storage", storage_type, str(obj.key), "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _Tensor):
            stride = tuple(_product(obj.shape[index + 1 :]) for index in range(len(obj.shape)))
            rebuild = self.modules["torch._utils"]._rebuild_tensor_v2
            return (rebuild, (obj.storage, 0, obj.shape, stride, False, OrderedDict()))
        return NotImplemented


def _product(values: tuple[int, ...]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def torch_pickle(obj: Any) -> bytes:
    modules = _torch_module()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        stream = io.BytesIO()
        _TorchPickler(stream, modules).dump(obj)
        return stream.getvalue()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# --- the checkpoint -----------------------------------------------------------------------------


def layer_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Return (name, shape) of LAYERS weight matrices adding up to about PARAMETERS."""
    side = int((PARAMETERS / LAYERS) ** 0.5)
    return [(f"model.layers.{index}.weight", (side, side)) for index in range(LAYERS)]


class SparseZeros(io.RawIOBase):
    """A file that turns writes of `ZERO_BLOCK` into holes (so 2.4 GB cost no disk)."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "w+b")  # noqa: SIM115
        self.end = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        length = len(data)
        if data is ZERO_BLOCK or (isinstance(data, memoryview) and data.obj is ZERO_BLOCK):
            self.handle.seek(length, os.SEEK_CUR)
        else:
            self.handle.write(data)
        self.end = max(self.end, self.handle.tell())
        return length

    def read(self, size: int = -1) -> bytes:
        return self.handle.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def flush(self) -> None:
        if not self.handle.closed:
            self.handle.flush()

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.truncate(self.end)
            self.handle.close()
        super().close()


def write_zeros(member: Any, count: int) -> None:
    while count > 0:
        piece = min(count, len(ZERO_BLOCK))
        member.write(ZERO_BLOCK if piece == len(ZERO_BLOCK) else memoryview(ZERO_BLOCK)[:piece])
        count -= piece


def write_optimizer(path: Path) -> int:
    """Write the AdamW state of `layer_shapes()` as a torch.save-shaped zip; return the bytes of
    its members."""
    state: dict[int, dict[str, _Tensor]] = {}
    storages: list[_Storage] = []
    for index, (_, shape) in enumerate(layer_shapes()):
        numel = _product(shape)
        step = _Storage(len(storages), 1)
        avg = _Storage(len(storages) + 1, numel)
        avg_sq = _Storage(len(storages) + 2, numel)
        storages += [step, avg, avg_sq]
        state[index] = {
            "step": _Tensor(step, ()),
            "exp_avg": _Tensor(avg, shape),
            "exp_avg_sq": _Tensor(avg_sq, shape),
        }
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "params": list(state)}]
    data_pkl = torch_pickle({"state": state, "param_groups": groups})
    sink = SparseZeros(path)
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr("optimizer/data.pkl", data_pkl)
        archive.writestr("optimizer/byteorder", "little")
        for storage in storages:
            with archive.open(f"optimizer/data/{storage.key}", "w", force_zip64=True) as member:
                write_zeros(member, storage.numel * 4)
        archive.writestr("optimizer/version", "3\n")
    sink.close()
    return sum(storage.numel * 4 for storage in storages) + len(data_pkl)


def write_safetensors(path: Path) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layer_shapes():
        size = _product(shape) * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def small_archive(path: Path, obj: Any) -> None:
    stem = path.name.split(".")[0]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{stem}/data.pkl", pickle.dumps(obj, protocol=2))
        archive.writestr(f"{stem}/version", "3\n")


def build(base: Path) -> tuple[Path, int]:
    """Build the checkpoint under `base`; return (its optimizer.pt, that file's member bytes)."""
    folder = base / "checkpoint-500"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1414}))
    write_safetensors(folder / "model.safetensors")
    member_bytes = write_optimizer(folder / "optimizer.pt")
    small_archive(folder / "scheduler.pt", {"last_epoch": 500, "base_lrs": [1e-4]})
    small_archive(folder / "rng_state.pth", {"python": list(range(624))})
    small_archive(folder / "training_args.bin", {"output_dir": "run", "learning_rate": 1e-4})
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    return folder / "optimizer.pt", member_bytes


# --- measuring ----------------------------------------------------------------------------------


def timed(action: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    value = action()
    return time.perf_counter() - began, value


def unzip_test(path: Path) -> float:
    began = time.perf_counter()
    subprocess.run(["unzip", "-t", "-qq", str(path)], check=True)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint under /tmp")
    args = parser.parse_args()
    if shutil.which("unzip") is None:
        print("unzip is missing: apt-get install unzip", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="ckptd-bench-verify-", dir="/tmp"))
    try:
        return measure(base, args.repeat)
    finally:
        if args.keep:
            print(f"kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def measure(base: Path, repeat: int) -> int:
    built, (optimizer, member_bytes) = timed(lambda: build(base))
    folder = optimizer.parent
    logical = sum(path.stat().st_size for path in folder.iterdir())
    allocated = sum(path.stat().st_blocks * 512 for path in folder.iterdir())
    print(
        f"checkpoint: {logical / 1e9:.2f} GB ({allocated / 1e6:.1f} MB allocated), "
        f"built in {built:.1f} s; optimizer.pt {optimizer.stat().st_size / 1e9:.2f} GB, "
        f"{member_bytes / 1e9:.2f} GB in its members"
    )
    first, result = timed(lambda: check_checkpoint(base, "checkpoint-500", "hf"))
    if result.status != "ok":
        print(f"the cheap check says {result.status}: {result.problems} {result.skipped}")
        return 1
    cheap = [
        timed(lambda: check_checkpoint(base, "checkpoint-500", "hf"))[0] for _ in range(repeat)
    ]
    deep_times: list[float] = []
    unzip_times: list[float] = []
    deep_bytes = 0
    for _ in range(repeat):
        elapsed, deep = timed(lambda: check_checkpoint(base, "checkpoint-500", "hf", deep=True))
        if deep.status != "ok":
            print(f"the deep pass says {deep.status}: {deep.problems} {deep.skipped}")
            return 1
        deep_times.append(elapsed)
        deep_bytes = deep.bytes_read
        unzip_times.append(unzip_test(optimizer))
    cheap_best, cheap_median = min(cheap) * 1000, statistics.median(cheap) * 1000
    deep_rate = deep_bytes / min(deep_times) / 1e6
    unzip_rate = member_bytes / min(unzip_times) / 1e6
    ratio = deep_rate / unzip_rate
    print(f"{'measure':44} {'ckptd':>12} {'unzip -t':>12} {'target':>14}")
    print(f"{'cheap check, first run (ms)':44} {first * 1000:12.1f} {'':>12} {'':>14}")
    print(
        f"{'cheap check, best / median of ' + str(repeat) + ' (ms)':44} "
        f"{cheap_best:5.1f} / {cheap_median:4.1f} {'':>12} {'<= ' + str(CHEAP_TARGET_MS):>14}"
    )
    print(
        f"{'deep pass, best of ' + str(repeat) + ' (MB/s of members)':44} {deep_rate:12.0f} "
        f"{unzip_rate:12.0f} {'>= 0.8x unzip':>14}"
    )
    print(f"{'deep pass / unzip -t':44} {ratio:12.2f}x")
    print(
        f"deep pass read {deep_bytes / 1e9:.2f} GB in {min(deep_times):.2f} s; "
        f"unzip -t {min(unzip_times):.2f} s"
    )
    failed = cheap_median > CHEAP_TARGET_MS or ratio < DEEP_RATIO_TARGET
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
