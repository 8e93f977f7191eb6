#!/usr/bin/python3
"""Write small MaxText-layout DeepSeek / Kimi-K2 checkpoints (decoder_block deepseek) for tests.

Importable API (same shape as make_fixture.py, whose Fixture class and key layouts are reused):
    v = variant_by_name("ds3-linen-scan1-f32")          # or DSVariant(...)
    fx = write_fixture(v, "/tmp/dir")   # -> make_fixture.Fixture(checkpoint_args, config_path, ...)
CLI:
    make_deepseek_fixture.py --out DIR [--variant NAME | --list] [--set field=value ...]

Parameter keys and shapes (docs/maxtext.md §1.3, §1.7; kernels [in..., out...]; unscanned shapes):
    token_embedder/embedding [V, E]; decoder/decoder_norm/scale [E]; decoder/logits_dense/kernel
    [E, V] (untied only); per layer, under decoder/dense_layers/ and decoder/moe_layers/:
      pre_self_attention_layer_norm/scale [E]       post_self_attention_layer_norm/scale [E]
      self_attention/wq_a/kernel [E, Rq]            self_attention/q_norm/scale [Rq]     (Rq > 0)
      self_attention/wq_b/kernel [Rq, H, Dn+Dr]                                          (Rq > 0)
      self_attention/query/kernel [E, H, Dn+Dr]                                          (Rq = 0)
      self_attention/wkv_a/kernel [E, Rkv+Dr]       self_attention/kv_norm/scale [Rkv]
      self_attention/wkv_b/kernel [Rkv, H, Dn+Dv]   self_attention/out/kernel [H, Dv, E]
    dense layers:  mlp/wi_0/kernel [E, F], mlp/wi_1/kernel [E, F], mlp/wo/kernel [F, E]
    MoE layers:    DeepSeekMoeBlock_0/MoeBlock_0/gate/kernel [E, X], .../gate/bias [X] (if bias),
                   DeepSeekMoeBlock_0/MoeBlock_0/wi_0 [X, E, Fm], wi_1 [X, E, Fm], wo [X, Fm, E]
                   (no `kernel` leaf), DeepSeekMoeBlock_0/shared_experts/{wi_0,wi_1}/kernel
                   [E, S*Fm] and wo/kernel [S*Fm, E] (shared_experts S > 0)
Scanned: each group is stacked with the layer axis inserted at `scan_axis` of every tensor
(docs/maxtext.md §1.2): axis 1 (default) gives wq_b [Rq, L, H, Dqk], norms [E, L], bias [X, L],
experts [X, L, E, Fm]; axis 0 gives [L, ...]. A group with no layers (first_num_dense_layers = 0) is
absent. Unrolled: decoder/dense_layers_{i}, decoder/moe_layers_{j} (j restarts at 0).
Key layouts / separators / dtypes / sharding: as make_fixture.py (linen = params/params/P,
nnx = model/P, nnx-decode = P/value, nnx-model-value = model/P/value; "." or "/").

Weight design (see make_weights): attention logits of a few units with per-head temperature
differences (so QK-Clip has heads above and below a threshold), a built-in next-token map in the
output head (well separated logits, as make_fixture.py), and a "routing code": the last X
embedding dims carry a per-token code that the router reads and that no sub-block writes to, so
the k-th and (k+1)-th expert scores are separated by a wide, structural gap while the choice of
experts still varies from token to token (and from layer to layer via a per-layer permutation).
With a router bias, one expert slot gets a large negative bias and about half the tokens carry it
among k+1 strong candidates: the selection then depends on the bias being applied. With
group-limited routing the codes are laid out so that limiting to the top groups changes the
choice, with wide gaps both between groups and inside the kept groups.
"""

import dataclasses
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as st  # noqa: E402
import make_fixture as mf  # noqa: E402
import deepseek_ref as dr  # noqa: E402  (shape table and softmax scale only)

LAYOUT_PREFIX = mf.LAYOUT_PREFIX
Fixture = mf.Fixture


