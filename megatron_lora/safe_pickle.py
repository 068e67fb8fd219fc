"""A megatron dist-checkpoint's pickles, checked without running code from them.

Reading a dist-checkpoint unpickles three kinds of data: torch's ``.metadata`` (plain
``pickle.load`` in ``FileSystemReader.read_metadata``), megatron's ``common.pt`` (``torch.load``),
and every byte item inside the ``.distcp`` files (megatron's ShardedObjects, such as each
layer's ``_extra_state``: ``torch.load(weights_only=False)`` in torch's load planner). A crafted
checkpoint can put a ``__reduce__`` payload in any of them. :func:`check_dist_checkpoint` reads
each of them first with an unpickler that admits only the types a checkpoint's metadata is made
of, and refuses the directory with one line naming the file otherwise; only then may megatron
read it. Tensor data itself is read by torch with ``weights_only=True``.
"""

from __future__ import annotations

import _compat_pickle
import enum
import io
import pickle
import sys
import zipfile
from pathlib import Path

import torch

from .errors import MegatronLoraError
from .untrusted import read_json, short


class UnsafeCheckpointError(MegatronLoraError):
    """A dist-checkpoint file that holds something other than checkpoint data (it could run
    code when unpickled), or that cannot be read as such."""


# what torch's .metadata and megatron's common.pt / ShardedObjects are made of
_METADATA = "torch.distributed.checkpoint.metadata"
_PLANNER = "torch.distributed.checkpoint.planner"
_ALLOWED = {
    (_METADATA, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    (_PLANNER, name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
        "LoadItemType")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("argparse", "Namespace"),  # Megatron-LM's common.pt keeps its args
    ("builtins", "set"), ("builtins", "frozenset"),
}
# tensors inside common.pt or a ShardedObject: their storage is not read while checking
_TENSOR_REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                      ("torch._utils", "_rebuild_parameter")}


def _not_built(*_args, **_kwargs):
    return None


class _CheckpointUnpickler(pickle.Unpickler):
    """Builds only checkpoint data; any other global is refused before it is looked up."""

    def __init__(self, stream, path):
        super().__init__(stream)
        self.path = path

    def find_class(self, module, name):
        # protocol 2 (torch.save's) spells Python 3 names the Python 2 way (__builtin__.set)
        module, name = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if (module, name) in _ALLOWED:
            return getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
        if (module, name) in _TENSOR_REBUILDERS:
            return _not_built
        public = name.isidentifier() and not name.startswith("_")  # no lazy submodule imports
        if module == "torch" and public and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return _not_built  # the storage type a tensor names: nothing is allocated
        # megatron's own enums (an AttnBackend in Megatron-LM's args): values, no code
        found = getattr(sys.modules.get(module), name, None) \
            if public and module.startswith("megatron.") else None
        if isinstance(found, type) and issubclass(found, enum.Enum):
            return found
        raise UnsafeCheckpointError(
            f"{self.path} refers to {short(module + '.' + name)}, which no checkpoint data is "
            f"made of; it is refused unread (unpickling it could run code)")

    def persistent_load(self, pid):  # a tensor's storage in a torch archive: not read here
        return None


def _unpickle(data: bytes, path):
    try:
        return _CheckpointUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # a damaged pickle fails in many ways
        raise UnsafeCheckpointError(f"{path} cannot be read as checkpoint data "
                                    f"({type(error).__name__}: {short(str(error))})") from None


# A checkpoint's pickles describe tensors, they do not hold them: far below these sizes. A
# larger one (a sparse or zip-bombed file) is refused before it is read into memory.
MAX_PICKLE_BYTES = 256 << 20


def _too_large(size: int, path) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{path}: its pickle is {size} bytes, more than checkpoint "
                                 f"metadata ever needs ({MAX_PICKLE_BYTES} bytes); refused unread")


def _check_torch_archive(data, path) -> None:
    """A ``torch.save`` archive (a zip holding ``*/data.pkl``: bytes, or a file's path); the
    legacy format is refused."""
    try:
        with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1:
                raise zipfile.BadZipFile(f"{len(pickles)} data.pkl entries")
            size = archive.getinfo(pickles[0]).file_size
            if size > MAX_PICKLE_BYTES:
                raise _too_large(size, path)
            payload = archive.read(pickles[0])
    except UnsafeCheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise UnsafeCheckpointError(f"{path} is not a torch.save archive ({short(str(error))}); "
                                    f"only that format is read") from None
    _unpickle(payload, path)


def _read_range(path: Path, offset, length) -> bytes:
    if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0
            and offset + length <= path.stat().st_size):
        raise UnsafeCheckpointError(f"{path}: an item at offset {short(offset)}, length "
                                    f"{short(length)} lies outside the file")
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def _check_metadata(path: Path, directory: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise _too_large(size, path)
    metadata = _unpickle(path.read_bytes(), path)
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict) \
            or not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{path} does not hold torch dist-checkpoint metadata")
    for index, info in metadata.storage_data.items():
        if not (isinstance(index, MetadataIndex) and isinstance(index.fqn, str)):
            raise UnsafeCheckpointError(f"{path}: a storage entry is keyed by {short(index)}, "
                                        f"not a tensor's index")
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name \
                or name in (".", ".."):
            raise UnsafeCheckpointError(f"{path} names the data file {short(name)}, which is not "
                                        f"a file name inside {directory}")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{path}: {short(index.fqn)} is stored with transforms "
                                        f"{short(info.transform_descriptors)}, which are not read")
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            data_file = directory / name
            if not data_file.is_file():
                raise UnsafeCheckpointError(f"{path} names {data_file}, which does not exist")
            _check_torch_archive(_read_range(data_file, info.offset, info.length),
                                 f"{data_file} (item {short(index.fqn)})")


def check_dist_checkpoint(directory) -> None:
    """Refuse a megatron dist-checkpoint directory whose pickles hold anything but checkpoint
    data (UnsafeCheckpointError naming the file); call before megatron or torch reads it."""
    directory = Path(directory)
    try:
        if (directory / "metadata.json").is_file():  # megatron's: bounded like every JSON read
            read_json(directory / "metadata.json", UnsafeCheckpointError)
        for path in sorted(directory.iterdir()):
            if path.name.endswith(".metadata") and path.is_file():
                _check_metadata(path, directory)
        for path in sorted(directory.rglob("*.pt")):  # common.pt and any ShardedObject file
            if path.is_file():
                _check_torch_archive(path, path)
    except OSError as error:
        raise UnsafeCheckpointError(f"{directory} cannot be read: {error}") from None
