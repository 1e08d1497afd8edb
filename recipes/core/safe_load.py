"""The trust boundary for checkpoints: no pickle ever reaches an unrestricted unpickler.

camelid's own state is JSON or safetensors. Two libraries it drives write pickles:
- torch DCP writes `dcp/.metadata` (dataclasses of names, shapes and file offsets) and reads it
  back with a plain `pickle.load` (`FileSystemReader.read_metadata`). `SafeFileSystemReader`
  reads it with `RestrictedUnpickler` instead: every global must be one of the exact
  (module, name) pairs of `DCP_METADATA_GLOBALS`, a name with a dot in it is refused (pickle
  protocol 4 resolves dotted names, so `module` + `os.system` would reach any function that
  module imports), persistent ids are refused, and the storage entries must name plain files
  beside the metadata. DCP's tensors are read by torch with `weights_only=True`; its other
  values go through `SafeLoadPlanner.load_bytes`, also `weights_only=True`.
- DeepSpeed writes `*_model_states.pt` / `*_optim_states.pt` with `torch.save` and reads them
  with `torch.load(weights_only=False)` (its TorchCheckpointEngine, and zero_to_fp32 when
  converting). Inside `deepspeed_loads_weights_only()` torch's own switch
  (TORCH_FORCE_WEIGHTS_ONLY_LOAD) turns every such call into `weights_only=True`: torch's
  restricted unpickler, with the three DeepSpeed classes those files hold allowed by exact name
  (`torch.serialization.safe_globals`). Nothing is patched.

Verification (recipes/core/checkpoint.py) runs these same loaders before a resume or a
conversion, so a crafted file is refused there with a message, and refused again by the load
itself should anything skip verification: there is no scan-then-load gap.

Why no pickle scanner (picklescan, fickling, modelscan) as a second layer: they decide by
lists of known-dangerous globals and heuristics, and report; the loaders here admit an exact
allowlist at the moment of loading and build nothing else. Every file camelid unpickles goes
through one of them, so a scanner could only agree or raise false alarms, at the price of a
dependency.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader


class UnsafeCheckpoint(RuntimeError):
    """A file that would run code, or reach outside its checkpoint, if loaded."""


def _dtypes() -> dict:
    return {("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}


DCP_METADATA_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "ChunkStorageMetadata",
    "BytesStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)


def _dcp_metadata_globals() -> dict:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("pathlib", "PosixPath"): Path(".").__class__,  # storage_meta.checkpoint_id
        ("torch", "Size"): torch.Size,
        # torch.layout pickles as _get_layout("torch.strided"): a lookup in torch's own layouts
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
        **_dtypes(),
    }
    for name in DCP_METADATA_CLASSES:
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only the exact globals in `allowed` ((module, name) -> object).

    Every opcode that imports (GLOBAL, STACK_GLOBAL, INST, EXT1/2/4) goes through find_class;
    every opcode that calls (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, BUILD) can only call what
    find_class returned, or a builtin container; persistent ids are refused outright."""

    def __init__(self, file, allowed: dict, where: str):
        super().__init__(file)
        self.allowed, self.where = allowed, where

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name)) if "." not in name else None
        if found is None:
            raise UnsafeCheckpoint(f"{self.where} refuses to unpickle {module}.{name}")
        return found

    def persistent_load(self, pid):
        raise UnsafeCheckpoint(f"{self.where} refuses a pickle persistent id ({pid!r:.60})")


