#!/usr/bin/python3
"""Held-out perplexity of a DeepSeek-family checkpoint with the project's numpy reference.

numpy only (no torch, no sentencepiece): the forward pass is deepseek_ref.RefModel (MaxText's
bf16 rounding points, docs/maxtext.md §2), adapters are read and merged by lora_ref (docs/maxtext.md §4.1).

    perplexity_ref.py CKPT_DIR [--tokens FILE] [--adapter ADAPTER_DIR [--mode merged|runtime]]
                      [--lora-scale S] [--bos ID] [--eos ID] [--limit N] [--json]

CKPT_DIR holds model.safetensors and config.yml (models/default/ does). --tokens defaults to
CKPT_DIR/heldout.tokens: one line per text line, comma-separated token ids WITHOUT bos/eos.
bos/eos default to CKPT_DIR/reference.json's tokenizer ids (else 1 and 2).

Definition (shared with tools/train_default.py and the engine): for each line,
ids = [bos] + line + [eos]; one sequence per line with positions from 0; every next token ids[1:]
is scored; ppl = exp(sum NLL / number of predicted tokens), NLL from the f32 logits in f64.

Adapter modes:
  merged   W' = bf16(W + s*A@B) (lora_ref.merged_model, what `kiln export --merge-lora` writes)
  runtime  base bf16 weights, A and B as stored, every adapted projection y = bf16(x.W + s(x.A).B)
           (evaluated in f64, one rounding at the projection's output, where MaxText rounds).
           Implemented by routing deepseek_ref's own projection (matmul_bf16) through the adapter
           for the adapted weights; the rest of the forward pass is deepseek_ref unchanged.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_ref as dr  # noqa: E402
import lora_ref  # noqa: E402


def read_token_lines(path):
    lines = []
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            raw = raw.strip()
            if not raw:
                continue
            try:
                lines.append([int(t) for t in raw.split(",")])
            except ValueError:
                raise SystemExit("%s: line %d is not comma-separated token ids" % (path, n))
    if not lines:
        raise SystemExit("%s: no token lines" % path)
    return lines


def default_special_ids(ckpt_dir):
    ref = os.path.join(ckpt_dir, "reference.json")
    if os.path.exists(ref):
        with open(ref) as f:
            tok = json.load(f).get("tokenizer", {})
        if "bos_id" in tok and "eos_id" in tok:
            return int(tok["bos_id"]), int(tok["eos_id"])
    return 1, 2


def base_model(ckpt_dir):
    cfg = dr.load_config(os.path.join(ckpt_dir, "config.yml"))
    g, layers = dr.load_raw_weights([os.path.join(ckpt_dir, "model.safetensors")], cfg)
    return cfg, g, layers


@contextlib.contextmanager
def runtime_adapter(model, pairs, user_scale):
    """Make deepseek_ref's projections apply y = bf16(x.W + s(x.A).B) for the adapted weights.

    The adapted kernels are found by identity of their (bf16-rounded) arrays in model.layers;
    RefModel passes them to dr.matmul_bf16 as is or as a reshaped view of the same memory."""
    table = {}
    for (layer, module), p in pairs.items():
        w = model.layers[layer][module + "/kernel"]
        table[w.__array_interface__["data"][0]] = (w.size, p.a2, p.b2,
                                                   float(p.scale) * float(user_scale))
    orig = dr.matmul_bf16
    hits = set()

    def matmul_bf16(a, b):
        if isinstance(b, np.ndarray):
            hit = table.get(b.__array_interface__["data"][0])
            if hit is not None and hit[0] == b.size:
                _, a2, b2, s = hit
                x = np.asarray(a, dtype=np.float64)
                w = np.asarray(b, dtype=np.float64).reshape(a2.shape[0], b2.shape[1])
                hits.add(id(hit))
                return dr.bf16((x @ w + s * ((x @ a2) @ b2)).astype(np.float32))
        return orig(a, b)

    dr.matmul_bf16 = matmul_bf16
    try:
        yield hits
    finally:
        dr.matmul_bf16 = orig


def line_nll(model, ids):
    logits = model.logits(ids[:-1]).astype(np.float64)              # [T, V]
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    tgt = np.asarray(ids[1:])
    return float((lse - logits[np.arange(len(tgt)), tgt]).sum()), len(tgt)


def perplexity(model, lines, bos, eos):
    nll, n = 0.0, 0
    for toks in lines:
        a, b = line_nll(model, [bos] + list(toks) + [eos])
        nll += a
        n += b
    return math.exp(nll / n), nll / n, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt_dir", help="directory with model.safetensors and config.yml")
    ap.add_argument("--tokens", help="token lines (default: CKPT_DIR/heldout.tokens)")
    ap.add_argument("--adapter", help="MaxText/PEFT LoRA adapter directory")
    ap.add_argument("--mode", choices=["merged", "runtime"], default="merged",
                    help="how the adapter is applied (default: merged)")
    ap.add_argument("--lora-scale", type=float, default=1.0,
                    help="multiplies the adapter's alpha/r (default: 1)")
    ap.add_argument("--bos", type=int, help="bos id (default: from reference.json, else 1)")
    ap.add_argument("--eos", type=int, help="eos id (default: from reference.json, else 2)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N lines")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)

    t0 = time.time()
    lines = read_token_lines(a.tokens or os.path.join(a.ckpt_dir, "heldout.tokens"))
    if a.limit:
        lines = lines[:a.limit]
    bos, eos = default_special_ids(a.ckpt_dir)
    bos = bos if a.bos is None else a.bos
    eos = eos if a.eos is None else a.eos
    cfg, g, layers = base_model(a.ckpt_dir)
    mode = "base"
    if a.adapter is None:
        model = dr.RefModel(cfg, g, layers)
        ppl, nll, n = perplexity(model, lines, bos, eos)
    elif a.mode == "merged":
        mode = "lora_merged"
        model = lora_ref.merged_model(None, [a.adapter], a.lora_scale, base=(cfg, g, layers))
        ppl, nll, n = perplexity(model, lines, bos, eos)
    else:
        mode = "lora_runtime"
        model = dr.RefModel(cfg, g, layers)
        _, pairs = lora_ref.read_adapter(a.adapter, cfg)
        with runtime_adapter(model, pairs, a.lora_scale) as hits:
            ppl, nll, n = perplexity(model, lines, bos, eos)
        if len(hits) != len(pairs):
            raise SystemExit("runtime adapter: %d of %d adapted projections were used"
                             % (len(hits), len(pairs)))
    out = {"perplexity": ppl, "mean_nll": nll, "lines": len(lines), "predicted_tokens": n,
           "mode": mode, "bos_id": bos, "eos_id": eos, "seconds": round(time.time() - t0, 1)}
    if a.json:
        print(json.dumps(out))
    else:
        print("%s perplexity %.4f (mean NLL %.5f over %d tokens, %d lines, %.1fs)"
              % (mode, ppl, nll, n, len(lines), out["seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
