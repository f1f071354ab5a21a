"""Weights by reference: a safetensors file in a folder both sides see, named by its hash.

In a simulation the ServerApp and every client worker share one host, yet a message
carries its 83 MB of ViT-S/16 weights through Ray's pickling and numpy's ``np.save`` /
``np.load`` several times per message. Writing the weights once per round into a
shared-memory folder (``/dev/shm``) and sending only a reference (relative path, xxh3-128
digest, byte count) leaves one write per round on the server, one hash and one copy into
the model per client, and one memory map per reply. A node that cannot read the folder
(another host, another user, a full tmpfs) is found by a probe at the start and keeps
getting the weights in the message.

References are relative to the *reader's* root (``shared_root``): a node on another
host resolves them under its own root, finds nothing, and fails the probe.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from strategies import protocol
from strategies.transport.tensor_file import (
    Inspect,
    TensorFileError,
    map_file,
    tensors_in,
    write_tensors,
)

ROOT_ENV = "FL_SHARED_WEIGHTS_ROOT"  # another root: another tmpfs, or "another host" in tests
DEFAULT_ROOT = Path("/dev/shm") / "fl-task-arithmetic"
SUFFIX = ".safetensors"
SPARE_SUFFIX = ".spare"  # a released reply file: the next write in the folder reuses its pages


class SharedWeightsError(RuntimeError):
    """A reference cannot be resolved or its file does not hash to the stated digest."""


def shared_root() -> Path:
    """The folder references resolve under on this host: ``$FL_SHARED_WEIGHTS_ROOT`` or
    ``/dev/shm/fl-task-arithmetic``."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