def restricted_loads(data: bytes, allowed: dict, where: str):
    """Unpickle `data` with RestrictedUnpickler; anything else wrong with it (truncated,
    garbled, another format) is an UnsafeCheckpoint naming `where` as well."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, where).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # pickle raises many kinds on garbage: all mean "not this file"
        raise UnsafeCheckpoint(
            f"{where} is not a readable pickle ({type(e).__name__}: {e})"
        ) from None


def load_dcp_metadata(path: Path):
    """DCP's `.metadata`, unpickled with the exact allowlist, its storage entries checked to
    name plain files in the same folder (no path leaves the checkpoint)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    where = f"{path.parent.name}/{path.name}"
    loaded = restricted_loads(path.read_bytes(), _dcp_metadata_globals(), where)
    if not isinstance(loaded, Metadata):
        raise UnsafeCheckpoint(f"{where} holds a {type(loaded).__name__}, not DCP metadata")
    for info in (loaded.storage_data or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if not name or name != Path(name).name or name in (".", ".."):
            raise UnsafeCheckpoint(f"{where} points outside its folder ({name!r})")
    return loaded


class SafeFileSystemReader(FileSystemReader):
    """torch DCP's file reader, with `.metadata` read by load_dcp_metadata (torch's own reads
    it with a plain pickle.load). A refusal is kept in `refused`: DCP turns the exceptions of
    its readers into text."""

    refused: UnsafeCheckpoint | None = None

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        try:
            metadata = load_dcp_metadata(Path(self._get_metadata_path(rank)))
        except UnsafeCheckpoint as e:
            self.refused = e
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but a checkpoint's non-tensor values (torch.save bytes) are read
    with weights_only=True; the default reads them with weights_only=False."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def dcp_load(state: dict, folder: Path, **kwargs) -> None:
    """torch DCP's load through SafeFileSystemReader and SafeLoadPlanner. DCP reports a
    failure as a CheckpointException (a BaseException, past every `except Exception`) that
    wraps each rank's error, some as text; a refusal comes back out as the UnsafeCheckpoint
    it was."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        reader = SafeFileSystemReader(folder)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as e:
        if reader.refused is not None:
            raise reader.refused from None
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        refused = [c for c in causes if isinstance(c, UnsafeCheckpoint | pickle.UnpicklingError)]
        if refused:
            raise UnsafeCheckpoint(torch_refusal(refused[0])) from None
        raise


def deepspeed_globals() -> list:
    """The classes DeepSpeed's ZeRO-2/3 state files hold (collected from real checkpoints of
    every strategy, with and without adapters): its loss scaler, the ZeRO stage enum, and the
    named tuple of a parameter's fragment address."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def deepspeed_loads_weights_only():
    """Every torch.load inside (DeepSpeed's load_checkpoint, zero_to_fp32) is weights_only=True,
    whatever the call site says, with deepspeed_globals() allowed by exact name."""
    switches = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.pop(k, None) for k in switches}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(torch_refusal(e)) from None
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def torch_refusal(error: Exception) -> str:
    """What torch's weights-only unpickler refused, in a few words (its message is a page)."""
    text = " ".join(str(error).split())
    found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", text, re.I)
    if found:
        return f"refuses to unpickle {found[1] or found[2]}"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"refuses pickle opcode {int(found[1])} ({chr(int(found[1]))!r})"
    return f"refuses to load it ({text[:200]})"


def check_torch_file(path: Path) -> None:
    """Load a torch.save file as a resume would (weights_only, DeepSpeed's classes allowed),
    without reading its tensors (mmap): raises UnsafeCheckpoint if it holds anything else."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"{path.name} {torch_refusal(e)}") from None
    except Exception as e:  # not a torch.save file at all (garbled, truncated)
        why = " ".join(str(e).split())[:200]
        raise UnsafeCheckpoint(
            f"{path.name} is not a readable torch file ({type(e).__name__}: {why})"
        ) from None


def check_pickle_file(path: Path) -> None:
    """The check verification runs on a checkpoint file that holds a pickle: DCP metadata
    through load_dcp_metadata, torch.save files (.pt, .bin) through check_torch_file. Other
    files (safetensors, JSON, DCP's .distcp shards, read weights_only by torch) pass."""
    path = Path(path)
    if path.name.endswith(".metadata"):
        load_dcp_metadata(path)
    elif path.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle"):
        check_torch_file(path)