@dataclasses.dataclass
class DSVariant:
    name: str = "default"
    decoder_block: str = "deepseek"
    model_name: str = "deepseek3-tiny"     # deepseek3*/4*: pre-bias weighting + group routing
    emb_dim: int = 64
    num_query_heads: int = 4
    num_decoder_layers: int = 3
    first_num_dense_layers: int = 1
    mlp_dim: int = 96
    moe_mlp_dim: int = 32
    num_experts: int = 8
    num_experts_per_tok: int = 2
    shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    routed_score_func: str = "sigmoid"
    routed_bias: bool = True
    n_routing_groups: int = -1
    topk_routing_group: int = -1
    q_lora_rank: int = 32
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_max_timescale: float = 10000.0
    max_position_embeddings: int = 163840
    original_max_position_embeddings: int = 4096
    rope_factor: float = 40.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    rope_interleave: bool = True
    rope_truncate: bool = True
    normalization_layer_epsilon: float = 1e-6
    vocab_size: int = 256
    logits_via_embedding: bool = False
    normalize_embedding_logits: bool = True
    max_target_length: int = 128
    layout: str = "linen"                # see LAYOUT_PREFIX
    sep: str = "."
    scanned: bool = True
    scan_axis: int = 1
    config_scan_axis: object = "same"    # value written to param_scan_axis: "same", None, int
    dtype: str = "f32"                   # f32 | bf16 | f16
    shards: int = 0
    checkpoint_mode: str = "index"
    seed: int = 0
    # weight-scale knobs
    attn_temp: float = 2.0               # typical |attention logit| (after the softmax scale)
    head_temps: tuple = (1.7, 1.0, 0.55, 1.25)   # per-head multipliers (cycled over heads)
    layer_gain: float = 0.6
    logit_std: float = 1.0
    bigram: float = 32.0
    code_amp: float = 1.5                # amplitude of the routing code in the embedding
    router_gain: float = 2.5             # gate weight on the code dims
    router_noise: float = 0.3            # std of the context-dependent part of the gate logits
    context_sensitive: bool = True
    set_overrides: tuple = ()
    extra_export_args: tuple = ()

    @property
    def num_moe(self):
        return self.num_decoder_layers - self.first_num_dense_layers

    @property
    def group_routing(self):
        return dr.uses_group_routing(config_dict(self))

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------------------
# config


def config_dict(v):
    """MaxText-named config fields (JSON form)."""
    c = {
        "decoder_block": v.decoder_block,
        "model_name": v.model_name,
        "attention_type": "mla",
        "emb_dim": v.emb_dim,
        "num_query_heads": v.num_query_heads,
        "num_kv_heads": v.num_query_heads,
        "num_decoder_layers": v.num_decoder_layers,
        "first_num_dense_layers": v.first_num_dense_layers,
        "mlp_dim": v.mlp_dim,
        "moe_mlp_dim": v.moe_mlp_dim,
        "num_experts": v.num_experts,
        "num_experts_per_tok": v.num_experts_per_tok,
        "shared_experts": v.shared_experts,
        "routed_scaling_factor": v.routed_scaling_factor,
        "routed_score_func": v.routed_score_func,
        "routed_bias": v.routed_bias,
        "n_routing_groups": v.n_routing_groups,
        "topk_routing_group": v.topk_routing_group,
        "q_lora_rank": v.q_lora_rank,
        "kv_lora_rank": v.kv_lora_rank,
        "qk_nope_head_dim": v.qk_nope_head_dim,
        "qk_rope_head_dim": v.qk_rope_head_dim,
        "v_head_dim": v.v_head_dim,
        "rope_type": "yarn",
        "rope_max_timescale": v.rope_max_timescale,
        "max_position_embeddings": v.max_position_embeddings,
        "original_max_position_embeddings": v.original_max_position_embeddings,
        "rope_factor": v.rope_factor,
        "beta_fast": v.beta_fast,
        "beta_slow": v.beta_slow,
        "mscale": v.mscale,
        "rope_interleave": v.rope_interleave,
        "rope_truncate": v.rope_truncate,
        "rope_attention_scaling": False,
        "normalization_layer_epsilon": v.normalization_layer_epsilon,
        "vocab_size": v.vocab_size,
        "logits_via_embedding": v.logits_via_embedding,
        "normalize_embedding_logits": v.normalize_embedding_logits,
        "mlp_activations": ["silu", "linear"],
        "scan_layers": v.scanned,
        "max_target_length": v.max_target_length,
    }
    if v.config_scan_axis == "same":
        c["param_scan_axis"] = v.scan_axis
    elif v.config_scan_axis is not None:
        c["param_scan_axis"] = int(v.config_scan_axis)
    return c


# ------------------------------------------------------------------------------------------------
# weights


