"""What make_gguf_llama.py and make_gguf_deepseek.py share: reading a kiln synthetic checkpoint
(MaxText names under `params.params.`, bf16 safetensors) lazily, the dummy SentencePiece-style
vocabulary llama-bench needs (it feeds random ids, so only the size matters), and writing a plan
of tensors to a GGUF file one tensor at a time.

A plan is a list of (gguf name, numpy shape [out, in...], GGML type BF16 or F32, producer), the
producer returning the array in that shape and dtype (uint16 bf16 bits, or float32).
"""
import argparse
import json
import struct
import time

import numpy as np
import gguf

BF16 = gguf.GGMLQuantizationType.BF16
F32 = gguf.GGMLQuantizationType.F32


def parse_args(description):
    """--checkpoint, --config, --out; returns (args, the config as a dict)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--checkpoint", required=True, help="model.safetensors of the synthetic checkpoint")
    ap.add_argument("--config", required=True, help="its config.json")
    ap.add_argument("--out", required=True, help="the GGUF file to write")
    a = ap.parse_args()
    with open(a.config) as f:
        return a, json.load(f)


def bf16_to_f32(u16):
    """bf16 bits (uint16) → float32 values, exactly."""
    return (np.ascontiguousarray(u16).astype(np.uint32) << 16).view(np.float32)


def open_checkpoint(path):
    """A function key → the tensor `params.params.<key>` of the safetensors file as a uint16 view
    of the mapped file (bf16 only; nothing is read until the view is used)."""
    with open(path, "rb") as f:
        hlen = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(hlen))
    base = 8 + hlen
    mm = np.memmap(path, dtype=np.uint8, mode="r")

    def tensor(key):
        h = hdr["params.params." + key]
        assert h["dtype"] == "BF16", (key, h["dtype"])
        o0, o1 = h["data_offsets"]
        return mm[base + o0: base + o1].view(np.uint16).reshape(h["shape"])

    return tensor


def add_dummy_vocab(w, vocab_size):
    """<unk>, <s>, </s>, 256 byte tokens, then filler tokens up to vocab_size ("llama" model)."""
    toks = [b"<unk>", b"<s>", b"</s>"] + [("<0x%02X>" % b).encode() for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256
    while len(toks) < vocab_size:
        toks.append(("\u2581tok%d" % len(toks)).encode())
        types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 259 + [-float(k) for k in range(vocab_size - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def write_plan(w, plan, out):
    """The header, metadata and tensor infos, then each tensor as its producer makes it (peak
    memory about one tensor); closes the writer."""
    for name, shape, dt, _ in plan:
        nbytes = int(np.prod(shape)) * (2 if dt == BF16 else 4)
        w.add_tensor_info(name, shape, np.dtype(np.uint16 if dt == BF16 else np.float32), nbytes,
                          raw_dtype=dt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.time()
    for n, (name, shape, dt, fn) in enumerate(plan):
        arr = fn()
        assert tuple(arr.shape) == tuple(shape), (name, arr.shape, shape)
        w.write_tensor_data(arr)
        if n % 9 == 2:
            print("  %3d/%d %s  %.1f s" % (n + 1, len(plan), name, time.time() - t0), flush=True)
    w.close()
    print("wrote %s in %.1f s" % (out, time.time() - t0))
