"""A safetensors file written and hashed in one pass, read back through one memory map.

``safetensors.torch.save_file`` copies every tensor into a bytes object before writing
it, and hashing the result means reading the file again; ``safe_open`` maps the file a
second time after the hash has mapped it once. For the 87 MB of ViT-S/16 that a round
moves 20 times, those extra passes are a large part of the carrying cost, so this module
writes the same format (8-byte little-endian header length, JSON header, tensor bytes)
straight from the tensors' memory while hashing it, and reads it through the one private
mapping the hash was computed on. The files stay ordinary safetensors files
(``tests/integration/test_shared_weights.py`` reads them with the safetensors library).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import xxhash

CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {code: dtype for dtype, code in CODES.items()}


class TensorFileError(ValueError):
    """A file that is not a safetensors file this module can map."""


def _in_file_order(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, widest element first: every tensor starts at a multiple of its size."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return dict(sorted(tensors.items(), key=lambda item: -item[1].element_size()))


def _header(tensors: Mapping[str, torch.Tensor]) -> bytes:
    entries, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        code = CODES.get(tensor.dtype)
        if code is None:
            raise TensorFileError(f"tensor {name!r} has dtype {tensor.dtype}, not one of {DTYPES}")
        entries[name] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_tensors(path: Path, state: Mapping[str, torch.Tensor], overwrite: bool = False) -> str:
    """Write ``state`` to ``path`` in the safetensors format; returns the xxh3-128 of the file.

    With ``overwrite``, ``path`` is an existing file written over in place and cut to the
    new length: on tmpfs that reuses its pages instead of allocating and zeroing new ones.
    """
    tensors = _in_file_order(state)
    digest = xxhash.xxh3_128()
    with open(path, "r+b" if overwrite else "wb") as f:
        for chunk in (_header(tensors), *(_raw(t) for t in tensors.values() if t.numel())):
            digest.update(chunk)
            f.write(chunk)
        f.truncate()
    return digest.hexdigest()


def map_file(path: Path) -> mmap.mmap:
    """A private, copy-on-write mapping of the whole file: tensors over it may be written
    to without touching the file (a read-only one would turn such a write into SIGSEGV;
    MAP_POPULATE would copy every page of a writable private mapping up front)."""
    with open(path, "rb") as f:
        return mmap.mmap(
            f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )


Inspect = Callable[[str, torch.Tensor], str]  # "" when a tensor is acceptable, else why not


def _entries(view: mmap.mmap) -> tuple[int, list[tuple[str, torch.dtype, list[int], int, int]]]:
    """(data start, [(name, dtype, shape, begin, end)] in file order) from the header."""
    try:
        (size,) = struct.unpack_from("<Q", view, 0)
        header = json.loads(view[8 : 8 + size])
        start, out = 8 + size, []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = DTYPES[entry["dtype"]], [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
            count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
            fits = 0 <= begin <= end and start + end <= len(view)
            if count != int(torch.Size(shape).numel()) or not fits:
                raise TensorFileError(f"tensor {name!r}: offsets do not fit shape {shape}")
            out.append((name, dtype, shape, begin, end))
    except TensorFileError:
        raise
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TensorFileError(f"not a safetensors file: {type(exc).__name__}: {exc}") from exc
    return start, sorted(out, key=lambda e: e[3])


def tensors_in(
    view: mmap.mmap, inspect: Inspect | None = None
) -> tuple[dict[str, torch.Tensor], str, str]:
    """(tensors as views of the mapping, xxh3-128 of the file, first problem or "").

    Each tensor's bytes are hashed and then handed to ``inspect`` while they are still
    in the CPU's cache, so checking a reply costs little more than hashing it; at the
    first problem the rest is neither hashed nor inspected, and the digest is "".
    """
    start, entries = _entries(view)
    raw, digest, position, out = memoryview(view), xxhash.xxh3_128(), 0, {}
    for name, dtype, shape, begin, end in entries:
        digest.update(raw[position : start + end])
        position = start + end
        count = int(torch.Size(shape).numel())
        if count == 0:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(view, dtype=dtype, count=count, offset=start + begin)
            tensor = flat.reshape(shape)
        problem = inspect(name, tensor) if inspect is not None else ""
        if problem:
            return {}, "", problem
        out[name] = tensor
    digest.update(raw[position:])
    raw.release()
    return out, digest.hexdigest(), ""
