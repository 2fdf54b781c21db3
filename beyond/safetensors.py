"""safetensors files by hand: the header checked against the file before any
tensor is read, tensors memory-mapped; and the writer of checkpoints."""
import ctypes
import errno
import json
import math
import mmap
import os
import struct
from pathlib import Path
from beyond.cli import InputError, parse_json
import torch


# dtype name in the file -> torch dtype
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool}


class DamagedFile(Exception):
    """A problem inside a file, safetensors or TensorFlow's; the caller names the file."""


def read_safetensors_header(path):
    """({name: (dtype, shape, start, end)}, offsets from the file's start; __metadata__),
    all checked before any tensor is read: a crafted or truncated file fails here."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not a safetensors file.")
    try:
        file_size = os.path.getsize(path)
        if file_size < 8:
            raise DamagedFile(f"it has {file_size} bytes, fewer than the 8-byte header length")
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100_000_000:  # the Hub's own readers refuse larger headers too
                raise DamagedFile(f"its header claims {header_len:,} bytes (more than 100 MB)")
            if 8 + header_len > file_size:
                raise DamagedFile(f"its header claims {header_len:,} bytes but the file "
                                  f"has {file_size:,} (truncated?)")
            raw_header = f.read(header_len)
        try:
            header = parse_json(raw_header.decode("utf-8"))
        except ValueError as e:  # not UTF-8, not JSON, too deep or too long a number
            raise DamagedFile(f"its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise DamagedFile("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise DamagedFile("__metadata__ is not a map of strings to strings")
        entries = {name: header_entry(name, info, 8 + header_len, file_size)
                   for name, info in header.items()}
        check_tiling(entries, 8 + header_len, file_size)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}.") from None
    except DamagedFile as e:
        raise InputError(f"{path} is not a valid safetensors file: {e}.") from None
    return entries, metadata


def check_tiling(entries, data_start, file_size):
    """The tensors must tile the data area exactly, or the header's length or an
    offset is wrong and every tensor read would be shifted."""
    spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items())
    position, previous = data_start, None
    for start, end, name in spans:
        if start < position:
            raise DamagedFile(f"tensors {previous!r} and {name!r} overlap")
        if start > position:
            after = f"after tensor {previous!r}" if previous else "before the first tensor"
            raise DamagedFile(f"{start - position:,} bytes of the data area {after} belong to "
                              f"no tensor")
        position, previous = end, name
    if position != file_size:
        raise DamagedFile(f"the file has {file_size - position:,} bytes after the last tensor "
                          f"(a wrong header length?)")


def header_entry(name, info, data_start, file_size):
    """One tensor's header entry -> (dtype, shape, start, end), checked."""
    if not isinstance(info, dict):
        raise DamagedFile(f"tensor {name!r} has no description")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:  # a list is unhashable
        raise DamagedFile(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise DamagedFile(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise DamagedFile(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    if offsets[1] > file_size - data_start:
        raise DamagedFile(f"tensor {name!r} ends at byte {offsets[1]:,} of the data area, "
                          f"which has {file_size - data_start:,} bytes (truncated?)")
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise DamagedFile(f"tensor {name!r} has {offsets[1] - offsets[0]:,} bytes but {dtype} "
                          f"x {shape} needs {expected:,}")
    return dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]


def map_file(path):
    """A copy-on-write memory map of a whole file (b"" when empty)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}.") from None


def buffer_tensor(buffer, dtype, shape, start, end):
    """A tensor viewing buffer[start:end]: nothing is copied until used."""
    if end == start:  # torch.frombuffer refuses to view no bytes
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=(end - start) // dtype.itemsize,
                            offset=start).view(shape)


def load_safetensors(path):
    """All tensors of a file as views of a memory map, and the metadata."""
    entries, metadata = read_safetensors_header(path)
    buffer = map_file(path)
    return {name: buffer_tensor(buffer, SAFETENSORS_DTYPES[dtype], shape, start, end)
            for name, (dtype, shape, start, end) in entries.items()}, metadata


def tensor_bytes(t):
    """The raw bytes of a tensor, in its own dtype (bfloat16 included), on the CPU."""
    t = t.detach().contiguous().cpu()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def save_safetensors(tensors, path, metadata=None):
    """Writes tensors atomically (a temporary file renamed over path), the data and
    tensors of whole 64-byte lines first 64-byte aligned: a memory-mapped tensor is
    then as aligned as one in memory, so the CPU's kernels give the same bits."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    tensors = {name: tensors[name] for name in sorted(tensors, key=lambda n: sizes[n] % 64 > 0)}
    header, offset = {}, 0
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    for name, t in tensors.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 64)  # the data starts 64-byte aligned
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: ranks may race
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            write_all(fd, struct.pack("<Q", len(raw)) + raw)
            for t in tensors.values():
                write_all(fd, tensor_bytes(t))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}; {write_kept(path)}.") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_kept(path):
    """What a failed write of path leaves: the file as it was, or none."""
    return f"{path} is unchanged" if Path(path).exists() else "nothing was written"


def write_all(fd, data, offset=None):
    """Writes every byte of data at the file position (or at offset): os.write and
    os.pwrite may write fewer bytes than asked; no progress means the disk is full."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        if offset is not None:
            offset += written
