#!/usr/bin/python3
"""Independent numpy reference of the MaxText Llama-family forward pass (llama2 / mistral / qwen3).

Written from docs/maxtext.md (§1, §2.1-2.4, §9, §11), not from kiln's C++.

Entry points:
    reference_logits(checkpoint_paths, config, tokens, ...) -> np.ndarray [T, V] float32
    reference_greedy(checkpoint_paths, config, tokens, n, ...) -> list[int]
    RefModel.load(checkpoint_paths, config, ...)   (load once, then .logits(tokens) / .greedy(...))

`checkpoint_paths`: a .safetensors file, a model.safetensors.index.json, a directory, or a list.
`config`: a dict with MaxText field names, or a path to a JSON config or a MaxText model .yml.
`overrides`: iterable of "key=value" strings (like `kiln export --set`).
`scan_axis`: overrides param_scan_axis (like `kiln export --scan-axis`).

Numerics (MaxText defaults: dtype bf16, weights rounded to bf16 once = "the same bf16-rounded
weights the engine runs"). bf16 rounding is emulated with round-to-nearest-even on float32 arrays;
matmuls are done in float64 on bf16-valued inputs and the result is rounded to bf16 once.
Rounding points (docs/maxtext.md §2.1, §2.2, §2.3, §2.6, §11):
  * embedding gather: bf16 table -> bf16 activations
  * RMSNorm: x->f32, y = x*rsqrt(mean(x^2)+eps) (f32), y->bf16, out = bf16(y * scale_bf16)
  * every projection output (q, k, v, out, wi_0, wi_1, wo, logits) -> bf16
  * qwen3: per-head RMSNorm of q and k (same numerics, over head_dim) before RoPE
  * RoPE default (half-split): angles f32, sin/cos rounded to bf16 first, x*cos + rot(x)*sin in
    higher precision, output -> bf16.  llama3.1 (interleaved, scaled freqs): sin/cos stay f32,
    output -> bf16.
  * qwen3: q = bf16(q * bf16(head_dim^-0.5)) after RoPE (llama: scale folded into Wq)
  * attention logits q.k -> bf16; causal mask; m = rowmax; e = bf16(exp(logits - m));
    s = bf16(sum(e)); o = bf16(e @ v); out = bf16(o / s)   (MaxText compute_local_attention with
    bf16 logits; the elementwise chains are evaluated in f32 and rounded once, as XLA does with
    excess precision allowed)
  * residual adds: bf16(x + o)
  * MLP: bf16(silu(g) * u) with g, u the bf16 projection outputs, silu evaluated in f32
  * logits: bf16(y @ W) (untied) or bf16(y @ emb^T) [/ sqrt(E) in bf16 if
    normalize_embedding_logits]; cast to f32.
"""

import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import bf16_round, read_checkpoint  # noqa: E402

# ------------------------------------------------------------------------------------------------
# config

# MaxText base.yml defaults for the fields this family uses (docs/maxtext.md §9 "Base defaults").
DEFAULTS = {
    "model_name": "default",
    "head_dim": 128,
    "normalization_layer_epsilon": 1e-5,
    "rope_type": "default",
    "rope_min_timescale": 1.0,
    "rope_max_timescale": 10000.0,
    "rope_linear_scaling_factor": 1.0,
    "rope_use_scale": True,
    "logits_via_embedding": False,
    "normalize_embedding_logits": True,
    "final_logits_soft_cap": 0.0,
    "use_qk_norm": False,
    "scan_layers": True,
    "param_scan_axis": 1,
    "max_target_length": 2048,
    "mlp_activations": ["silu", "linear"],
}
REQUIRED = ["decoder_block", "emb_dim", "num_query_heads", "num_kv_heads", "mlp_dim",
            "num_decoder_layers", "vocab_size"]
BASE_ALIASES = {"base_emb_dim": "emb_dim", "base_num_query_heads": "num_query_heads",
                "base_num_kv_heads": "num_kv_heads", "base_mlp_dim": "mlp_dim",
                "base_num_decoder_layers": "num_decoder_layers",
                "base_moe_mlp_dim": "moe_mlp_dim"}