def _score_scale(v):
    """Typical selected score: 1 for sigmoid, ~1/k for softmax, ~gate logit for no score func."""
    if v.routed_score_func == "softmax":
        return 1.0 / v.num_experts_per_tok
    if v.routed_score_func == "sigmoid":
        return 1.0
    return 3.0


def _bias_trick(v):
    return v.routed_bias and not v.group_routing


def routing_codes(v, rng):
    """[V, X] per-token code values in slot order (slot j -> expert perm_l[j] in MoE layer l)."""
    V, X, k = v.vocab_size, v.num_experts, v.num_experts_per_tok
    # softmax: probabilities grow exponentially with the logit, so the strong codes are kept
    # close together (no tiny "strong" probability next to a weak one plus its bias)
    lo, hi = (1.0, 1.15) if v.routed_score_func == "softmax" else (0.9, 1.6)
    codes = -rng.uniform(lo, hi, size=(V, X))                    # weak by default
    if v.group_routing:
        G, kg = v.n_routing_groups, v.topk_routing_group
        n = X // G
        if k != 3 or kg != 2 or n < 2 or G < 3:
            raise ValueError("group fixtures need k=3, topk_routing_group=2, >=3 groups of >=2")
        for t in range(V):
            a, b, c = rng.permutation(G)[:3]
            ia = rng.permutation(n)[:2]
            ib = rng.permutation(n)[:2]
            ic = rng.integers(n)
            codes[t, a * n + ia] = rng.uniform(lo, hi, 2)          # group A: two strong
            codes[t, b * n + ib[0]] = rng.uniform(lo, hi)          # group B: strong + medium
            codes[t, b * n + ib[1]] = 0.0
            codes[t, c * n + ic] = rng.uniform(lo, hi)             # group C: one strong
        return codes
    slots = X - 1 if _bias_trick(v) else X
    for t in range(V):
        strong = list(rng.permutation(slots)[:k])
        if _bias_trick(v) and rng.random() < 0.5:
            strong.append(X - 1)                                   # the penalised slot
        codes[t, strong] = rng.uniform(lo, hi, len(strong))
    return codes


def expert_permutation(v, rng):
    X = v.num_experts
    if v.group_routing:   # group-preserving: permute groups and members inside each group
        G = v.n_routing_groups
        n = X // G
        gp = rng.permutation(G)
        return np.concatenate([gp[g] * n + rng.permutation(n) for g in range(G)])
    return rng.permutation(X)


