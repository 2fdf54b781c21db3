"""OpenAI's TensorFlow checkpoint read by hand, no TensorFlow, no protobuf: its .index is a
LevelDB table of BundleEntryProtos, each saying where in the data file a variable's bytes are."""
import math
import struct
from pathlib import Path
from beyond.cli import InputError
from beyond.safetensors import DamagedFile, buffer_tensor, map_file
import torch


TABLE_MAGIC = 0xDB4775248B80FB57
TABLE_FOOTER_BYTES = 48  # two block handles, padding, the magic
# TensorFlow's DataType numbers: the floats a GPT-2 can be stored in
TF_FLOAT_DTYPES = {1: torch.float32, 2: torch.float64, 14: torch.bfloat16, 19: torch.float16}
TF_DTYPE_NAMES = {1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8",
                  5: "DT_INT16", 6: "DT_INT8", 7: "DT_STRING", 9: "DT_INT64", 10: "DT_BOOL",
                  14: "DT_BFLOAT16", 19: "DT_HALF"}


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:  # bit by bit: an index is a few kilobytes
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli's polynomial, reflected
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    """The form LevelDB stores a block's checksum in (rotated, plus a constant)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_varint(raw, pos):
    """A protobuf/LevelDB varint at raw[pos:] -> (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise DamagedFile("a number runs past its end")
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def proto_fields(raw):
    """Protobuf wire format -> {field number: [values]}: numbers as ints, the rest bytes."""
    fields, pos = {}, 0
    while pos < len(raw):
        tag, pos = read_varint(raw, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = read_varint(raw, pos)
        elif wire in (1, 2, 5):
            size, pos = read_varint(raw, pos) if wire == 2 else ({1: 8, 5: 4}[wire], pos)
            if pos + size > len(raw):
                raise DamagedFile("a field runs past the end of its entry")
            value = raw[pos:pos + size]
            value, pos = value if wire == 2 else int.from_bytes(value, "little"), pos + size
        else:
            raise DamagedFile(f"an entry has a field of unknown wire type {wire}")
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def block_entries(raw, handle):
    """The (key, value) pairs of one table block; its checksum is checked first."""
    (offset, size), end = handle, len(raw) - TABLE_FOOTER_BYTES
    if offset + size + 5 > end:
        raise DamagedFile(f"a block at byte {offset:,} runs past the end of the file (truncated?)")
    block, kind = raw[offset:offset + size], raw[offset + size]
    (stored_crc,) = struct.unpack("<I", raw[offset + size + 1:offset + size + 5])
    if kind != 0:
        raise DamagedFile(f"a block is compressed (type {kind}); TensorFlow writes them "
                          f"uncompressed")
    if masked_crc32c(block + bytes([kind])) != stored_crc:
        raise DamagedFile(f"the block at byte {offset:,} fails its crc32c check")
    num_restarts = struct.unpack("<I", block[-4:])[0] if size >= 4 else 0
    entries_end = size - 4 - 4 * num_restarts
    if entries_end < 0:
        raise DamagedFile(f"the block at byte {offset:,} is too short")
    entries, pos, key = [], 0, b""
    while pos < entries_end:
        shared, pos = read_varint(block, pos)
        own, pos = read_varint(block, pos)
        value_size, pos = read_varint(block, pos)
        if shared > len(key) or pos + own + value_size > entries_end:
            raise DamagedFile(f"an entry of the block at byte {offset:,} is damaged")
        key = key[:shared] + block[pos:pos + own]  # keys share a prefix with the one before
        entries.append((key, block[pos + own:pos + own + value_size]))
        pos += own + value_size
    return entries


def block_handle(raw, pos=0):
    offset, pos = read_varint(raw, pos)
    size, pos = read_varint(raw, pos)
    return (offset, size), pos


def read_table(raw):
    """A LevelDB-format table -> {key: value}: footer -> index block -> data blocks."""
    if len(raw) < TABLE_FOOTER_BYTES or struct.unpack("<Q", raw[-8:])[0] != TABLE_MAGIC:
        raise DamagedFile("it does not end with a table footer (truncated?)")
    footer = raw[-TABLE_FOOTER_BYTES:]
    _, pos = block_handle(footer)  # the metaindex block: TensorFlow leaves it empty
    index_handle, _ = block_handle(footer, pos)
    table, end = {}, 0
    for _, handle in block_entries(raw, index_handle):
        (offset, size), _ = block_handle(handle)
        if offset < end:  # the blocks follow one another: each checksum is computed once
            raise DamagedFile(f"the index names a block at byte {offset:,}, inside one it "
                              f"named before")
        table.update(block_entries(raw, (offset, size)))
        end = offset + size + 5  # the block, its type and its crc32c
    return table


def first_field(fields, number, kind):
    """The first value of a field, of the type its wire type must give."""
    value = fields.get(number, [kind()])[0]
    if not isinstance(value, kind):
        raise DamagedFile(f"field {number} of an entry has the wrong wire type")
    return value


def bundle_entry(value):
    """A BundleEntryProto -> (dtype, shape, shard, offset, size)."""
    fields = proto_fields(value)
    if 7 in fields:
        raise DamagedFile("a variable is stored in slices (partitioned), which is not read here")
    shape_fields = proto_fields(first_field(fields, 2, bytes))  # TensorShapeProto
    dims = shape_fields.get(2, [])
    if not all(isinstance(dim, bytes) for dim in dims):
        raise DamagedFile("a shape of an entry is damaged")
    shape = tuple(first_field(proto_fields(dim), 1, int) for dim in dims)
    dtype, shard, offset, size = (first_field(fields, n, int) for n in (1, 3, 4, 5))
    return dtype, shape, shard, offset, size


def tf_data_file(prefix, shard, num_shards):
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def read_tf_index(index):
    """model.ckpt.index -> ({name: (dtype, shape, shard, offset, size)}, data files)."""
    try:
        if (size := index.stat().st_size) > 1_000_000:  # checksums: a second a megabyte here
            raise DamagedFile(f"it has {size:,} bytes; GPT-2's has a few thousand")
        table = read_table(index.read_bytes())
        header = proto_fields(table.pop(b"", b""))  # BundleHeaderProto
        num_shards = first_field(header, 1, int) or 1
        if first_field(header, 2, int) != 0:
            raise DamagedFile("its data is big-endian")
        entries = {key.decode("utf-8", "replace"): bundle_entry(value)
                   for key, value in table.items()}
    except DamagedFile as e:
        raise InputError(f"{index} is not a valid TensorFlow checkpoint index: {e}.") from None
    except OSError as e:
        raise InputError(f"cannot read {index}: {e.strerror or e}.") from None
    for name, (dtype, shape, _, _, size) in entries.items():
        if dtype not in TF_FLOAT_DTYPES:
            raise InputError(f"{index}: variable {name} has dtype "
                             f"{TF_DTYPE_NAMES.get(dtype, dtype)}; GPT-2's weights are "
                             f"floats (DT_FLOAT, DT_HALF, DT_BFLOAT16 or DT_DOUBLE).")
        needed = math.prod(shape) * TF_FLOAT_DTYPES[dtype].itemsize
        if size != needed:
            raise InputError(f"{index}: variable {name} has {size:,} bytes but "
                             f"{TF_DTYPE_NAMES[dtype]} x {list(shape)} needs {needed:,}.")
    spans = sorted((shard, offset, offset + size, name)
                   for name, (_, _, shard, offset, size) in entries.items() if size)
    for (sh1, _, e1, n1), (sh2, s2, _, n2) in zip(spans, spans[1:]):
        if sh1 == sh2 and s2 < e1:
            raise InputError(f"{index}: variables {n1} and {n2} overlap in the data file.")
    return entries, num_shards


def read_tf_checkpoint(prefix):
    """{variable name: tensor} of a TensorFlow checkpoint, each a view of the mapped data
    file; the index's checksums are checked, the data's own crc32c not (docs/reference.md)."""
    entries, num_shards = read_tf_index(Path(f"{prefix}.index"))
    buffers, tensors = {}, {}
    for name, (dtype, shape, shard, offset, size) in entries.items():
        data_file = tf_data_file(prefix, shard, num_shards)
        if shard not in buffers:
            buffers[shard] = map_file(data_file)
        if offset + size > len(buffers[shard]):
            raise InputError(f"{data_file} is truncated: variable {name} ends at byte "
                             f"{offset + size:,} and the file has {len(buffers[shard]):,}.")
        tensors[name] = buffer_tensor(buffers[shard], TF_FLOAT_DTYPES[dtype], shape, offset,
                                      offset + size)
    return tensors