def parse_scalar(s):
    """Parse a YAML-ish scalar: quoted strings, True/False, 500_000, 1.0e-5, [a, b] lists."""
    s = s.strip()
    if not s:
        return None
    if (s[0] == s[-1]) and s[0] in "\"'" and len(s) >= 2:
        return s[1:-1]
    if s[0] == "[" and s[-1] == "]":
        inner = s[1:-1].strip()
        if not inner:
            return []
        return [parse_scalar(p) for p in inner.split(",")]
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    t = s.replace("_", "")
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return s


def _strip_comment(line):
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def parse_yaml(text):
    out = {}
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        key, sep, val = line.partition(":")
        if not sep:
            raise ValueError("cannot parse YAML line: %r" % raw)
        out[key.strip()] = parse_scalar(val)
    return out


def load_config(config, overrides=(), scan_axis=None):
    """Resolve a config (dict / JSON path / YAML path) into a dict of MaxText fields."""
    if isinstance(config, dict):
        raw = dict(config)
    else:
        with open(config) as f:
            text = f.read()
        if str(config).endswith((".yml", ".yaml")):
            raw = parse_yaml(text)
        else:
            raw = json.loads(text)
    for kv in overrides:
        k, _, v = kv.partition("=")
        raw[k.strip()] = parse_scalar(v)
    cfg = dict(DEFAULTS)
    for k, v in raw.items():
        if k in BASE_ALIASES and BASE_ALIASES[k] not in raw:
            cfg[BASE_ALIASES[k]] = v
        cfg[k] = v
    if scan_axis is not None:
        cfg["param_scan_axis"] = int(scan_axis)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError("config missing required field(s): %s" % ", ".join(missing))
    if cfg["decoder_block"] not in ("llama2", "mistral", "qwen3"):
        raise ValueError("unsupported decoder_block %r" % cfg["decoder_block"])
    if cfg["decoder_block"] == "qwen3" and "use_qk_norm" not in raw:
        cfg["use_qk_norm"] = True
    for k in ("emb_dim", "num_query_heads", "num_kv_heads", "head_dim", "mlp_dim",
              "num_decoder_layers", "vocab_size", "param_scan_axis", "max_target_length"):
        cfg[k] = int(cfg[k])
    for k in ("normalization_layer_epsilon", "rope_max_timescale", "rope_min_timescale",
              "rope_linear_scaling_factor"):
        cfg[k] = float(cfg[k])
    return cfg


def rope_kind(cfg):
    """'llama3.1' (interleaved + scaling) or 'default' (half-split), docs/maxtext.md §2.3 selection order."""
    if str(cfg.get("model_name", "")).startswith("llama3.1") or \
            str(cfg.get("rope_type", "")).startswith("llama3.1"):
        return "llama3.1"
    return "default"


# ------------------------------------------------------------------------------------------------
# weights


def canonical_name(key, sep):
    parts = key.split(sep)
    if parts[:2] == ["params", "params"]:
        parts = parts[2:]
    elif parts[:1] in (["model"], ["base"]):
        parts = parts[1:]
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


LAYER_SUBKEYS = [
    "pre_self_attention_layer_norm/scale", "self_attention/query/kernel",
    "self_attention/key/kernel", "self_attention/value/kernel", "self_attention/out/kernel",
    "post_self_attention_layer_norm/scale", "mlp/wi_0/kernel", "mlp/wi_1/kernel",
    "mlp/wo/kernel",
]
QK_NORM_SUBKEYS = ["self_attention/query_norm/scale", "self_attention/key_norm/scale"]


def expected_layer_shapes(cfg):
    E, H, K, D, F = (cfg["emb_dim"], cfg["num_query_heads"], cfg["num_kv_heads"],
                     cfg["head_dim"], cfg["mlp_dim"])
    s = {
        "pre_self_attention_layer_norm/scale": (E,), "self_attention/query/kernel": (E, H, D),
        "self_attention/key/kernel": (E, K, D), "self_attention/value/kernel": (E, K, D),
        "self_attention/out/kernel": (H, D, E), "post_self_attention_layer_norm/scale": (E,),
        "mlp/wi_0/kernel": (E, F), "mlp/wi_1/kernel": (E, F), "mlp/wo/kernel": (F, E),
    }
    if cfg["use_qk_norm"]:
        s["self_attention/query_norm/scale"] = (D,)
        s["self_attention/key_norm/scale"] = (D,)
    return s