def make_weights(v):
    """Seeded random f32 weights. Returns (globals {canonical name: array}, layers [ {sub: array}
    ] in global order, meta {"code_dims", "perms"})."""
    rng = np.random.default_rng(v.seed)
    cfg = dr.load_config(config_dict(v))
    E, H, V, X = v.emb_dim, v.num_query_heads, v.vocab_size, v.num_experts
    Rq, Rkv = v.q_lora_rank, v.kv_lora_rank
    Dn, Dr, Dv = v.qk_nope_head_dim, v.qk_rope_head_dim, v.v_head_dim
    F, Fm, S = v.mlp_dim, v.moe_mlp_dim, v.shared_experts
    if X > E // 2:
        raise ValueError("the routing code needs num_experts <= emb_dim / 2")
    cd = np.arange(E - X, E)                       # code dims (slot j -> dim cd[j])
    free = np.ones(E)
    free[cd] = 0.0                                 # sub-blocks never write to the code dims

    g = {}
    emb = rng.standard_normal((V, E))
    emb[:, cd] = v.code_amp * routing_codes(v, rng)
    g["token_embedder/embedding"] = emb
    g["decoder/decoder_norm/scale"] = 1.0 + 0.15 * rng.standard_normal(E)
    if not v.logits_via_embedding:
        perm = rng.permutation(V)
        w = rng.standard_normal((E, V)) * (v.logit_std / np.sqrt(E))
        w += (emb[perm] * free).T * (v.bigram / E)
        g["decoder/logits_dense/kernel"] = w

    s = dr.softmax_scale(cfg)
    base = np.sqrt(v.attn_temp / (s * np.sqrt(Dn + Dr)))   # q and k element scale
    temps = np.array([v.head_temps[h % len(v.head_temps)] for h in range(H)])
    rsf = v.routed_scaling_factor if v.routed_score_func == "sigmoid" else 1.0
    softmax = v.routed_score_func == "softmax"
    layers, perms = [], []
    for i in range(v.num_decoder_layers):
        t = {}
        t["pre_self_attention_layer_norm/scale"] = 1.0 + 0.15 * rng.standard_normal(E)
        qs = (base * temps)[None, :, None]
        if Rq > 0:
            t["self_attention/wq_a/kernel"] = rng.standard_normal((E, Rq)) / np.sqrt(E)
            t["self_attention/q_norm/scale"] = 1.0 + 0.15 * rng.standard_normal(Rq)
            t["self_attention/wq_b/kernel"] = rng.standard_normal((Rq, H, Dn + Dr)) / np.sqrt(
                Rq) * qs
        else:
            t["self_attention/query/kernel"] = rng.standard_normal((E, H, Dn + Dr)) / np.sqrt(
                E) * qs
        wkv_a = rng.standard_normal((E, Rkv + Dr)) / np.sqrt(E)
        wkv_a[:, Rkv:] *= base
        t["self_attention/wkv_a/kernel"] = wkv_a
        t["self_attention/kv_norm/scale"] = 1.0 + 0.15 * rng.standard_normal(Rkv)
        wkv_b = rng.standard_normal((Rkv, H, Dn + Dv)) / np.sqrt(Rkv)
        wkv_b[..., :Dn] *= base
        t["self_attention/wkv_b/kernel"] = wkv_b
        t["self_attention/out/kernel"] = rng.standard_normal((H, Dv, E)) * (
            v.layer_gain / np.sqrt(H * Dv)) * free
        t["post_self_attention_layer_norm/scale"] = 1.0 + 0.15 * rng.standard_normal(E)
        if softmax:   # the router input: equal scales on the code dims (see routing_codes)
            t["post_self_attention_layer_norm/scale"][cd] = 1.0
        if i < v.first_num_dense_layers:
            t["mlp/wi_0/kernel"] = rng.standard_normal((E, F)) / np.sqrt(E)
            t["mlp/wi_1/kernel"] = rng.standard_normal((E, F)) / np.sqrt(E)
            t["mlp/wo/kernel"] = rng.standard_normal((F, E)) * (
                2 * v.layer_gain / np.sqrt(F)) * free
            perms.append(None)
        else:
            p = expert_permutation(v, rng)
            perms.append(p)
            gate = rng.standard_normal((E, X)) * (v.router_noise / np.sqrt(E) *
                                                  (0.5 if softmax else 1.0))
            gate[cd, :] = 0.0
            gate[cd, p] += v.router_gain
            t[dr.MOE + "gate/kernel"] = gate
            if v.routed_bias:
                sc = _score_scale(v)
                b = np.zeros(X)
                # +-0.2 (of the score scale) moves the weights by ~20%, so pre- vs post-bias
                # weighting shows in the logits; group routing: smaller, to keep the group gaps
                jit = 0.04 if v.group_routing else 0.2
                b[p] = rng.uniform(-jit, jit, X) * sc
                if _bias_trick(v):   # below every weak score, whatever its own score
                    b[p[X - 1]] = -1.2 * (sc if v.routed_score_func == "" else 1.0)
                t[dr.MOE + "gate/bias"] = b
            t[dr.MOE + "wi_0"] = rng.standard_normal((X, E, Fm)) / np.sqrt(E)
            t[dr.MOE + "wi_1"] = rng.standard_normal((X, E, Fm)) / np.sqrt(E)
            t[dr.MOE + "wo"] = rng.standard_normal((X, Fm, E)) * (
                2 * v.layer_gain / np.sqrt(Fm) / rsf) * free
            if S > 0:
                t[dr.SHARED + "wi_0/kernel"] = rng.standard_normal((E, S * Fm)) / np.sqrt(E)
                t[dr.SHARED + "wi_1/kernel"] = rng.standard_normal((E, S * Fm)) / np.sqrt(E)
                t[dr.SHARED + "wo/kernel"] = rng.standard_normal((S * Fm, E)) * (
                    1.5 * v.layer_gain / np.sqrt(S * Fm)) * free
        layers.append(t)
    cast = lambda d: {k: np.asarray(a, dtype=np.float32) for k, a in d.items()}  # noqa: E731
    return cast(g), [cast(t) for t in layers], {"code_dims": cd, "perms": perms}


