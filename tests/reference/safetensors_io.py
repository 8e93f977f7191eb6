#!/usr/bin/python3
"""Minimal, dependency-free safetensors reader/writer (numpy + stdlib only).

File format (https://github.com/huggingface/safetensors):
    8 bytes   little-endian u64 N = length of the JSON header
    N bytes   JSON: {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
                     "__metadata__": {"k": "v"}}   (offsets relative to the end of the header)
    rest      raw little-endian tensor bytes

Supported dtypes: F32, BF16 (stored as uint16, produced from f32 by round-to-nearest-even), F16, and
for negative tests also F64 / I64 / I32 / U8 / BOOL (written verbatim from a numpy array).

Sharded checkpoints follow the Hugging Face convention: model-0000i-of-0000n.safetensors plus
model.safetensors.index.json = {"metadata": {...}, "weight_map": {name: filename}}.
"""

import json
import os
import struct

import numpy as np

__all__ = [
    "bf16_round", "f32_to_bf16_bits", "bf16_bits_to_f32", "encode_tensor", "write_safetensors",
    "write_safetensors_raw", "read_header", "read_safetensors", "write_sharded",
    "read_checkpoint", "checkpoint_files",
]

# ------------------------------------------------------------------------------------------------
# bf16 helpers


def f32_to_bf16_bits(x):
    """f32 array -> uint16 bf16 bit patterns, round to nearest even; NaN stays (quiet) NaN.

    uint32 arithmetic: u + 0x7FFF + lsb cannot wrap for any finite or infinite input (only NaN
    bit patterns >= 0xFFFF8000 could, and NaNs are replaced afterwards)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = x.view(np.uint32)
    r = (u >> 16) & 1
    r += u
    r += 0x7FFF
    r >>= 16
    nan = np.isnan(x)
    if nan.any():
        r = np.where(nan, (u >> 16) | 0x0040, r)
    return r.astype(np.uint16)


def bf16_bits_to_f32(bits):
    bits = np.ascontiguousarray(np.asarray(bits, dtype=np.uint16))
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_round(x):
    """Round an array to the nearest bf16 value (RNE); returns float32."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return bf16_bits_to_f32(f32_to_bf16_bits(x)).reshape(x.shape)


# ------------------------------------------------------------------------------------------------
# writing

_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
DTYPE_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}


def encode_tensor(array, dtype):
    """Return the raw little-endian bytes of `array` stored as safetensors dtype `dtype`."""
    if dtype == "BF16":
        return f32_to_bf16_bits(array).tobytes()
    if dtype not in _NUMPY_DTYPES:
        raise ValueError("unsupported dtype %r" % dtype)
    return np.ascontiguousarray(np.asarray(array).astype(_NUMPY_DTYPES[dtype])).tobytes()


def write_safetensors_raw(path, header, data, header_pad=True, header_len=None):
    """Write a file from an already-built header dict (or raw JSON str/bytes) and data bytes.

    `header_len` overrides the length prefix (for corrupt-file tests)."""
    if isinstance(header, dict):
        hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    elif isinstance(header, str):
        hbytes = header.encode("utf-8")
    else:
        hbytes = bytes(header)
    if header_pad and len(hbytes) % 8:
        hbytes += b" " * (8 - len(hbytes) % 8)
    n = len(hbytes) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.write(hbytes)
        f.write(data)