def load_weights(checkpoint_paths, cfg):
    """Read, canonicalise, unroll and bf16-round the checkpoint. Returns (globals, layers)."""
    raw = read_checkpoint(checkpoint_paths)
    sep = "/" if any("/" in k for k in raw) else "."
    canon = {}
    for k, v in raw.items():
        canon[canonical_name(k, sep)] = v
    L = cfg["num_decoder_layers"]
    axis = cfg["param_scan_axis"]
    shapes = expected_layer_shapes(cfg)
    layers = [dict() for _ in range(L)]
    for name, arr in canon.items():
        if name.startswith("decoder/layers/"):
            sub = name[len("decoder/layers/"):]
            if sub not in shapes:
                raise ValueError("unexpected tensor %s" % name)
            if arr.shape[axis] != L:
                raise ValueError("%s: scan axis %d has size %d, expected %d layers"
                                 % (name, axis, arr.shape[axis], L))
            for i in range(L):
                layers[i][sub] = np.take(arr, i, axis=axis)
        elif name.startswith("decoder/layers_"):
            rest = name[len("decoder/layers_"):]
            idx, _, sub = rest.partition("/")
            i = int(idx)
            if sub not in shapes or not 0 <= i < L:
                raise ValueError("unexpected tensor %s" % name)
            layers[i][sub] = arr
    E, V = cfg["emb_dim"], cfg["vocab_size"]
    g = {"embedding": canon["token_embedder/embedding"],
         "final_norm": canon["decoder/decoder_norm/scale"]}
    if not cfg["logits_via_embedding"]:
        g["logits_dense"] = canon["decoder/logits_dense/kernel"]
        assert g["logits_dense"].shape == (E, V), g["logits_dense"].shape
    assert g["embedding"].shape == (V, E), g["embedding"].shape
    assert g["final_norm"].shape == (E,)
    for i, t in enumerate(layers):
        for sub, shp in shapes.items():
            if sub not in t:
                raise ValueError("layer %d: missing %s" % (i, sub))
            if tuple(t[sub].shape) != tuple(shp):
                raise ValueError("layer %d %s: shape %s, expected %s" % (i, sub, t[sub].shape,
                                                                        shp))
    rnd = lambda a: bf16_round(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    g = {k: rnd(v) for k, v in g.items()}
    layers = [{k: rnd(v) for k, v in t.items()} for t in layers]
    return g, layers


# ------------------------------------------------------------------------------------------------
# ops


def bf16(x):
    return bf16_round(np.asarray(x, dtype=np.float32))


def matmul_bf16(a, b):
    """bf16 x bf16 -> exact-ish accumulate (f64) -> bf16."""
    return bf16((a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32))


def rmsnorm(x, scale, eps):
    x32 = x.astype(np.float32)
    ms = np.mean(x32.astype(np.float64) ** 2, axis=-1, keepdims=True)
    y = (x32.astype(np.float64) / np.sqrt(ms + np.float64(np.float32(eps)))).astype(np.float32)
    y = bf16(y)
    return bf16(y.astype(np.float64) * scale.astype(np.float64))


def default_rope_tables(positions, d, theta, min_ts=1.0, linear_factor=1.0):
    """Half-split RoPE (docs/maxtext.md §2.3a): returns bf16-rounded (sin, cos) of shape [T, d/2]."""
    half = d // 2
    fraction = (np.float32(2.0) * np.arange(half, dtype=np.float32)) / np.float32(d)
    timescale = np.float32(min_ts) * np.power(np.float32(theta / min_ts), fraction,
                                              dtype=np.float32)
    if linear_factor != 1.0:
        timescale = (timescale * np.float32(linear_factor)).astype(np.float32)
    ang = positions.astype(np.float32)[:, None] / timescale[None, :]
    return bf16(np.sin(ang)), bf16(np.cos(ang))


def apply_default_rope(x, positions, theta, min_ts=1.0, linear_factor=1.0):
    """x [T, N, d] bf16 values -> bf16."""
    d = x.shape[-1]
    sin, cos = default_rope_tables(positions, d, theta, min_ts, linear_factor)
    sin = np.concatenate([sin, sin], axis=-1)[:, None, :].astype(np.float64)
    cos = np.concatenate([cos, cos], axis=-1)[:, None, :].astype(np.float64)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    rot = np.concatenate([-x2, x1], axis=-1).astype(np.float64)
    out = x.astype(np.float64) * cos + rot * sin
    return bf16(out.astype(np.float32))


def llama31_inv_freq(d, theta, min_ts=1.0, use_scale=True):
    """Per-dimension (repeated pairs) frequencies of LLaMARotaryEmbedding, f32 (docs/maxtext.md §2.3b)."""
    half = d // 2
    fraction = (np.float32(2.0) * np.arange(half, dtype=np.float32)) / np.float32(d)
    fraction = np.repeat(fraction, 2)
    timescale = np.float32(min_ts) * np.power(np.float32(theta / min_ts), fraction,
                                              dtype=np.float32)
    freq = (np.float32(1.0) / timescale).astype(np.float32)
    if use_scale:
        scale_factor = np.float32(8.0)
        low_freq_factor, high_freq_factor = np.float32(1.0), np.float32(4.0)
        old_context_len = np.float32(8192.0)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        out = np.empty_like(freq)
        for i, f in enumerate(freq):
            wavelen = np.float32(2.0 * math.pi) / f
            if wavelen < high_freq_wavelen:
                out[i] = f
            elif wavelen > low_freq_wavelen:
                out[i] = f / scale_factor
            else:
                smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor -
                                                                           low_freq_factor)
                out[i] = (np.float32(1.0) - smooth) * f / scale_factor + smooth * f
        freq = out.astype(np.float32)
    return freq