@dataclass(frozen=True)
class WeightRef:
    """What a message carries instead of the tensors."""

    name: str  # "<run folder>/<digest>.safetensors", relative to the root
    digest: str  # xxh3-128 of the whole file, hex
    nbytes: int  # tensor bytes (what the message would have carried)

    def record(self) -> ConfigRecord:
        return ConfigRecord({"name": self.name, "digest": self.digest, "bytes": self.nbytes})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> WeightRef:
        try:
            return cls(str(record["name"]), str(record["digest"]), int(record["bytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SharedWeightsError(f"malformed weight reference {dict(record)!r}") from exc


def _npy_header_bytes(tensor: torch.Tensor) -> int:
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(str(tensor.dtype).removeprefix("torch.")))
    fields = {"descr": descr, "fortran_order": False, "shape": tuple(tensor.shape)}
    np.lib.format.write_array_header_1_0(header, fields)
    return header.tell()


def message_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """What the same tensors count in an ArrayRecord (``count_bytes``: name, ``np.save``
    header and data), so communication figures do not depend on how weights travel."""
    return sum(
        len(name) + _npy_header_bytes(t) + t.numel() * t.element_size() for name, t in state.items()
    )


def write_shared(root: Path, folder: str, state: Mapping[str, torch.Tensor]) -> WeightRef:
    """Write ``state`` into ``root/folder`` under its digest; atomic (temp file, rename).

    A reader never sees a partial file: the final name exists only once it is complete.
    Any failure to write (missing folder, full tmpfs) is a ``SharedWeightsError``.
    """
    directory = root / folder
    tmp = directory / f".{uuid.uuid4().hex}.tmp"
    try:
        digest = write_tensors(tmp, state, overwrite=claim_spare(directory, tmp))
        os.replace(tmp, directory / f"{digest}{SUFFIX}")
    except (OSError, TensorFileError) as exc:
        raise SharedWeightsError(f"cannot write into {directory}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return WeightRef(f"{folder}/{digest}{SUFFIX}", digest, message_bytes(state))


def claim_spare(directory: Path, target: Path) -> bool:
    """Rename one spare file of ``directory`` to ``target``; False when none is left.

    Writing over a spare's pages on tmpfs skips allocating and zeroing them, which a new
    file needs, and the server no longer unlinks each file of a round. A rename is
    atomic: two writers never get the same spare.
    """
    try:
        spares = [e.name for e in os.scandir(directory) if e.name.endswith(SPARE_SUFFIX)]
    except OSError:
        return False
    for name in spares:
        try:
            os.rename(directory / name, target)
            return True
        except OSError:  # another writer took it first
            continue
    return False


def resolve(root: Path, name: str) -> Path:
    """``root/name`` for a reference name of the form ``<folder>/<file>.safetensors``."""
    path = PurePosixPath(name)
    parts = path.parts
    bad_part = any(p in ("", ".", "..") or "/" in p for p in parts)
    if path.is_absolute() or len(parts) != 2 or bad_part or not name.endswith(SUFFIX):
        raise SharedWeightsError(f"weight reference {name!r} is not '<folder>/<file>{SUFFIX}'")
    return root / parts[0] / parts[1]


def read_shared(
    root: Path, ref: WeightRef, inspect: Inspect | None = None, remember: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of ``ref`` as views of a private memory map, after checking its digest.

    ``inspect`` sees each tensor right after its bytes were hashed and may refuse it (a
    ``SharedWeightsError`` with its reason). With ``remember`` (a node's global weights),
    the last file read is kept mapped and handed out again, unhashed, while its identity
    (device, inode, size, mtime) is unchanged: a worker reads one global file for every
    client of a round, and mapping it again would fault its pages in per client. The
    tensors are then shared by those callers: read them, never write.
    """
    path = resolve(root, ref.name)
    try:
        identity = _identity(path)
        if remember and _LAST_GLOBAL is not None and _LAST_GLOBAL[:2] == (ref.digest, identity):
            return dict(_LAST_GLOBAL[2])
        view = map_file(path)
    except (OSError, ValueError) as exc:  # missing, unreadable, or empty
        raise SharedWeightsError(f"cannot read {ref.name} under {root}: {exc}") from exc
    try:
        state, digest, problem = tensors_in(view, inspect)
    except TensorFileError as exc:
        raise SharedWeightsError(f"{ref.name} under {root}: {exc}") from exc
    if problem:
        raise SharedWeightsError(problem)
    if digest != ref.digest:
        raise SharedWeightsError(f"{ref.name} under {root} hashes to {digest}, not {ref.digest}")
    if remember:
        _remember(ref.digest, identity, state)
    return state  # the tensors keep the mapping alive; it goes with them


_LAST_GLOBAL: tuple[str, tuple[int, int, int, int], dict[str, torch.Tensor]] | None = None


def _remember(digest: str, identity: tuple[int, int, int, int], state: dict) -> None:
    """Keep one verified global file mapped (the previous one is let go)."""
    global _LAST_GLOBAL
    _LAST_GLOBAL = (digest, identity, dict(state))


def _identity(path: Path) -> tuple[int, int, int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def ref_folder(ref: WeightRef) -> str:
    """The run folder a reference lives in (a reply by reference goes to the same one)."""
    return PurePosixPath(ref.name).parts[0]


def ref_file(ref: WeightRef) -> str:
    """The file name of a reference inside its run folder."""
    return PurePosixPath(ref.name).name


# ---- a node's side ---------------------------------------------------------------------------
def reply_records(
    request: RecordDict, key: str, state: Mapping[str, torch.Tensor]
) -> dict[str, ArrayRecord | ConfigRecord]:
    """``state`` as a reply carries it: by reference into the request's folder when the
    request's weights came by reference, else (or when writing fails) as an ArrayRecord."""
    sent = request.config_records.get(protocol.ref_key(protocol.ARRAYS))
    if sent is not None:
        try:
            ref = write_shared(shared_root(), ref_folder(WeightRef.from_record(sent)), state)
            return {protocol.ref_key(key): ref.record()}
        except SharedWeightsError as exc:  # a full or vanished tmpfs: the message still works
            print(f"reply in the message: cannot write to {shared_root()}: {exc}", flush=True)
    return {key: ArrayRecord(dict(state))}


def answer_probe(request: RecordDict) -> ConfigRecord | None:
    """A node's answer to the server's probe: the reference of a file it wrote next to the
    probe after reading it, or the reason it cannot (the server then sends in messages)."""
    probe = request.config_records.get(protocol.SHARED_PROBE)
    if probe is None:
        return None
    try:
        ref = WeightRef.from_record(probe)
        seen = read_shared(shared_root(), ref)
        mine = {name: t.flip(0) for name, t in seen.items()}  # another file than the probe
        answer = write_shared(shared_root(), ref_folder(ref), mine)
    except SharedWeightsError as exc:
        return ConfigRecord({"problem": " ".join(str(exc).split())})
    return answer.record()


# ---- the run folder ------------------------------------------------------------------------
def _start_ticks(pid: int) -> str | None:
    """A process's start time (psutil, in 1/100 s): with the pid, it names one process."""
    try:
        return str(round(psutil.Process(pid).create_time() * 100))
    except psutil.Error:
        return None


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


@dataclass(frozen=True)
class RunFolder:
    """The server's folder for one run: ``run-<host>-<run id>-<pid>-<start ticks>``.

    The name says which process owns it, so a later start on the same host removes the
    folders of runs whose process is gone (a killed run leaves no files behind for long).
    """

    root: Path
    name: str

    @property
    def path(self) -> Path:
        return self.root / self.name

    @classmethod
    def create(cls, root: Path, run_id: int) -> RunFolder:
        """Remove stale folders of this host, then make this run's (owner-only access)."""
        remove_stale(root)
        root.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        folder = cls(root, f"run-{_host()}-{run_id}-{pid}-{_start_ticks(pid)}")
        folder.path.mkdir(mode=0o700)
        return folder

    def clear(self, keep: set[str] = frozenset(), recycle: set[str] = frozenset()) -> None:
        """Remove the folder's files but ``keep`` (after a round: replies, old weights);
        those named in ``recycle`` that this process no longer maps become spares.

        Only files no process can still map may be written over: a worker maps the
        global weights, so only replies (mapped by this process alone) are recycled, and
        only when ``/proc/self/maps`` shows no mapping of them left. Spares beyond the
        round's recycled files are removed, so they never outnumber a round's replies.
        """
        mapped = _mapped_paths()
        if mapped is None:  # cannot tell: nothing is recycled
            recycle, mapped = frozenset(), set()
        spares = []
        for entry in self.path.iterdir():
            if entry.name in keep:
                continue
            if entry.name.endswith(SPARE_SUFFIX):
                spares.append(entry)
            elif entry.name in recycle and os.path.realpath(entry) not in mapped:
                spare = entry.with_name(f"{uuid.uuid4().hex}{SPARE_SUFFIX}")
                entry.rename(spare)
                spares.insert(0, spare)
            else:
                entry.unlink(missing_ok=True)
        for extra in spares[len(recycle) :]:
            extra.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _mapped_paths() -> set[str] | None:
    """The files this process maps (``/proc/self/maps``), None where that cannot be read.

    Not psutil's ``memory_maps()``: it reads ``/proc/self/smaps``, whose per-mapping memory
    counts the kernel computes on each read; with torch loaded (about 600 mappings) that
    took 14 ms against 0.5 ms here (2026-12-07, this VM), once a round, for paths only.
    """
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    return {fields[5] for fields in (line.split(maxsplit=5) for line in lines) if len(fields) > 5}


def remove_stale(root: Path) -> list[str]:
    """Remove run folders of this host whose owning process is gone; returns their names."""
    if not root.is_dir():
        return []
    removed = []
    prefix = f"run-{_host()}-"
    for entry in root.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            _run_id, pid, ticks = entry.name.removeprefix(prefix).split("-")
            alive = _start_ticks(int(pid)) == ticks
        except ValueError:
            continue  # not a name this module wrote
        if not alive:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed
