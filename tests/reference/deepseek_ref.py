#!/usr/bin/python3
"""Independent numpy reference of the MaxText DeepSeek / Kimi-K2 forward (decoder_block deepseek).

Written from docs/maxtext.md (§1.1-1.2, §1.7, §2.1-2.3(c), §2.5-2.7, §3, §9, §11),
not from kiln's C++. Same conventions and rounding choices as llama_ref.py (read its docstring first).

Entry points (same calling convention as llama_ref):
    reference_logits(checkpoint_paths, config, tokens, ...)        -> np.ndarray [T, V] float32
    reference_greedy(checkpoint_paths, config, tokens, n, ...)     -> list[int]
    reference_max_logits(checkpoint_paths, config, tokens, ...)    -> np.ndarray [L, H] float32
    RefModel.load(checkpoint_paths, config, ...)  (load once; .logits / .greedy / .max_logits /
                                                   .routing / .with_raw_layers for QK-Clip)

`tokens` for reference_max_logits may be one prompt (list of ints) or a list of prompts; the
statistic is the max over prompts (each prompt is its own sequence, as `kiln calibrate` runs them).
`overrides`: "key=value" strings (like `kiln export --set`); `scan_axis`: like `--scan-axis`.

Model (docs/maxtext.md §2.4-§2.7): global layer numbering = dense layers first (decoder/dense_layers[_i],
first_num_dense_layers of them), then MoE layers (decoder/moe_layers[_j]).
    h   = x + MLA(RMSNorm_pre(x));   out = h + FFN(RMSNorm_post(h))
    FFN = dense SwiGLU MLP (dense layers) | routed experts + shared experts (MoE layers)

Numerics (MaxText defaults: dtype bf16, weights rounded to bf16 once). As in llama_ref, matmuls
accumulate in f64 on bf16-valued inputs and round once; elementwise chains are evaluated in
f32/f64 and rounded once at the point MaxText materialises a bf16 array. Rounding points:
  * embedding gather (bf16 table); RMSNorm exactly as llama_ref (x->f32, y=x*rsqrt(mean x^2+eps),
    y->bf16, bf16(y*scale)); used for the pre/post norms, q_norm (over Rq), kv_norm (over Rkv) and
    the final norm
  * every projection output -> bf16: wq_a, wq_b (or query), wkv_a, wkv_b, out, mlp/expert
    wi_0/wi_1/wo, shared experts, router gate, logits
  * YaRN RoPE (§2.3c): frequencies in f32 exactly as written in docs/maxtext.md (b_i, ramp, mix), angle
    f32(pos*f_i), cos/sin as f32 (complex64 table), rotation evaluated in f64 from those f32
    values, output -> bf16. Input pairs (x[2i], x[2i+1]) (rope_interleave) or (x[i], x[i+d/2]);
    output always concatenated [Re..., Im...]. Applied to q_pe [T,H,Dr] and to the single shared
    k_pe [T,1,Dr] (broadcast to every head afterwards).
  * softmax scale s = Dqk^-0.5 * m^2 with m = 0.1*mscale*ln(rope_factor)+1 when
    max_position_embeddings > original_max_position_embeddings (f64 python math);
    query = bf16(concat(q_nope, q_pe) * bf16(s))   (JAX converts the python scalar to a weakly
    typed bf16 constant -- same choice as llama_ref's qwen3 query scale)
  * attention exactly as llama_ref (H = K, no GQA): logits = bf16(q.k) (this is what MaxText's
    max_logits statistic records, §3), causal mask -0.7*f32max, e = bf16(exp(l - rowmax)),
    s = bf16(sum e), o = bf16(e @ v), out = bf16(o / s)
  * residual adds bf16(x + o); MLP product bf16(silu(g) * u)
  * MoE (§2.7): gate logits bf16(x.Wg); scores: sigmoid -> bf16(sigmoid(l)); softmax (as
    jax.nn.softmax on bf16) -> e = bf16(exp(l - max)), s = bf16(sum e), bf16(e / s); "" ->
    the logits themselves. pre_bias = scores only for model_name deepseek3*/deepseek4*;
    routed_bias: scores = bf16(scores + bias). Selection: deepseek3*/4* names with
    n_routing_groups != -1 -> group score = f32 sum of the top-2 (post-bias) scores of each
    contiguous group of X/n_groups experts, keep the topk_routing_group best groups, others -inf;
    top_k (ties -> lower index first, like lax.top_k). Weights = pre_bias[idx] (deepseek3*/4*) or
    the post-bias scores[idx] (every other name, e.g. kimi-k2-*). deepseek_scale_weights:
    sigmoid -> w = bf16(w / (bf16(sum w) + 1e-20) * bf16(rsf)); otherwise w = bf16(w * bf16(rsf)).
    Every selected expert: y = bf16(bf16(silu(x.Wi0) * x.Wi1) . Wo) (each projection bf16);
    routed = bf16(sum_k w_k * y_k) (f32 weight sum); shared experts = dense MLP of width S*Fm on
    the same input; FFN = bf16(routed + shared).
  * logits: bf16(y @ W) (untied) or bf16(y @ emb^T) [/ bf16(sqrt E) if normalize_embedding_logits]
    -> f32.
"""

import copy
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import bf16_round, read_checkpoint  # noqa: E402
import llama_ref as _lr  # noqa: E402  (config parsing helpers, relative_gaps, decode bugs only)

# ------------------------------------------------------------------------------------------------
# config

# MaxText base.yml defaults (docs/maxtext.md §2.3 list, §9 "Base defaults") for the fields this family uses.
DEFAULTS = {
    "model_name": "default",
    "normalization_layer_epsilon": 1e-5,
    "rope_type": "yarn",
    "rope_max_timescale": 10000.0,
    "max_position_embeddings": 163840,
    "original_max_position_embeddings": 4096,
    "rope_factor": 40.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "rope_interleave": True,
    "rope_truncate": True,
    "rope_attention_scaling": False,
    "logits_via_embedding": False,
    "normalize_embedding_logits": True,
    "final_logits_soft_cap": 0.0,
    "scan_layers": True,
    "param_scan_axis": 1,
    "max_target_length": 2048,
    "mlp_activations": ["silu", "linear"],
    "first_num_dense_layers": 0,
    "q_lora_rank": 0,
    "routed_scaling_factor": 1.0,
    "routed_score_func": "",
    "routed_bias": False,
    "n_routing_groups": -1,
    "topk_routing_group": -1,
}
# Fields without a documented default must be given (the fixtures always write every field).
REQUIRED = ["decoder_block", "emb_dim", "num_query_heads", "mlp_dim", "moe_mlp_dim",
            "num_decoder_layers", "vocab_size", "num_experts", "num_experts_per_tok",
            "shared_experts", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim"]
INT_FIELDS = ["emb_dim", "num_query_heads", "num_kv_heads", "mlp_dim", "moe_mlp_dim",
              "num_decoder_layers", "first_num_dense_layers", "vocab_size", "num_experts",
              "num_experts_per_tok", "shared_experts", "q_lora_rank", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routing_groups",
              "topk_routing_group", "param_scan_axis", "max_target_length",
              "max_position_embeddings", "original_max_position_embeddings"]
FLOAT_FIELDS = ["normalization_layer_epsilon", "rope_max_timescale", "rope_factor", "beta_fast",
                "beta_slow", "mscale", "routed_scaling_factor", "final_logits_soft_cap"]
BOOL_FIELDS = ["rope_interleave", "rope_truncate", "rope_attention_scaling",
               "logits_via_embedding", "normalize_embedding_logits", "routed_bias"]
SCORE_FUNCS = ("", "sigmoid", "softmax")


def load_config(config, overrides=(), scan_axis=None):
    """Resolve a config (dict / JSON path / MaxText .yml path) into a dict of MaxText fields."""
    if isinstance(config, dict):
        raw = dict(config)
    else:
        with open(config) as f:
            text = f.read()
        raw = _lr.parse_yaml(text) if str(config).endswith((".yml", ".yaml")) else json.loads(text)
    for kv in overrides:
        k, _, v = kv.partition("=")
        raw[k.strip()] = _lr.parse_scalar(v)
    cfg = dict(DEFAULTS)
    for k, v in raw.items():
        if k in _lr.BASE_ALIASES and _lr.BASE_ALIASES[k] not in raw:
            cfg[_lr.BASE_ALIASES[k]] = v
        cfg[k] = v
    if scan_axis is not None:
        cfg["param_scan_axis"] = int(scan_axis)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError("config missing required field(s): %s" % ", ".join(missing))
    if cfg["decoder_block"] != "deepseek":
        raise ValueError("deepseek_ref: unsupported decoder_block %r" % cfg["decoder_block"])
    cfg.setdefault("num_kv_heads", cfg["num_query_heads"])
    for k in INT_FIELDS:
        cfg[k] = int(cfg[k])
    for k in FLOAT_FIELDS:
        cfg[k] = float(cfg[k])
    for k in BOOL_FIELDS:
        cfg[k] = bool(cfg[k])
    cfg["routed_score_func"] = str(cfg["routed_score_func"] or "")
    if cfg["num_kv_heads"] != cfg["num_query_heads"]:
        raise ValueError("MLA requires num_query_heads == num_kv_heads (docs/maxtext.md §2.5)")
    if not str(cfg["rope_type"]).startswith("yarn"):
        raise ValueError("deepseek_ref implements rope_type yarn only (got %r)" % cfg["rope_type"])
    if cfg["rope_attention_scaling"]:
        raise ValueError("rope_attention_scaling: true is not implemented (docs/maxtext.md §2.3c: false)")
    if cfg["routed_score_func"] not in SCORE_FUNCS:
        raise ValueError("unsupported routed_score_func %r" % cfg["routed_score_func"])
    if not 0 <= cfg["first_num_dense_layers"] <= cfg["num_decoder_layers"]:
        raise ValueError("first_num_dense_layers out of range")
    X, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    if not 0 < k <= X:
        raise ValueError("num_experts_per_tok must be in [1, num_experts]")
    if uses_group_routing(cfg):
        G, kg = cfg["n_routing_groups"], cfg["topk_routing_group"]
        if X % G or not 0 < kg <= G or X // G < 2:
            raise ValueError("bad n_routing_groups / topk_routing_group for %d experts" % X)
    return cfg


def is_deepseek3_name(cfg):
    """docs/maxtext.md §2.7: pre-bias weighting and group routing only for deepseek3*/deepseek4* names."""
    return str(cfg.get("model_name", "")).startswith(("deepseek3", "deepseek4"))


def uses_group_routing(cfg):
    return is_deepseek3_name(cfg) and int(cfg.get("n_routing_groups", -1)) != -1


def num_dense(cfg):
    return cfg["first_num_dense_layers"]


def layer_kind(cfg, i):
    return "dense" if i < num_dense(cfg) else "moe"


# ------------------------------------------------------------------------------------------------
# parameter names and shapes (docs/maxtext.md §1.7; unscanned shapes)

MOE = "DeepSeekMoeBlock_0/MoeBlock_0/"
SHARED = "DeepSeekMoeBlock_0/shared_experts/"


def attention_shapes(cfg):
    E, H = cfg["emb_dim"], cfg["num_query_heads"]
    Rq, Rkv = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    Dn, Dr, Dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    s = {"pre_self_attention_layer_norm/scale": (E,)}
    if Rq > 0:
        s["self_attention/wq_a/kernel"] = (E, Rq)
        s["self_attention/q_norm/scale"] = (Rq,)
        s["self_attention/wq_b/kernel"] = (Rq, H, Dn + Dr)
    else:
        s["self_attention/query/kernel"] = (E, H, Dn + Dr)
    s["self_attention/wkv_a/kernel"] = (E, Rkv + Dr)
    s["self_attention/kv_norm/scale"] = (Rkv,)
    s["self_attention/wkv_b/kernel"] = (Rkv, H, Dn + Dv)
    s["self_attention/out/kernel"] = (H, Dv, E)
    s["post_self_attention_layer_norm/scale"] = (E,)
    return s


def layer_shapes(cfg, kind):
    E, F, Fm, X, S = (cfg["emb_dim"], cfg["mlp_dim"], cfg["moe_mlp_dim"], cfg["num_experts"],
                      cfg["shared_experts"])
    s = attention_shapes(cfg)
    if kind == "dense":
        s["mlp/wi_0/kernel"] = (E, F)
        s["mlp/wi_1/kernel"] = (E, F)
        s["mlp/wo/kernel"] = (F, E)
    else:
        s[MOE + "gate/kernel"] = (E, X)
        if cfg["routed_bias"]:
            s[MOE + "gate/bias"] = (X,)
        s[MOE + "wi_0"] = (X, E, Fm)
        s[MOE + "wi_1"] = (X, E, Fm)
        s[MOE + "wo"] = (X, Fm, E)
        if S > 0:
            s[SHARED + "wi_0/kernel"] = (E, S * Fm)
            s[SHARED + "wi_1/kernel"] = (E, S * Fm)
            s[SHARED + "wo/kernel"] = (S * Fm, E)
    return s


def canonical_name(key, sep):
    return _lr.canonical_name(key, sep)


def load_raw_weights(checkpoint_paths, cfg):
    """Read, canonicalise and unroll the checkpoint WITHOUT rounding (f32 values as stored).

    Returns (globals, layers): globals {embedding, final_norm[, logits_dense]}, layers a list of
    {canonical sub-key: array} in global order (dense first), each with an extra "kind" entry."""
    raw = read_checkpoint(checkpoint_paths)
    sep = "/" if any("/" in k for k in raw) else "."
    canon = {}
    for k, v in raw.items():
        name = canonical_name(k, sep)
        if name in canon:
            raise ValueError("two checkpoint keys map to %s" % name)
        canon[name] = v
    L, Nd = cfg["num_decoder_layers"], num_dense(cfg)
    axis = cfg["param_scan_axis"]
    groups = {"dense_layers": (0, Nd), "moe_layers": (Nd, L - Nd)}
    layers = [dict() for _ in range(L)]
    shapes = [layer_shapes(cfg, layer_kind(cfg, i)) for i in range(L)]
    for name, arr in canon.items():
        if not name.startswith("decoder/") or name in ("decoder/decoder_norm/scale",
                                                       "decoder/logits_dense/kernel"):
            continue
        comp, _, sub = name[len("decoder/"):].partition("/")
        if comp in groups:
            first, count = groups[comp]
            if count == 0:
                raise ValueError("unexpected tensor %s (group %s has no layers)" % (name, comp))
            if sub not in shapes[first]:
                raise ValueError("unexpected tensor %s" % name)
            if arr.ndim <= axis or arr.shape[axis] != count:
                raise ValueError("%s: scan axis %d of shape %s, expected %d layers"
                                 % (name, axis, arr.shape, count))
            for j in range(count):
                layers[first + j][sub] = np.take(arr, j, axis=axis)
            continue
        base, us, idx = comp.rpartition("_")
        if us and base in groups and idx.isdigit():
            first, count = groups[base]
            j = int(idx)
            if j >= count or sub not in shapes[first + j]:
                raise ValueError("unexpected tensor %s" % name)
            if sub in layers[first + j]:
                raise ValueError("layer %d %s given twice" % (first + j, sub))
            layers[first + j][sub] = arr
            continue
        raise ValueError("unexpected tensor %s" % name)
    E, V = cfg["emb_dim"], cfg["vocab_size"]
    g = {"embedding": canon["token_embedder/embedding"],
         "final_norm": canon["decoder/decoder_norm/scale"]}
    if not cfg["logits_via_embedding"]:
        g["logits_dense"] = canon["decoder/logits_dense/kernel"]
        if g["logits_dense"].shape != (E, V):
            raise ValueError("logits_dense shape %s" % (g["logits_dense"].shape,))
    if g["embedding"].shape != (V, E) or g["final_norm"].shape != (E,):
        raise ValueError("embedding / final norm shape mismatch")
    for i, t in enumerate(layers):
        for sub, shp in shapes[i].items():
            if sub not in t:
                raise ValueError("layer %d: missing %s" % (i, sub))
            if tuple(t[sub].shape) != tuple(shp):
                raise ValueError("layer %d %s: shape %s, expected %s" % (i, sub, t[sub].shape,
                                                                        shp))
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    g = {k: f32(v) for k, v in g.items()}
    out = []
    for i, t in enumerate(layers):
        d = {k: f32(v) for k, v in t.items()}
        d["kind"] = layer_kind(cfg, i)
        out.append(d)
    return g, out


def round_weights(layer):
    """bf16-rounded copies, held as float64 (exact; saves a conversion in every matmul)."""
    return {k: (v if k == "kind" else bf16_round(v).astype(np.float64)) for k, v in layer.items()}


# ------------------------------------------------------------------------------------------------
# ops (module-level `bf16` so a test can switch rounding off by patching deepseek_ref.bf16)


def bf16(x):
    return bf16_round(np.asarray(x, dtype=np.float32))


def matmul_bf16(a, b):
    return bf16((np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)
                 ).astype(np.float32))


def rmsnorm(x, scale, eps):
    x32 = x.astype(np.float32).astype(np.float64)
    ms = np.mean(x32 ** 2, axis=-1, keepdims=True)
    y = bf16((x32 / np.sqrt(ms + np.float64(np.float32(eps)))).astype(np.float32))
    return bf16(y.astype(np.float64) * scale.astype(np.float64))


def silu(x):
    x = x.astype(np.float64)
    return x / (1.0 + np.exp(-x))


def mlp(x, wi0, wi1, wo):
    g = matmul_bf16(x, wi0)
    u = matmul_bf16(x, wi1)
    return matmul_bf16(bf16((silu(g) * u.astype(np.float64)).astype(np.float32)), wo)


# ---- YaRN (docs/maxtext.md §2.3c) ----------------------------------------------------------------


def yarn_correction_dim(n, d, theta, orig_max):
    return d * math.log(orig_max / (n * 2 * math.pi)) / (2 * math.log(theta))


def yarn_correction_range(d, theta, orig_max, beta_fast, beta_slow, truncate=True):
    """(low, high) exactly as docs/maxtext.md §2.3(c): floor/ceil (truncate), clamp to [0, d-1]."""
    low = yarn_correction_dim(beta_fast, d, theta, orig_max)
    high = yarn_correction_dim(beta_slow, d, theta, orig_max)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, d - 1)


def yarn_inv_freq(d, theta, factor, orig_max, beta_fast, beta_slow, truncate=True):
    """f_i, i in [0, d/2), f32: b_i/factor * ramp_i + b_i * (1 - ramp_i)."""
    half = d // 2
    ar = np.arange(half, dtype=np.float32)
    b = (np.float32(1.0) / np.power(np.float32(theta),
                                    (np.float32(2.0) * ar) / np.float32(d))).astype(np.float32)
    low, high = yarn_correction_range(d, theta, orig_max, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001
    ramp = np.clip((ar - np.float32(low)) / np.float32(high - low), 0, 1).astype(np.float32)
    smooth = (np.float32(1.0) - ramp).astype(np.float32)           # as DeepSeek's reference
    f = (b / np.float32(factor)) * (np.float32(1.0) - smooth) + b * smooth
    return f.astype(np.float32)


def yarn_cos_sin(positions, d, cfg):
    f = yarn_inv_freq(d, cfg["rope_max_timescale"], cfg["rope_factor"],
                      cfg["original_max_position_embeddings"], cfg["beta_fast"], cfg["beta_slow"],
                      cfg["rope_truncate"])
    pos = np.asarray(positions)
    if pos.size and (pos.min() < 0 or pos.max() >= cfg["max_position_embeddings"]):
        raise ValueError("position outside the YaRN table [0, max_position_embeddings)")
    ang = (pos.astype(np.float32)[:, None] * f[None, :]).astype(np.float32)   # [T, d/2] f32
    # complex64 table exp(i*ang): cos and sin as f32
    return (np.cos(ang.astype(np.float64)).astype(np.float32),
            np.sin(ang.astype(np.float64)).astype(np.float32))


def apply_yarn_rope(x, positions, cfg):
    """x [T, N, d] (bf16 values) -> bf16 [T, N, d], concatenated output [Re | Im]."""
    d = x.shape[-1]
    cos, sin = yarn_cos_sin(positions, d, cfg)
    cos = cos.astype(np.float64)[:, None, :]
    sin = sin.astype(np.float64)[:, None, :]
    xd = x.astype(np.float64)
    if cfg["rope_interleave"]:
        re, im = xd[..., 0::2], xd[..., 1::2]
    else:
        re, im = xd[..., :d // 2], xd[..., d // 2:]
    out = np.concatenate([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return bf16(out.astype(np.float32))


def softmax_scale(cfg):
    """docs/maxtext.md §2.5 step 3 (python floats, f64)."""
    dqk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    s = dqk ** -0.5
    if cfg["max_position_embeddings"] > cfg["original_max_position_embeddings"]:
        m = 0.1 * cfg["mscale"] * math.log(cfg["rope_factor"]) + 1.0
        s = s * m * m
    return s


# ---- attention ---------------------------------------------------------------------------------

NEG = np.float32(-0.7 * np.finfo(np.float32).max)


def mla_attention(q, k, v):
    """Causal MHA (docs/maxtext.md §2.2). q, k [T,H,Dqk] (q already scaled), v [T,H,Dv]; bf16 values.

    Returns (out [T,H,Dv] bf16, max_logits [H]: max of the bf16 logits over unmasked (t, s))."""
    T, H, _ = q.shape
    S = k.shape[0]
    logits = bf16(np.einsum("thd,shd->hts", q.astype(np.float64),
                            k.astype(np.float64)).astype(np.float32))
    mask = np.arange(S)[None, :] <= (np.arange(T)[:, None] + (S - T))
    maxl = np.where(mask[None], logits, -np.inf).max(axis=(1, 2)).astype(np.float32)
    logits = np.where(mask[None], logits, bf16(NEG))
    m = logits.max(axis=-1, keepdims=True)
    e = bf16(np.exp((logits - m).astype(np.float32)))
    s = bf16(e.astype(np.float64).sum(axis=-1, keepdims=True).astype(np.float32))   # [H,T,1]
    o = bf16(np.einsum("hts,shd->htd", e.astype(np.float64),
                       v.astype(np.float64)).astype(np.float32))
    out = bf16((o.astype(np.float64) / s.astype(np.float64)).astype(np.float32))
    return np.transpose(out, (1, 0, 2)), maxl


# ---- routing (docs/maxtext.md §2.7) --------------------------------------------------------------


def score_function(logits, func):
    if func == "sigmoid":
        return bf16((1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32))
    if func == "softmax":
        m = logits.max(axis=-1, keepdims=True)
        e = bf16(np.exp((logits - m).astype(np.float32)))
        s = bf16(e.astype(np.float64).sum(axis=-1, keepdims=True).astype(np.float32))
        return bf16((e.astype(np.float64) / s.astype(np.float64)).astype(np.float32))
    return logits


def top_k(scores, k):
    """lax.top_k semantics: descending, ties -> lower index first. scores [T, X]."""
    idx = np.argsort(-scores.astype(np.float64), axis=-1, kind="stable")[:, :k]
    return idx


def route(gate_logits, bias, cfg, mutations=frozenset()):
    """Routing of one MoE layer. gate_logits [T, X] bf16 values; bias [X] bf16 or None.

    Returns dict: indices [T,k], weights [T,k] (bf16 values, final), sel_scores [T,X] (the
    post-bias scores top_k ran on, -inf where group-masked), scores [T,X] (pre-bias), margin [T]
    (gap between the k-th and (k+1)-th selection score relative to the larger magnitude of the
    two entries' pre- and post-bias scores; inf if nothing competes), group_margin [T] (same for
    the kg-th vs (kg+1)-th group score; inf without group routing)."""
    func = cfg["routed_score_func"]
    k = cfg["num_experts_per_tok"]
    T, X = gate_logits.shape
    scores = score_function(gate_logits, func)
    pre = scores if (is_deepseek3_name(cfg) != ("swap-weighting" in mutations)) else None
    if bias is not None:
        biased = bf16((scores.astype(np.float64) + bias.astype(np.float64)).astype(np.float32))
    else:
        biased = scores
    select = scores if "ignore-bias-select" in mutations else biased
    group_margin = np.full(T, np.inf)
    if uses_group_routing(cfg) and "no-groups" not in mutations:
        G, kg = cfg["n_routing_groups"], cfg["topk_routing_group"]
        grouped = select.astype(np.float32).reshape(T, G, X // G)
        top2 = -np.sort(-grouped, axis=-1)[..., :2]
        gs = (top2[..., 0] + top2[..., 1]).astype(np.float32)                  # f32 [T, G]
        gidx = top_k(gs, kg)
        keep = np.zeros((T, G), dtype=bool)
        np.put_along_axis(keep, gidx, True, axis=-1)
        select = np.where(np.repeat(keep, X // G, axis=-1), select, -np.inf)
        if kg < G:
            o = np.argsort(-gs, axis=-1, kind="stable")
            a = np.take_along_axis(gs, o[:, kg - 1:kg], -1)[:, 0].astype(np.float64)
            b = np.take_along_axis(gs, o[:, kg:kg + 1], -1)[:, 0].astype(np.float64)
            group_margin = (a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-30)
    idx = top_k(select, k)
    margin = np.full(T, np.inf)
    if k < X:
        o = np.argsort(-select.astype(np.float64), axis=-1, kind="stable")
        ik, ik1 = o[:, k - 1:k], o[:, k:k + 1]
        a = np.take_along_axis(select, ik, -1)[:, 0].astype(np.float64)
        b = np.take_along_axis(select, ik1, -1)[:, 0].astype(np.float64)
        # noise on a score is relative to the score (softmax: p * dlogit) or to its pre-bias
        # value, so the gap is measured against the two competing entries, not the row max
        den = np.maximum.reduce([np.abs(a), np.abs(b),
                                 np.abs(np.take_along_axis(scores, ik, -1)[:, 0]),
                                 np.abs(np.take_along_axis(scores, ik1, -1)[:, 0])])
        with np.errstate(invalid="ignore"):
            margin = np.where(np.isfinite(b), (a - b) / np.maximum(den, 1e-30), np.inf)
    src = pre if pre is not None else biased
    w = np.take_along_axis(src, idx, axis=-1).astype(np.float64)
    rsf = 1.0 if "no-rsf" in mutations else cfg["routed_scaling_factor"]
    rsf = np.float64(bf16(np.float32(rsf)))
    if func == "sigmoid" and "no-renorm" not in mutations:
        ssum = bf16(w.sum(axis=-1, keepdims=True).astype(np.float32)).astype(np.float64)
        w = w / (ssum + np.float64(bf16(np.float32(1e-20)))) * rsf
    else:
        w = w * rsf
    return {"indices": idx, "weights": bf16(w.astype(np.float32)), "sel_scores": select,
            "scores": scores, "gate_logits": gate_logits, "margin": margin,
            "group_margin": group_margin}


# ------------------------------------------------------------------------------------------------
# model


class RefModel:
    """`raw_layers` keep the f32 values as read (for QK-Clip, which scales in f32 before the one
    rounding to bf16); `layers` are the bf16-rounded weights the forward pass uses."""

    mutations = frozenset()   # names of deliberate bugs (sensitivity checks only)

    def __init__(self, cfg, raw_globals, raw_layers):
        self.cfg = cfg
        self.raw_g = raw_globals
        self.raw_layers = raw_layers
        self.g = round_weights(raw_globals)
        self.layers = [round_weights(t) for t in raw_layers]

    @classmethod
    def load(cls, checkpoint_paths, config, overrides=(), scan_axis=None):
        cfg = load_config(config, overrides, scan_axis)
        g, layers = load_raw_weights(checkpoint_paths, cfg)
        return cls(cfg, g, layers)

    def with_raw_layers(self, raw_layers):
        """A model with the same config/globals and other (e.g. QK-clipped) f32 layer weights."""
        m = copy.copy(self)
        m.raw_layers = raw_layers
        m.layers = [round_weights(t) for t in raw_layers]
        return m

    # -- pieces --------------------------------------------------------------------------------

    def _rope(self, x, pos):
        c = self.cfg
        if "no-yarn" in self.mutations:          # plain θ^(-2i/d) frequencies, same layout
            c = dict(c, rope_factor=1.0)
        if "rope-pairs-flipped" in self.mutations:
            c = dict(c, rope_interleave=not c["rope_interleave"])
        return apply_yarn_rope(x, pos, c)

    def mla(self, x, w, pos):
        """x: normed input [T, E] bf16. Returns (o [T, E] bf16, max_logits [H])."""
        c = self.cfg
        T = x.shape[0]
        E, H = c["emb_dim"], c["num_query_heads"]
        Rkv = c["kv_lora_rank"]
        Dn, Dr, Dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        eps = c["normalization_layer_epsilon"]
        if c["q_lora_rank"] > 0:
            cq = matmul_bf16(x, w["self_attention/wq_a/kernel"])
            if "no-q-norm" not in self.mutations:
                cq = rmsnorm(cq, w["self_attention/q_norm/scale"], eps)
            q = matmul_bf16(cq, w["self_attention/wq_b/kernel"].reshape(c["q_lora_rank"], -1))
        else:
            q = matmul_bf16(x, w["self_attention/query/kernel"].reshape(E, -1))
        q = q.reshape(T, H, Dn + Dr)
        q_nope, q_pe = q[..., :Dn], self._rope(q[..., Dn:], pos)
        s = 1.0 if "no-softmax-scale" in self.mutations else softmax_scale(c)
        if "no-mscale" in self.mutations:
            s = (Dn + Dr) ** -0.5
        query = bf16((np.concatenate([q_nope, q_pe], -1).astype(np.float64) *
                      np.float64(bf16(np.float32(s)))).astype(np.float32))
        ckv = matmul_bf16(x, w["self_attention/wkv_a/kernel"])                 # [T, Rkv+Dr]
        latent = ckv[:, :Rkv]
        if "no-kv-norm" not in self.mutations:
            latent = rmsnorm(latent, w["self_attention/kv_norm/scale"], eps)
        k_pe = self._rope(ckv[:, None, Rkv:], pos)                             # [T, 1, Dr]
        kv = matmul_bf16(latent, w["self_attention/wkv_b/kernel"].reshape(Rkv, -1))
        kv = kv.reshape(T, H, Dn + Dv)
        key = np.concatenate([kv[..., :Dn], np.broadcast_to(k_pe, (T, H, Dr))], axis=-1)
        a, maxl = mla_attention(query, key, kv[..., Dn:])
        o = matmul_bf16(a.reshape(T, H * Dv), w["self_attention/out/kernel"].reshape(H * Dv, E))
        return o, maxl

    def moe(self, x, w, rec=None):
        c = self.cfg
        gl = matmul_bf16(x, w[MOE + "gate/kernel"])
        bias = w.get(MOE + "gate/bias")
        r = route(gl, bias, c, self.mutations)
        if rec is not None:
            rec.append(r)
        idx, wts = r["indices"], r["weights"].astype(np.float64)
        # every expert on every token (batched over experts; the rounding is elementwise, so this
        # equals computing only the selected (token, expert) pairs), then the selected ones
        y = mlp(x[None], w[MOE + "wi_0"], w[MOE + "wi_1"], w[MOE + "wo"])     # [X, T, E]
        ysel = y[idx, np.arange(x.shape[0])[:, None]]                         # [T, k, E]
        routed = bf16(np.einsum("tk,tke->te", wts, ysel.astype(np.float64)).astype(np.float32))
        if c["shared_experts"] > 0 and "no-shared" not in self.mutations:
            sh = mlp(x, w[SHARED + "wi_0/kernel"], w[SHARED + "wi_1/kernel"],
                     w[SHARED + "wo/kernel"])
            return bf16((routed.astype(np.float64) + sh.astype(np.float64)).astype(np.float32))
        return routed

    # -- forward -------------------------------------------------------------------------------

    def hidden(self, tokens, positions=None, record=None, upto=None):
        """Final-normed hidden states [T, E]. `record` (dict) collects "max_logits" ([H] per
        layer) and "routing" (route() dicts per MoE layer). `upto`: stop after that layer
        (returns None) -- for statistics of the first layers only."""
        c = self.cfg
        eps = c["normalization_layer_epsilon"]
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence")
        if tokens.min() < 0 or tokens.max() >= c["vocab_size"]:
            raise ValueError("token id out of range")
        T = tokens.size
        pos = np.arange(T) if positions is None else np.asarray(positions, dtype=np.int64)
        x = self.g["embedding"][tokens]
        for i, w in enumerate(self.layers):
            h = rmsnorm(x, w["pre_self_attention_layer_norm/scale"], eps)
            o, maxl = self.mla(h, w, pos)
            if record is not None:
                record.setdefault("max_logits", []).append(maxl)
            if upto is not None and i >= upto:
                return None
            x = bf16((x.astype(np.float64) + o.astype(np.float64)).astype(np.float32))
            h = rmsnorm(x, w["post_self_attention_layer_norm/scale"], eps)
            if w["kind"] == "dense":
                f = mlp(h, w["mlp/wi_0/kernel"], w["mlp/wi_1/kernel"], w["mlp/wo/kernel"])
            else:
                f = self.moe(h, w, None if record is None else record.setdefault("routing", []))
            x = bf16((x.astype(np.float64) + f.astype(np.float64)).astype(np.float32))
        return rmsnorm(x, self.g["final_norm"], eps)

    def logits(self, tokens, positions=None, record=None):
        c = self.cfg
        y = self.hidden(tokens, positions, record)
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
        seq = [int(t) for t in tokens]
        out = []
        for _ in range(n):
            nxt = int(np.argmax(self.logits(seq)[-1]))
            out.append(nxt)
            seq.append(nxt)
        return out

    def greedy_with_margins(self, tokens, n, stop_below=None):
        seq = [int(t) for t in tokens]
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

    def max_logits(self, prompts, upto=None, per_prompt=False):
        """Per layer, per head max pre-softmax logit (after the softmax scale, unmasked
        positions), docs/maxtext.md §3. `prompts`: one token list or a list of them. Returns [L, H] (max
        over prompts) or [P, L, H] with per_prompt. `upto`: only layers 0..upto (others NaN)."""
        prompts = _as_prompts(prompts)
        L, H = len(self.layers), self.cfg["num_query_heads"]
        out = np.full((len(prompts), L, H), np.nan, dtype=np.float32)
        for p, toks in enumerate(prompts):
            rec = {}
            self.hidden(toks, record=rec, upto=upto)
            for i, m in enumerate(rec["max_logits"]):
                out[p, i] = m
        return out if per_prompt else out.max(axis=0)

    def routing(self, tokens):
        """route() dicts of every MoE layer for one prefill of `tokens`."""
        rec = {}
        self.hidden(tokens, record=rec)
        return rec.get("routing", [])

    def routing_margin(self, tokens):
        """(min expert-selection margin, min group margin) over every MoE layer and position."""
        rs = self.routing(tokens)
        if not rs:
            return float("inf"), float("inf")
        return (float(min(r["margin"].min() for r in rs)),
                float(min(r["group_margin"].min() for r in rs)))


def _as_prompts(tokens):
    if len(tokens) and isinstance(tokens[0], (list, tuple, np.ndarray)):
        return [[int(t) for t in p] for p in tokens]
    return [[int(t) for t in tokens]]


def relative_gaps(logits):
    return _lr.relative_gaps(logits)


def choose_prompt(model, length, n_gen, seed=0, min_gap=0.03, min_route_gap=0.03,
                  max_tries=200, context_sensitive=True):
    """Deterministically pick a prompt for exact engine-vs-reference comparisons.

    As llama_ref.choose_prompt (relative top-1/top-2 logit gap >= min_gap at every prompt
    position and greedy step; greedy continuation changed by each simulated decode-path bug when
    context_sensitive), plus: on the whole sequence the engine routes (prompt + the first n_gen-1
    greedy tokens), every MoE layer's k-th vs (k+1)-th selection score gap and group gap is
    >= min_route_gap of the row's max |score| (so expert choice is not decided by bf16 noise).
    Returns (tokens, greedy, min_gap_seen, sensitive, min_route_gap_seen)."""
    V = model.cfg["vocab_size"]
    best = None
    for i in range(max_tries):
        rng = np.random.default_rng(seed * 1000 + i)
        toks = [int(t) for t in rng.integers(0, V, length)]
        gaps = relative_gaps(model.logits(toks))
        if gaps.min() < min_gap and best is not None:
            continue
        rg = min(model.routing_margin(toks))
        if rg < min_route_gap and best is not None:
            continue
        greedy, ggaps = model.greedy_with_margins(toks, n_gen,
                                                  stop_below=min_gap if best else None)
        if len(greedy) < n_gen:
            continue
        g = min(float(gaps.min()), min(ggaps) if ggaps else 1.0)
        rg = min(model.routing_margin(toks + greedy[:-1])) if n_gen > 1 else rg
        sensitive = False
        if g >= min_gap and rg >= min_route_gap and context_sensitive:
            sensitive = all(_lr.decode_bug_greedy(model, toks, n_gen, bug) != greedy
                            for bug in _lr.DECODE_BUGS)
        ok = g >= min_gap and rg >= min_route_gap
        cand = (toks, greedy, g, sensitive, rg)
        key = (ok, min(g, min_gap), min(rg, min_route_gap), sensitive, g)
        if best is None or key > best[0]:
            best = (key, cand)
        if ok and (sensitive or not context_sensitive):
            break
    return best[1]


# ------------------------------------------------------------------------------------------------
# entry points


def reference_logits(checkpoint_paths, config, tokens, overrides=(), scan_axis=None):
    return RefModel.load(checkpoint_paths, config, overrides, scan_axis).logits(tokens)


def reference_greedy(checkpoint_paths, config, tokens, n, overrides=(), scan_axis=None):
    return RefModel.load(checkpoint_paths, config, overrides, scan_axis).greedy(tokens, n)


def reference_max_logits(checkpoint_paths, config, tokens, overrides=(), scan_axis=None,
                         per_prompt=False):
    """[L, H] f32: per global layer (dense first) and head, the max scaled pre-softmax logit over
    unmasked positions, max over the prompts if `tokens` is a list of prompts."""
    return RefModel.load(checkpoint_paths, config, overrides, scan_axis).max_logits(
        tokens, per_prompt=per_prompt)


def main(argv=None):
    return _lr.cli_main(RefModel, "numpy reference forward pass (DeepSeek family)", argv,
                        with_max_logits=True)


if __name__ == "__main__":
    sys.exit(main())