def apply_llama31_rope(x, positions, theta, min_ts=1.0, use_scale=True):
    d = x.shape[-1]
    freq = llama31_inv_freq(d, theta, min_ts, use_scale)
    timescale = (np.float32(1.0) / freq).astype(np.float32)
    ang = positions.astype(np.float32)[:, None] / timescale[None, :]       # f32 [T, d]
    sin = np.sin(ang).astype(np.float64)[:, None, :]
    cos = np.cos(ang).astype(np.float64)[:, None, :]
    xd = x.astype(np.float64)
    shifted = np.empty_like(xd)
    shifted[..., 0::2] = xd[..., 1::2]     # even slot takes its odd partner
    shifted[..., 1::2] = xd[..., 0::2]     # odd slot takes its even partner
    sign = np.tile(np.array([-1.0, 1.0]), d // 2)
    out = xd * cos + shifted * sin * sign
    return bf16(out.astype(np.float32))


def silu(x):
    x = x.astype(np.float64)
    return x / (1.0 + np.exp(-x))


def attention(q, k, v):
    """Causal GQA attention, docs/maxtext.md §2.2. q [T,H,D], k/v [S,K,D] (S == T, prefill). bf16 values."""
    T, H, D = q.shape
    S, K, _ = k.shape
    G = H // K
    qg = q.reshape(T, K, G, D).astype(np.float64)
    logits = np.einsum("tkgd,skd->kgts", qg, k.astype(np.float64))
    logits = bf16(logits.astype(np.float32))
    mask = np.arange(S)[None, :] <= (np.arange(T)[:, None] + (S - T))
    neg = np.float32(-0.7 * np.finfo(np.float32).max)
    logits = np.where(mask[None, None], logits, bf16(neg))
    m = logits.max(axis=-1, keepdims=True)
    e = bf16(np.exp((logits - m).astype(np.float32)))
    s = bf16(e.astype(np.float64).sum(axis=-1, keepdims=True).astype(np.float32))  # [K,G,T,1]
    o = bf16(np.einsum("kgts,skd->tkgd", e.astype(np.float64),
                       v.astype(np.float64)).astype(np.float32))
    s_t = np.moveaxis(s, 2, 0)  # [T, K, G, 1]
    out = bf16((o.astype(np.float64) / s_t.astype(np.float64)).astype(np.float32))
    return out.reshape(T, H, D)


# ------------------------------------------------------------------------------------------------
# model


class RefModel:
    def __init__(self, cfg, globals_, layers):
        self.cfg = cfg
        self.g = globals_
        self.layers = layers

    @classmethod
    def load(cls, checkpoint_paths, config, overrides=(), scan_axis=None):
        cfg = load_config(config, overrides, scan_axis)
        g, layers = load_weights(checkpoint_paths, cfg)
        return cls(cfg, g, layers)

    def _rope(self, x, positions):
        c = self.cfg
        if rope_kind(c) == "llama3.1":
            return apply_llama31_rope(x, positions, c["rope_max_timescale"],
                                      c["rope_min_timescale"], bool(c["rope_use_scale"]))
        return apply_default_rope(x, positions, c["rope_max_timescale"],
                                  c["rope_min_timescale"], c["rope_linear_scaling_factor"])

    def hidden(self, tokens, positions=None):
        c = self.cfg
        E, H, K, D = c["emb_dim"], c["num_query_heads"], c["num_kv_heads"], c["head_dim"]
        eps = c["normalization_layer_epsilon"]
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence")
        if tokens.min() < 0 or tokens.max() >= c["vocab_size"]:
            raise ValueError("token id out of range")
        T = tokens.size
        pos = np.arange(T) if positions is None else np.asarray(positions, dtype=np.int64)
        x = self.g["embedding"][tokens]                                   # bf16 [T, E]
        for w in self.layers:
            h = rmsnorm(x, w["pre_self_attention_layer_norm/scale"], eps)
            q = matmul_bf16(h, w["self_attention/query/kernel"].reshape(E, H * D)).reshape(T, H, D)
            k = matmul_bf16(h, w["self_attention/key/kernel"].reshape(E, K * D)).reshape(T, K, D)
            v = matmul_bf16(h, w["self_attention/value/kernel"].reshape(E, K * D)).reshape(T, K, D)
            if c["use_qk_norm"]:
                q = rmsnorm(q, w["self_attention/query_norm/scale"], eps)
                k = rmsnorm(k, w["self_attention/key_norm/scale"], eps)
            q = self._rope(q, pos)
            k = self._rope(k, pos)
            if c["decoder_block"] == "qwen3":
                qs = bf16(np.float32(D ** -0.5))
                q = bf16((q.astype(np.float64) * np.float64(qs)).astype(np.float32))
            a = attention(q, k, v)
            o = matmul_bf16(a.reshape(T, H * D), w["self_attention/out/kernel"].reshape(H * D, E))
            x = bf16(x.astype(np.float64) + o)
            h = rmsnorm(x, w["post_self_attention_layer_norm/scale"], eps)
            gte = matmul_bf16(h, w["mlp/wi_0/kernel"])
            up = matmul_bf16(h, w["mlp/wi_1/kernel"])
            act = bf16((silu(gte) * up.astype(np.float64)).astype(np.float32))
            f = matmul_bf16(act, w["mlp/wo/kernel"])
            x = bf16(x.astype(np.float64) + f)
        return rmsnorm(x, self.g["final_norm"], eps)

    def logits(self, tokens, positions=None):
        """f32 logits [T, V] of one prefill. `positions` (default 0..T-1) only for experiments."""
        c = self.cfg
        y = self.hidden(tokens, positions)
        if c["logits_via_embedding"]:
            out = matmul_bf16(y, self.g["embedding"].T)
            if c["normalize_embedding_logits"]:
                out = bf16((out.astype(np.float64) /
                            np.float64(bf16(np.float32(math.sqrt(c["emb_dim"]))))
                            ).astype(np.float32))
        else:
            out = matmul_bf16(y, self.g["logits_dense"])
        cap = float(c.get("final_logits_soft_cap") or 0.0)
        if cap:
            out = bf16((np.tanh(out.astype(np.float64) / cap) * cap).astype(np.float32))
        return out.astype(np.float32)

    def greedy(self, tokens, n):
        seq = list(int(t) for t in tokens)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(self.logits(seq)[-1]))
            out.append(nxt)
            seq.append(nxt)
        return out

    def greedy_with_margins(self, tokens, n, stop_below=None):
        """Greedy tokens plus the relative top-1/top-2 gap of every step's logits row.
        Stops early (returning fewer tokens) once a gap is below `stop_below`."""
        seq = list(int(t) for t in tokens)
        out, gaps = [], []
        for _ in range(n):
            row = self.logits(seq)[-1]
            nxt = int(np.argmax(row))
            gaps.append(float(relative_gaps(row[None])[0]))
            out.append(nxt)
            seq.append(nxt)
            if stop_below is not None and gaps[-1] < stop_below:
                break
        return out, gaps