def write_safetensors(path, tensors, metadata=None):
    """tensors: ordered dict name -> (array, dtype) or name -> array (dtype from array: f32/f16/...).

    Tensors are laid out in the given order, back to back."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks = []
    offset = 0
    for name, spec in tensors.items():
        if isinstance(spec, tuple):
            array, dtype = spec
        else:
            array = spec
            dtype = {np.dtype("float32"): "F32", np.dtype("float16"): "F16",
                     np.dtype("float64"): "F64", np.dtype("int64"): "I64",
                     np.dtype("int32"): "I32"}[np.asarray(array).dtype]
        raw = encode_tensor(array, dtype)
        shape = [int(s) for s in np.shape(array)]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    write_safetensors_raw(path, header, b"".join(chunks))


def shard_filename(i, n):
    return "model-%05d-of-%05d.safetensors" % (i + 1, n)


def write_sharded(directory, tensors, num_shards, metadata=None):
    """Split `tensors` (same form as write_safetensors) over `num_shards` files, balancing bytes.

    Returns the path of model.safetensors.index.json."""
    os.makedirs(directory, exist_ok=True)
    names = list(tensors.keys())
    sizes = []
    for n in names:
        spec = tensors[n]
        arr, dt = spec if isinstance(spec, tuple) else (spec, "F32")
        sizes.append(int(np.prod(np.shape(arr), dtype=np.int64)) * DTYPE_SIZES[dt])
    total = sum(sizes)
    target = total / float(num_shards)
    groups = [[] for _ in range(num_shards)]
    acc = 0
    for n, s in zip(names, sizes):
        idx = min(int(acc // target) if target > 0 else 0, num_shards - 1)
        groups[idx].append(n)
        acc += s
    # make sure no shard is empty (move one tensor from the largest neighbour if needed)
    for i in range(num_shards):
        if not groups[i]:
            donor = max(range(num_shards), key=lambda j: len(groups[j]))
            groups[i].append(groups[donor].pop())
    weight_map = {}
    for i, g in enumerate(groups):
        fname = shard_filename(i, num_shards)
        write_safetensors(os.path.join(directory, fname), {n: tensors[n] for n in g}, metadata)
        for n in g:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return index_path


# ------------------------------------------------------------------------------------------------
# reading


def read_header(path):
    """Return (header_dict, data_start_offset). Raises ValueError on a malformed file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("%s: file shorter than the 8-byte header length" % path)
        (n,) = struct.unpack("<Q", prefix)
        if 8 + n > size:
            raise ValueError("%s: header length %d exceeds file size %d" % (path, n, size))
        hbytes = f.read(n)
    header = json.loads(hbytes.decode("utf-8"))
    return header, 8 + n


def read_safetensors(path, as_float32=True):
    """Read every tensor. Floating dtypes are returned as float32 arrays (bf16 widened exactly)."""
    header, start = read_header(path)
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        blob = f.read()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        shape = tuple(info["shape"])
        b, e = info["data_offsets"]
        if start + e > size or b > e:
            raise ValueError("%s: tensor %s data_offsets out of range" % (path, name))
        raw = blob[start + b:start + e]
        count = int(np.prod(shape, dtype=np.int64))
        if len(raw) != count * DTYPE_SIZES[dt]:
            raise ValueError("%s: tensor %s byte length mismatch" % (path, name))
        if dt == "BF16":
            arr = bf16_bits_to_f32(np.frombuffer(raw, dtype="<u2")).reshape(shape)
        else:
            arr = np.frombuffer(raw, dtype=_NUMPY_DTYPES[dt]).reshape(shape)
            if as_float32 and dt in ("F16", "F64"):
                arr = arr.astype(np.float32)
            else:
                arr = arr.copy()
        out[name] = arr
    return out


def checkpoint_files(paths):
    """Expand checkpoint arguments: a .safetensors file, an index JSON, or a directory."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            idx = os.path.join(p, "model.safetensors.index.json")
            if os.path.exists(idx):
                files.extend(checkpoint_files([idx]))
            else:
                files.extend(sorted(os.path.join(p, f) for f in os.listdir(p)
                                    if f.endswith(".safetensors")))
        elif p.endswith(".json"):
            with open(p) as f:
                index = json.load(f)
            base = os.path.dirname(p)
            for fname in sorted(set(index["weight_map"].values())):
                files.append(os.path.join(base, fname))
        else:
            files.append(p)
    return files


def read_checkpoint(paths):
    """Read every tensor of one or more safetensors files / index files into one dict."""
    out = {}
    for f in checkpoint_files(paths):
        for k, v in read_safetensors(f).items():
            if k in out:
                raise ValueError("duplicate tensor %s (in %s)" % (k, f))
            out[k] = v
    return out