def stack_layers(layers, axis):
    return {name: np.stack([t[name] for t in layers], axis=axis) for name in layers[0]}


def canonical_tensors(v):
    """The (pre-storage, f32) tensors of the checkpoint under canonical '/'-joined paths."""
    g, layers, _ = make_weights(v)
    out = dict(g)
    groups = (("dense_layers", layers[:v.first_num_dense_layers]),
              ("moe_layers", layers[v.first_num_dense_layers:]))
    for gname, group in groups:
        if not group:
            continue
        if v.scanned:
            for name, arr in stack_layers(group, v.scan_axis).items():
                out["decoder/%s/%s" % (gname, name)] = arr
        else:
            for j, t in enumerate(group):
                for name, arr in t.items():
                    out["decoder/%s_%d/%s" % (gname, j, name)] = arr
    return out


def storage_key(v, canonical):
    prefix, suffix = LAYOUT_PREFIX[v.layout]
    return (prefix + canonical + suffix).replace("/", v.sep)


def storage_dtype(v):
    return {"f32": "F32", "bf16": "BF16", "f16": "F16"}[v.dtype]


def write_fixture(v, directory):
    """Write the checkpoint and config of variant `v` into `directory` (created)."""
    os.makedirs(directory, exist_ok=True)
    tensors = canonical_tensors(v)
    dt = storage_dtype(v)
    stored = {storage_key(v, c): (tensors[c], dt) for c in sorted(tensors)}
    meta = {"format": "pt", "kiln_fixture": v.name}
    ckpt_dir = os.path.join(directory, "ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    if v.shards and v.shards >= 2:
        index = st.write_sharded(ckpt_dir, stored, v.shards, metadata=meta)
        files = [os.path.join(ckpt_dir, st.shard_filename(i, v.shards)) for i in range(v.shards)]
        args = [index] if v.checkpoint_mode == "index" else list(files)
    else:
        path = os.path.join(ckpt_dir, "model.safetensors")
        st.write_safetensors(path, stored, metadata=meta)
        files, args = [path], [path]
    cfg_path = os.path.join(directory, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(config_dict(v), f, indent=2)
    with open(os.path.join(directory, "fixture.json"), "w") as f:
        json.dump(dataclasses.asdict(v), f, indent=2)
    return Fixture(variant=v, directory=directory, checkpoint_args=args, checkpoint_files=files,
                   config_path=cfg_path, config=config_dict(v), keys=list(stored))


def ref_model(fx):
    """The numpy reference model of a written fixture (bf16-rounded weights)."""
    v = fx.variant
    return dr.RefModel.load(fx.checkpoint_args, fx.config_path, v.set_overrides,
                            v.scan_axis if v.scanned else None)


# ------------------------------------------------------------------------------------------------
# the named variant matrix (every option appears at least once; each runs in well under 1 s)

BASE = DSVariant()
KIMI = dict(model_name="kimi-k2-tiny", routed_scaling_factor=2.827, rope_max_timescale=50000.0,
            max_position_embeddings=131072, rope_factor=32.0, beta_fast=1.0, beta_slow=1.0)
DS2 = dict(model_name="deepseek2-tiny", routed_score_func="softmax", routed_bias=False,
           routed_scaling_factor=1.0, mscale=0.707, shared_experts=2, q_lora_rank=0,
           num_experts_per_tok=3)


def variants():
    V = BASE.replace
    return [
        # DeepSeek-V3 style (sigmoid + bias, pre-bias weighting, q_lora, 1 dense + 2 MoE, 1 shared)
        # over Linen/NNX x scan axis 1/0 x f32/bf16, separators and NNX key forms alternating
        V(name="ds3-linen-scan1-f32", seed=201),
        V(name="ds3-linen-scan1-bf16-slash", dtype="bf16", sep="/", seed=202),
        V(name="ds3-linen-scan0-f32", scan_axis=0, seed=203),
        V(name="ds3-nnx-scan1-bf16", layout="nnx", dtype="bf16", seed=204),
        V(name="ds3-nnx-scan0-f32-value-slash", layout="nnx-model-value", scan_axis=0, sep="/",
          seed=205),
        V(name="ds3-nnxdecode-unrolled-bf16", layout="nnx-decode", scanned=False, dtype="bf16",
          seed=206),
        V(name="ds3-linen-unrolled-f32", scanned=False, seed=207),
        V(name="ds3-f16-sharded", dtype="f16", shards=3, seed=208),
        # dense group with L > 1 (scan slicing of the dense group is really exercised)
        V(name="ds3-2dense-scan1", num_decoder_layers=4, first_num_dense_layers=2, seed=209),
        V(name="ds3-2dense-nnx-scan0-bf16", num_decoder_layers=4, first_num_dense_layers=2,
          layout="nnx", scan_axis=0, dtype="bf16", seed=210),
        # first_num_dense_layers = 0 (no dense group at all)
        V(name="ds3-nodense-scan1", first_num_dense_layers=0, seed=211),
        V(name="ds3-nodense-unrolled-nnxdecode", first_num_dense_layers=0, scanned=False,
          layout="nnx-decode", sep="/", seed=212),
        # routing options
        V(name="ds3-nobias", routed_bias=False, seed=213),
        V(name="ds3-groups", num_experts=16, num_experts_per_tok=3, n_routing_groups=4,
          topk_routing_group=2, seed=214),
        V(name="ds3-groups-nnx-scan0-bf16", num_experts=16, num_experts_per_tok=3,
          n_routing_groups=4, topk_routing_group=2, layout="nnx", scan_axis=0, dtype="bf16",
          seed=215),
        V(name="ds3-softmax-bias", routed_score_func="softmax", routed_scaling_factor=1.0,
          seed=216),
        V(name="ds3-shared0", shared_experts=0, seed=217),
        V(name="ds3-shared2-top3", shared_experts=2, num_experts_per_tok=3, seed=218),
        # q_lora_rank = 0 (query kernel) with the V3 router
        V(name="ds3-qlora0", q_lora_rank=0, seed=219),
        # output head tied to the embedding
        V(name="ds3-tied", logits_via_embedding=True, context_sensitive=False, seed=220),
        # RoPE input pairs (x[i], x[i+d/2]) instead of interleaved
        V(name="ds3-rope-halfsplit-input", rope_interleave=False, seed=221),
        # YaRN with a short original context: the correction range moves to the high
        # frequencies, so the frequency mix matters at the test's short positions (with the real
        # constants only the slowest pairs are rescaled, invisible below ~100 tokens)
        V(name="ds3-yarn-orig64", original_max_position_embeddings=64,
          max_position_embeddings=2560, mscale=0.707, seed=229),
        # max_position_embeddings == original: no mscale^2 in the softmax scale (docs/maxtext.md §2.5 step
        # 3), while the YaRN frequency mix still applies (§2.3c has no such condition)
        V(name="ds3-maxpos-eq-orig", max_position_embeddings=4096, seed=230),
        # Kimi-K2 style: post-bias weighting (model_name not deepseek3*), theta 5e4, factor 32
        V(name="kimi-linen-scan1-f32", seed=222, **KIMI),
        V(name="kimi-yarn-orig64-nnx-unrolled-bf16", layout="nnx", scanned=False, dtype="bf16",
          seed=223, **dict(KIMI, original_max_position_embeddings=64,
                           max_position_embeddings=2048)),
        # group routing fields are ignored for non-deepseek3 names (docs/maxtext.md §2.7)
        V(name="kimi-groups-ignored", num_experts=16, num_experts_per_tok=3, n_routing_groups=4,
          topk_routing_group=2, seed=224, **KIMI),
        # DeepSeek-V2(-Lite) style: softmax, no bias, no renormalisation, q_lora_rank 0, 2 shared
        V(name="ds2-lite-qlora0-softmax", seed=225, **DS2),
        V(name="ds2-softmax-bias-nnx-scan0", layout="nnx", scan_axis=0, seed=226,
          **dict(DS2, routed_bias=True)),
        # QK-Clip e2e fixture: 4 layers (1 dense), heads above/below a threshold in every layer
        V(name="qkclip-ds3", num_decoder_layers=4, attn_temp=3.0, seed=227),
        V(name="qkclip-qlora0-kimi", num_decoder_layers=4, q_lora_rank=0, attn_temp=3.0,
          seed=231, **KIMI),
    ]


def variant_by_name(name):
    for v in variants():
        if v.name == name:
            return v
    raise KeyError(name)


def main(argv=None):
    return mf.cli_main(__doc__.split("\n")[0], DSVariant, variants, variant_by_name,
                       write_fixture, "ds3-linen-scan1-f32", argv)


if __name__ == "__main__":
    sys.exit(main())