def relative_gaps(logits):
    """(top1 - top2) / max|row| for each row of [T, V] logits."""
    srt = np.sort(logits, axis=-1)
    return (srt[:, -1] - srt[:, -2]) / np.maximum(np.abs(logits).max(axis=-1), 1e-30)


def decode_bug_greedy(model, tokens, n, bug):
    """Greedy tokens of a simulated *decode-path* bug (prefill correct, then):
    "no-cache"      each new token attends only to itself (KV cache ignored),
    "frozen-pos"    every generated token gets the position of the first generated one."""
    seq = list(int(t) for t in tokens)
    P = len(seq)
    out = []
    for _ in range(n):
        if bug == "no-cache":
            row = model.logits([seq[-1]], [len(seq) - 1])[-1]
        elif bug == "frozen-pos":
            pos = list(range(P)) + [P] * (len(seq) - P)
            row = model.logits(seq, pos)[-1]
        else:
            raise KeyError(bug)
        nxt = int(np.argmax(row))
        out.append(nxt)
        seq.append(nxt)
    return out


DECODE_BUGS = ("no-cache", "frozen-pos")


def choose_prompt(model, length, n_gen, seed=0, min_gap=0.03, max_tries=300,
                  context_sensitive=True):
    """Deterministically pick a random prompt for an exact engine-vs-reference comparison.

    Requirements, tried in order of the candidate prompts (seeded):
      * the reference's relative top-1/top-2 gap is >= min_gap at every prompt position and at
        every one of the n_gen greedy steps (so exact top-1 / greedy comparisons are not decided
        by bf16 noise; kiln-vs-reference gap errors measured ~1.6% of the row max at worst);
      * if context_sensitive: the greedy continuation depends on the decode path, i.e. each
        simulated decode bug in DECODE_BUGS changes the greedy tokens (otherwise a broken KV
        cache or position bookkeeping could still reproduce them).
    Returns (tokens, greedy, min_gap_seen, sensitive); the best candidate if none qualifies."""
    V = model.cfg["vocab_size"]
    best = None
    for i in range(max_tries):
        rng = np.random.default_rng(seed * 1000 + i)
        toks = [int(t) for t in rng.integers(0, V, length)]
        gaps = relative_gaps(model.logits(toks))
        if gaps.min() < min_gap and best is not None:
            continue
        greedy, ggaps = model.greedy_with_margins(toks, n_gen,
                                                  stop_below=min_gap if best else None)
        g = min(float(gaps.min()), min(ggaps) if ggaps else 1.0)
        if len(greedy) < n_gen:
            continue
        sensitive = False
        if g >= min_gap and context_sensitive:
            sensitive = all(decode_bug_greedy(model, toks, n_gen, bug) != greedy
                            for bug in DECODE_BUGS)
        cand = (toks, greedy, g, sensitive)
        if best is None or (min(g, min_gap), sensitive, g) > (min(best[2], min_gap), best[3],
                                                              best[2]):
            best = cand
        if g >= min_gap and (sensitive or not context_sensitive):
            break
    return best


def reference_logits(checkpoint_paths, config, tokens, overrides=(), scan_axis=None):
    return RefModel.load(checkpoint_paths, config, overrides, scan_axis).logits(tokens)


def reference_greedy(checkpoint_paths, config, tokens, n, overrides=(), scan_axis=None):
    return RefModel.load(checkpoint_paths, config, overrides, scan_axis).greedy(tokens, n)


def cli_main(model_class, description, argv=None, with_max_logits=False):
    """The reference's command line, shared by every family's module."""
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--checkpoint", action="append", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--scan-axis", type=int)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--out", help="write f32 logits [T, V] to this .npy")
    if with_max_logits:
        ap.add_argument("--max-logits", help="write f32 max logits [L, H] to this .npy")
    a = ap.parse_args(argv)
    toks = [int(t) for t in a.tokens.split(",")]
    m = model_class.load(a.checkpoint, a.config, a.set, a.scan_axis)
    lg = m.logits(toks)
    if a.out:
        np.save(a.out, lg)
    if with_max_logits and a.max_logits:
        np.save(a.max_logits, m.max_logits(toks))
    print("argmax per position:", [int(i) for i in lg.argmax(-1)])
    if a.max_tokens:
        print("greedy:", m.greedy(toks, a.max_tokens))
    return 0


def main(argv=None):
    return cli_main(RefModel, "numpy reference forward pass", argv)


if __name__ == "__main__":
    sys.exit(main())
