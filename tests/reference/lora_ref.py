#!/usr/bin/python3
"""LoRA adapters for kiln's tests: seeded adapter generator (MaxText and PEFT formats) and an
independent reference of the merged model, written from docs/maxtext.md §4 (LoRA),
§1.2/§1.4/§1.7 (layouts) and §10 (HF <-> MaxText mapping), not from kiln's C++.

Importable API:
    spec = AdapterSpec(fmt="peft", targets=("q", "k", "wi_0"), r=8, lora_alpha=16, seed=3)
    ad = write_adapter(fx, spec, "/tmp/adapter")   # fx: make_fixture / make_deepseek_fixture
    model = merged_model(fx, [ad], user_scale=1.0)  # llama_ref.RefModel / deepseek_ref.RefModel
    base = merged_model(fx, [])                    # the fixture's own reference model
    deltas = read_adapter(ad.directory, base_cfg)  # {(layer, module): Pair(A2, B2, scale)}
    effect(model, base, tokens)                    # max|dlogit| / max|base logit|
CLI:
    lora_ref.py make FIXTURE_DIR OUT_DIR [--format maxtext|peft] [--targets q,v,...] ...
    lora_ref.py logits FIXTURE_DIR --adapter DIR [--adapter DIR] [--lora-scale S] --tokens 1,2,3
                [--out F.npy] [--max-tokens N]

On-disk formats written (and read back by read_adapter, the reference's own reader):
  MaxText (docs/maxtext.md §4.1): DIR/adapter_config.json {"r", "lora_alpha", "target_modules"} and one
    safetensors file DIR/adapter.safetensors. Keys: Linen
    `params.params.decoder.<group>.<module path>.lora_a.kernel` (and `lora_b.kernel`), NNX
    single-nested `decoder.<group>...`; separator "." or "/" (the leaf names `lora_a.kernel` /
    `lora_b.kernel` always contain a literal dot). Groups: llama `layers`; DeepSeek `dense_layers`
    and `moe_layers`. Scanned: the layer axis at index 1 of both A and B; unrolled `<group>_<i>`.
    Unscanned shapes: A = in_dims + (r,), B = (r,) + out_dims, with in_dims the first axis of the
    base kernel (the first two for `self_attention/out` [H, D, E]) and out_dims the rest:
      query [E,H,D]: A [E,r], B [r,H,D]     out [H,D,E]: A [H,D,r], B [r,E]
      wkv_b [Rkv,H,Dn+Dv]: A [Rkv,r], B [r,H,Dn+Dv]     mlp/wo [F,E]: A [F,r], B [r,E]
    scale = lora_alpha / r. target_modules: q_proj/k_proj/v_proj/o_proj for
    self_attention.query/key/value/out (or, with names="path", every module as its dotted path),
    other modules as dotted paths (`mlp.wi_0`, `self_attention.wkv_b`).
  PEFT: DIR/adapter_config.json {"peft_type": "LORA", "r", "lora_alpha", "target_modules",
    "use_rslora", "rank_pattern", "alpha_pattern", "bias": "none", "use_dora": false,
    "modules_to_save": null, + a few benign fields PEFT writes} and DIR/adapter_model.safetensors
    with `base_model.model.model.layers.N.<hf module>.lora_A.weight` [r, in] and `lora_B.weight`
    [out, r]. scale = alpha/r (alpha/sqrt(r) with use_rslora); rank_pattern / alpha_pattern key P
    applies to module M ("model.layers.3.self_attn.q_proj") when
    re.fullmatch(r"(.*\\.)?(" + P + ")", M), first match in dict order.

Reference merge (per adapted layer and module), in MaxText kernel layout, f64:
    A2 [in, r] = A (MaxText) flattened | lora_A^T (PEFT);  B2 [r, out] = B flattened | lora_B^T
    PEFT, llama family (docs/maxtext.md §10.1): llama3.1 (interleaved RoPE) permutes every head's output
    columns of q and k: new[..., 2j] = old[..., j], new[..., 2j+1] = old[..., j + D/2]; llama2 /
    mistral (incl. llama3.1) multiply B of q by 1/sqrt(head_dim); qwen3 and DeepSeek: nothing.
    dW = scale * user_scale * sum_k outer(A2[:, k], B2[k, :])  (explicit loop over k: the result
    does not depend on BLAS blocking, so zero-padded ranks and exact power-of-two rescalings give
    bit-identical deltas)
    W' = bf16(f32(W_stored + sum of every adapter's dW))  (W_stored: the checkpoint's value as
    stored, possibly already bf16/f16-valued; rounded to bf16 once)
Run-time LoRA (y = x.W + s.(x.A).B) differs from this merged model by rounding only.

Generator: A ~ N(0, 1/in); B ~ N(0, sigma^2) with sigma chosen so that the MaxText-space delta
of every adapted (layer, module) has element std `gain` x std(W) (the PEFT files store the
inverse-transformed B), so each adapted tensor moves by a fixed relative amount. DeepSeek: B's
columns on the fixture's routing-code dims (the last num_experts embedding dims, which the base sub-blocks never
write, see make_deepseek_fixture) are zero for modules writing the residual stream (out, mlp/wo),
so expert selection keeps its structural margins.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as st  # noqa: E402
import llama_ref as lr  # noqa: E402
import deepseek_ref as dr  # noqa: E402

# ------------------------------------------------------------------------------------------------
# module tables

# MaxText module path (relative to the layer) -> HF module name (relative to model.layers.N.)
HF_NAME = {
    "self_attention/query": "self_attn.q_proj",
    "self_attention/key": "self_attn.k_proj",
    "self_attention/value": "self_attn.v_proj",
    "self_attention/out": "self_attn.o_proj",
    "self_attention/wq_a": "self_attn.q_a_proj",
    "self_attention/wq_b": "self_attn.q_b_proj",
    "self_attention/wkv_a": "self_attn.kv_a_proj_with_mqa",
    "self_attention/wkv_b": "self_attn.kv_b_proj",
    "mlp/wi_0": "mlp.gate_proj",
    "mlp/wi_1": "mlp.up_proj",
    "mlp/wo": "mlp.down_proj",
}
MT_FROM_HF = {v: k for k, v in HF_NAME.items()}
# MaxText target_modules short names (docs/maxtext.md §4.1)
MT_SHORT = {"self_attention/query": "q_proj", "self_attention/key": "k_proj",
            "self_attention/value": "v_proj", "self_attention/out": "o_proj"}
# short names accepted in AdapterSpec.targets
ALIASES = {
    "q": "self_attention/query", "query": "self_attention/query",
    "k": "self_attention/key", "key": "self_attention/key",
    "v": "self_attention/value", "value": "self_attention/value",
    "o": "self_attention/out", "out": "self_attention/out",
    "wq_a": "self_attention/wq_a", "wq_b": "self_attention/wq_b",
    "wkv_a": "self_attention/wkv_a", "wkv_b": "self_attention/wkv_b",
    "wi_0": "mlp/wi_0", "wi_1": "mlp/wi_1", "wo": "mlp/wo",
    "gate": "mlp/wi_0", "up": "mlp/wi_1", "down": "mlp/wo",
}
for _m, _h in HF_NAME.items():
    ALIASES.setdefault(_m, _m)
    ALIASES.setdefault(_m.replace("/", "."), _m)
    ALIASES.setdefault(_h, _m)
    ALIASES.setdefault(_h.split(".")[-1], _m)

PEFT_PREFIX = "base_model.model.model.layers."
PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
LEAF_A, LEAF_B = "lora_a.kernel", "lora_b.kernel"


def module_path(name):
    try:
        return ALIASES[name]
    except KeyError:
        raise KeyError("unknown LoRA target %r" % name) from None


# ------------------------------------------------------------------------------------------------
# the base model (config + f32 weights as stored)


def family_of(cfg):
    return "deepseek" if cfg["decoder_block"] == "deepseek" else "llama"


def base_config(fx):
    v = fx.variant
    scan = v.scan_axis if v.scanned else None
    if getattr(v, "decoder_block", "") == "deepseek":
        return dr.load_config(fx.config_path, v.set_overrides, scan)
    return lr.load_config(fx.config_path, v.set_overrides, scan)


def _llama_raw_weights(checkpoint_paths, cfg):
    """llama_ref.load_weights without the bf16 rounding (values as stored, f32)."""
    raw = st.read_checkpoint(checkpoint_paths)
    sep = "/" if any("/" in k for k in raw) else "."
    canon = {lr.canonical_name(k, sep): v for k, v in raw.items()}
    L, axis = cfg["num_decoder_layers"], cfg["param_scan_axis"]
    shapes = lr.expected_layer_shapes(cfg)
    layers = [dict() for _ in range(L)]
    for name, arr in canon.items():
        if name.startswith("decoder/layers/"):
            sub = name[len("decoder/layers/"):]
            for i in range(L):
                layers[i][sub] = np.take(arr, i, axis=axis)
        elif name.startswith("decoder/layers_"):
            idx, _, sub = name[len("decoder/layers_"):].partition("/")
            layers[int(idx)][sub] = arr
    g = {"embedding": canon["token_embedder/embedding"],
         "final_norm": canon["decoder/decoder_norm/scale"]}
    if not cfg["logits_via_embedding"]:
        g["logits_dense"] = canon["decoder/logits_dense/kernel"]
    for i, t in enumerate(layers):
        for sub, shp in shapes.items():
            if tuple(t[sub].shape) != tuple(shp):
                raise ValueError("layer %d %s: shape %s, expected %s" % (i, sub, t[sub].shape,
                                                                        shp))
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return ({k: f32(v) for k, v in g.items()},
            [{k: f32(v) for k, v in t.items()} for t in layers])


def load_base(fx):
    """(cfg, raw globals, raw layers): f32 values exactly as stored in the fixture."""
    cfg = base_config(fx)
    if family_of(cfg) == "deepseek":
        g, layers = dr.load_raw_weights(fx.checkpoint_args, cfg)
    else:
        g, layers = _llama_raw_weights(fx.checkpoint_args, cfg)
    return cfg, g, layers


def layer_kernel_shapes(cfg, layer):
    """{module path: base kernel shape} of every kernel LoRA may target in global layer `layer`."""
    if family_of(cfg) == "deepseek":
        shapes = dr.layer_shapes(cfg, dr.layer_kind(cfg, layer))
    else:
        shapes = lr.expected_layer_shapes(cfg)
    out = {}
    for m in HF_NAME:
        k = m + "/kernel"
        if k in shapes:
            out[m] = tuple(shapes[k])
    return out


def in_axes(module):
    return 2 if module == "self_attention/out" else 1


def split_dims(shape, module):
    n = in_axes(module)
    return tuple(shape[:n]), tuple(shape[n:])


def groups(cfg):
    """[(group name, first global layer, count)] (groups with no layers left out)."""
    L = cfg["num_decoder_layers"]
    if family_of(cfg) == "deepseek":
        nd = cfg["first_num_dense_layers"]
        gs = [("dense_layers", 0, nd), ("moe_layers", nd, L - nd)]
    else:
        gs = [("layers", 0, L)]
    return [g for g in gs if g[2] > 0]


def locate(cfg, layer):
    for name, first, count in groups(cfg):
        if first <= layer < first + count:
            return name, layer - first
    raise IndexError(layer)


def code_dims(cfg):
    """DeepSeek fixtures: the routing-code embedding dims (make_deepseek_fixture.make_weights)."""
    if family_of(cfg) != "deepseek":
        return np.zeros(0, dtype=int)
    E, X = cfg["emb_dim"], cfg["num_experts"]
    return np.arange(E - X, E)


# ------------------------------------------------------------------------------------------------
# PEFT specifics


def pattern_value(patterns, module_name, default):
    """PEFT rank_pattern / alpha_pattern lookup: first key P (dict order) with
    re.fullmatch(r"(.*\\.)?(" + P + ")", module_name)."""
    for p, val in (patterns or {}).items():
        if re.fullmatch(r"(.*\.)?(" + p + ")", module_name):
            return val
    return default


def peft_module_name(layer, module):
    return "model.layers.%d.%s" % (layer, HF_NAME[module])


def peft_scale(r, alpha, use_rslora):
    return float(alpha) / (math.sqrt(r) if use_rslora else float(r))


def interleave_perm(D):
    """docs/maxtext.md §10.1 llama3.1: new[..., 2j] = old[..., j], new[..., 2j+1] = old[..., j + D/2]."""
    idx = np.empty(D, dtype=np.int64)
    idx[0::2] = np.arange(D // 2)
    idx[1::2] = np.arange(D // 2) + D // 2
    return idx


def peft_b_transform(cfg, module):
    """(permute q/k head columns?, factor on B) for a PEFT B of `module` (HF -> MaxText)."""
    if family_of(cfg) != "llama" or cfg["decoder_block"] == "qwen3":
        return False, 1.0
    interleave = lr.rope_kind(cfg) == "llama3.1" and module in ("self_attention/query",
                                                                "self_attention/key")
    factor = 1.0 / math.sqrt(cfg["head_dim"]) if module == "self_attention/query" else 1.0
    return interleave, factor


def hf_b_to_maxtext(cfg, module, b_hf, out_dims):
    """lora_B [out, r] (HF) -> B2 [r, out] in the MaxText kernel's output layout (f64)."""
    b2 = np.asarray(b_hf, dtype=np.float64).T.copy()
    interleave, factor = peft_b_transform(cfg, module)
    if interleave:
        r = b2.shape[0]
        b3 = b2.reshape((r,) + tuple(out_dims))
        b2 = b3[..., interleave_perm(out_dims[-1])].reshape(r, -1)
    if factor != 1.0:
        b2 = b2 * factor
    return np.ascontiguousarray(b2)


def maxtext_b_to_hf(cfg, module, b2, out_dims):
    """Inverse of hf_b_to_maxtext (used by the generator): B2 [r, out] -> lora_B [out, r]."""
    b2 = np.asarray(b2, dtype=np.float64)
    interleave, factor = peft_b_transform(cfg, module)
    if factor != 1.0:
        b2 = b2 / factor
    if interleave:
        r = b2.shape[0]
        inv = np.argsort(interleave_perm(out_dims[-1]))
        b2 = b2.reshape((r,) + tuple(out_dims))[..., inv].reshape(r, -1)
    return np.ascontiguousarray(b2.T)


# ------------------------------------------------------------------------------------------------
# generator


@dataclasses.dataclass
class AdapterSpec:
    fmt: str = "maxtext"          # maxtext | peft
    targets: tuple = ("q", "v")   # aliases or module paths (see ALIASES)
    r: int = 4
    lora_alpha: float = 8.0
    dtype: str = "f32"            # f32 | bf16 (storage dtype of A and B)
    layout: str = "linen"         # maxtext: linen (params.params.decoder...) | nnx (decoder...)
    sep: str = "."                # maxtext key separator: "." | "/"
    scanned: bool = True          # maxtext: stacked groups (layer axis 1) | <group>_<i>
    names: str = "short"          # maxtext target_modules: "short" (q_proj...) | "path"
    layers: tuple = None          # global layers to adapt (None: all; scanned: whole groups)
    use_rslora: bool = False      # peft
    rank_pattern: dict = None     # peft
    alpha_pattern: dict = None    # peft
    gain: float = 0.25            # element std of dW relative to std(W)
    zero_b: bool = False          # B = 0 (the adapter changes nothing)
    seed: int = 0

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass
class Adapter:
    spec: AdapterSpec
    directory: str
    files: list              # safetensors files written
    keys: list               # every tensor key written
    config: dict             # adapter_config.json contents
    pairs: list              # [(global layer, module path)] adapted, sorted


def _rank_alpha(spec, layer, module):
    if spec.fmt != "peft":
        return spec.r, spec.lora_alpha
    name = peft_module_name(layer, module)
    return (int(pattern_value(spec.rank_pattern, name, spec.r)),
            float(pattern_value(spec.alpha_pattern, name, spec.lora_alpha)))


def _storage(spec):
    return {"f32": "F32", "bf16": "BF16"}[spec.dtype]


def generate_pairs(fx, spec, base=None):
    """{(layer, module): (A2 [in, r], B2 [r, out], r, alpha)} in MaxText orientation (f64 values,
    PEFT q B already including the 1/sqrt(D) factor), for every adapted pair."""
    cfg, _, raw_layers = base or load_base(fx)
    rng = np.random.default_rng(spec.seed)
    modules = [module_path(t) for t in spec.targets]
    L = cfg["num_decoder_layers"]
    layers = range(L) if spec.layers is None else sorted(spec.layers)
    cd = code_dims(cfg)
    out = {}
    for layer in layers:
        shapes = layer_kernel_shapes(cfg, layer)
        for m in modules:
            if m not in shapes:
                continue      # e.g. DeepSeek mlp/* on MoE layers, wq_a with q_lora_rank 0
            r, alpha = _rank_alpha(spec, layer, m)
            ind, outd = split_dims(shapes[m], m)
            n_in, n_out = int(np.prod(ind)), int(np.prod(outd))
            s = peft_scale(r, alpha, spec.use_rslora) if spec.fmt == "peft" else alpha / r
            w_std = float(np.std(raw_layers[layer][m + "/kernel"].astype(np.float64)))
            sigma = spec.gain * w_std * math.sqrt(n_in) / (s * math.sqrt(r))
            a2 = rng.standard_normal((n_in, r)) / math.sqrt(n_in)
            b2 = rng.standard_normal((r, n_out)) * sigma
            if len(cd) and m in ("self_attention/out", "mlp/wo"):
                b2[:, cd] = 0.0
            if spec.zero_b:
                b2[:] = 0.0
            out[(layer, m)] = (a2, b2, r, alpha)
    if not out:
        raise ValueError("adapter spec %s adapts nothing in this model" % (spec,))
    return cfg, out


def _mt_key(spec, group_component, module, leaf):
    parts = (["params", "params"] if spec.layout == "linen" else []) + ["decoder",
                                                                       group_component]
    parts += module.split("/")
    return spec.sep.join(parts) + spec.sep + leaf


def _mt_target_name(spec, module):
    if spec.names == "short" and module in MT_SHORT:
        return MT_SHORT[module]
    return module.replace("/", ".")


def write_adapter(fx, spec, directory, base=None):
    """Generate the adapter of `spec` for fixture `fx` and write it into `directory`."""
    cfg, pairs = generate_pairs(fx, spec, base)
    os.makedirs(directory, exist_ok=True)
    dt = _storage(spec)
    tensors = {}
    modules_used = []
    for (_, m) in sorted(pairs):
        if m not in modules_used:
            modules_used.append(m)
    if spec.fmt == "peft":
        for (layer, m), (a2, b2, r, alpha) in sorted(pairs.items()):
            shapes = layer_kernel_shapes(cfg, layer)
            _, outd = split_dims(shapes[m], m)
            key = PEFT_PREFIX + "%d.%s." % (layer, HF_NAME[m])
            tensors[key + "lora_A.weight"] = (np.ascontiguousarray(a2.T).astype(np.float32), dt)
            tensors[key + "lora_B.weight"] = (maxtext_b_to_hf(cfg, m, b2, outd).astype(
                np.float32), dt)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "kiln-test-fixture",
            "inference_mode": True,
            "r": spec.r,
            "lora_alpha": spec.lora_alpha,
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "target_modules": sorted({HF_NAME[m].split(".")[-1] for m in modules_used}),
            "use_rslora": spec.use_rslora,
            "rank_pattern": dict(spec.rank_pattern or {}),
            "alpha_pattern": dict(spec.alpha_pattern or {}),
            "bias": "none",
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
        }
        fname = "adapter_model.safetensors"
    else:
        for m in modules_used:
            for gname, first, count in groups(cfg):
                present = [l for l in range(first, first + count) if (l, m) in pairs]
                if not present:
                    continue
                shapes = layer_kernel_shapes(cfg, present[0])
                ind, outd = split_dims(shapes[m], m)
                r = pairs[(present[0], m)][2]

                def a_of(l):
                    return pairs[(l, m)][0].reshape(ind + (r,))

                def b_of(l):
                    return pairs[(l, m)][1].reshape((r,) + outd)
                if spec.scanned:
                    if len(present) != count:
                        raise ValueError("scanned adapters adapt whole groups (%s: %s)"
                                         % (gname, present))
                    tensors[_mt_key(spec, gname, m, LEAF_A)] = (
                        np.stack([a_of(l) for l in present], axis=1).astype(np.float32), dt)
                    tensors[_mt_key(spec, gname, m, LEAF_B)] = (
                        np.stack([b_of(l) for l in present], axis=1).astype(np.float32), dt)
                else:
                    for l in present:
                        comp = "%s_%d" % (gname, l - first)
                        tensors[_mt_key(spec, comp, m, LEAF_A)] = (a_of(l).astype(np.float32),
                                                                   dt)
                        tensors[_mt_key(spec, comp, m, LEAF_B)] = (b_of(l).astype(np.float32),
                                                                   dt)
        config = {"r": spec.r, "lora_alpha": spec.lora_alpha,
                  "target_modules": [_mt_target_name(spec, m) for m in modules_used]}
        fname = "adapter.safetensors"
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    path = os.path.join(directory, fname)
    st.write_safetensors(path, tensors, metadata={"format": "pt"})
    return Adapter(spec=spec, directory=directory, files=[path], keys=list(tensors),
                   config=config, pairs=sorted(pairs))


# ------------------------------------------------------------------------------------------------
# the reference's reader


@dataclasses.dataclass
class Pair:
    a2: np.ndarray     # [in, r] f64, MaxText orientation
    b2: np.ndarray     # [r, out] f64 (PEFT: transformed)
    scale: float       # alpha/r (or alpha/sqrt(r)), without the user's scale
    a_key: str = ""
    b_key: str = ""


def adapter_files(directory):
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    idx = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors.index.json"))
    if idx:
        return st.checkpoint_files([os.path.join(directory, idx[0])])
    if len(files) != 1:
        raise ValueError("%s: expected one .safetensors file (or an index), found %s"
                         % (directory, files))
    return [os.path.join(directory, files[0])]


def adapter_format(config):
    return "peft" if "peft_type" in config else "maxtext"


def _check_shape(key, arr, want):
    if tuple(arr.shape) != tuple(want):
        raise ValueError("%s: shape %s, expected %s" % (key, tuple(arr.shape), tuple(want)))


def check_target_names(config, fmt):
    """Refuse target_modules naming something that is not a supported kernel (embed_tokens,
    lm_head, norms, MoE experts, ...)."""
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if fmt == "peft":
        ok = {h.split(".")[-1] for h in HF_NAME.values()} | set(HF_NAME.values())
    else:
        ok = set(MT_SHORT.values()) | {m.replace("/", ".") for m in HF_NAME}
    for t in targets:
        if t not in ok:
            raise ValueError("unsupported LoRA target %r" % t)


def read_adapter(directory, cfg):
    """(format, {(global layer, module path): Pair}) from an adapter directory."""
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = st.read_checkpoint(adapter_files(directory))
    fmt = adapter_format(config)
    check_target_names(config, fmt)
    L = cfg["num_decoder_layers"]
    found = {}     # (layer, module) -> {"A": (key, arr), "B": (key, arr)}
    if fmt == "peft":
        if config.get("peft_type") != "LORA":
            raise ValueError("peft_type %r" % config.get("peft_type"))
        for bad in ("use_dora",):
            if config.get(bad):
                raise ValueError("unsupported %s" % bad)
        if config.get("modules_to_save") or config.get("bias", "none") != "none":
            raise ValueError("unsupported modules_to_save / bias")
        for key, arr in tensors.items():
            mo = PEFT_KEY.match(key)
            if not mo or mo.group(2) not in MT_FROM_HF:
                raise ValueError("unsupported PEFT tensor %s" % key)
            layer, m = int(mo.group(1)), MT_FROM_HF[mo.group(2)]
            found.setdefault((layer, m), {})[mo.group(3)] = (key, arr)
    else:
        for key, arr in tensors.items():
            if key.endswith(LEAF_A):
                leaf, which = LEAF_A, "A"
            elif key.endswith(LEAF_B):
                leaf, which = LEAF_B, "B"
            else:
                raise ValueError("not a LoRA leaf: %s" % key)
            sep = key[-len(leaf) - 1]
            parts = key[:-len(leaf) - 1].split(sep)
            if parts[:2] == ["params", "params"]:
                parts = parts[2:]
            elif parts[:1] == ["params"]:
                parts = parts[1:]
            if len(parts) < 3 or parts[0] != "decoder":
                raise ValueError("unexpected LoRA key %s" % key)
            comp, m = parts[1], "/".join(parts[2:])
            gs = {name: (first, count) for name, first, count in groups(cfg)}
            if comp in gs:
                first, count = gs[comp]
                if arr.ndim < 2 or arr.shape[1] != count:
                    raise ValueError("%s: layer axis 1 of %s, expected %d layers"
                                     % (key, tuple(arr.shape), count))
                for j in range(count):
                    found.setdefault((first + j, m), {})[which] = (key, np.take(arr, j, axis=1))
            else:
                gname, _, idx = comp.rpartition("_")
                if gname not in gs or not idx.isdigit() or int(idx) >= gs[gname][1]:
                    raise ValueError("unexpected layer component in %s" % key)
                found.setdefault((gs[gname][0] + int(idx), m), {})[which] = (key, arr)
    pairs = {}
    for (layer, m), ab in sorted(found.items()):
        if not 0 <= layer < L:
            raise ValueError("layer %d outside the model" % layer)
        shapes = layer_kernel_shapes(cfg, layer)
        if m not in shapes:
            raise ValueError("module %s is not a LoRA target in layer %d" % (m, layer))
        if set(ab) != {"A", "B"}:
            raise ValueError("layer %d %s: A/B missing" % (layer, m))
        (ka, a), (kb, b) = ab["A"], ab["B"]
        ind, outd = split_dims(shapes[m], m)
        n_in, n_out = int(np.prod(ind)), int(np.prod(outd))
        if fmt == "peft":
            r, alpha = (int(pattern_value(config.get("rank_pattern"),
                                          peft_module_name(layer, m), config["r"])),
                        float(pattern_value(config.get("alpha_pattern"),
                                            peft_module_name(layer, m), config["lora_alpha"])))
            _check_shape(ka, a, (r, n_in))
            _check_shape(kb, b, (n_out, r))
            a2 = np.ascontiguousarray(np.asarray(a, dtype=np.float64).T)
            b2 = hf_b_to_maxtext(cfg, m, b, outd)
            scale = peft_scale(r, alpha, bool(config.get("use_rslora", False)))
        else:
            r = int(config["r"])
            _check_shape(ka, a, ind + (r,))
            _check_shape(kb, b, (r,) + outd)
            a2 = np.asarray(a, dtype=np.float64).reshape(n_in, r)
            b2 = np.asarray(b, dtype=np.float64).reshape(r, n_out)
            scale = float(config["lora_alpha"]) / r
        pairs[(layer, m)] = Pair(a2, b2, scale, ka, kb)
    return fmt, pairs


def delta(pair, user_scale=1.0):
    """dW [in, out] f64 = scale * user_scale * sum_k outer(A2[:, k], B2[k, :]), k in order."""
    acc = np.zeros((pair.a2.shape[0], pair.b2.shape[1]), dtype=np.float64)
    for k in range(pair.a2.shape[1]):
        acc += np.outer(pair.a2[:, k], pair.b2[k, :])
    return acc * (float(pair.scale) * float(user_scale))


# ------------------------------------------------------------------------------------------------
# merged reference


def _directory(a):
    return a.directory if isinstance(a, Adapter) else os.fspath(a)


def merged_raw_layers(fx, adapters, user_scale=1.0, base=None):
    """(cfg, raw globals, layers as f32 W_stored + sum dW (not yet rounded), touched pairs).
    `user_scale`: one number for every adapter or a list (one per adapter)."""
    cfg, g, layers = base or load_base(fx)
    scales = list(user_scale) if isinstance(user_scale, (list, tuple)) else \
        [user_scale] * len(adapters)
    acc = {}
    for a, us in zip(adapters, scales):
        _, pairs = read_adapter(_directory(a), cfg)
        for (layer, m), p in pairs.items():
            d = delta(p, us)
            acc[(layer, m)] = acc.get((layer, m), 0.0) + d
    out = [dict(t) for t in layers]
    for (layer, m), d in acc.items():
        k = m + "/kernel"
        w = out[layer][k]
        out[layer][k] = (w.astype(np.float64) + d.reshape(w.shape)).astype(np.float32)
    return cfg, g, out, sorted(acc)


def merged_model(fx, adapters, user_scale=1.0, base=None):
    """Reference model on W' = bf16(W_stored + sum dW) (llama_ref / deepseek_ref RefModel)."""
    cfg, g, layers, _ = merged_raw_layers(fx, adapters, user_scale, base)
    if family_of(cfg) == "deepseek":
        return dr.RefModel(cfg, g, layers)
    rnd = lambda d: {k: st.bf16_round(v) for k, v in d.items()}  # noqa: E731
    return lr.RefModel(cfg, rnd(g), [rnd(t) for t in layers])


def effect(model, base_model, tokens):
    """max |logits(model) - logits(base)| / max |logits(base)| on one prefill."""
    a = model.logits(tokens).astype(np.float64)
    b = base_model.logits(tokens).astype(np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def choose_prompt(model, length, n_gen, seed=0, min_gap=0.03, context_sensitive=True):
    """The family's choose_prompt; returns (tokens, greedy, gap, sensitive)."""
    if family_of(model.cfg) == "deepseek":
        toks, greedy, gap, sens, rg = dr.choose_prompt(model, length, n_gen, seed=seed,
                                                       min_gap=min_gap, min_route_gap=min_gap,
                                                       context_sensitive=context_sensitive)
        return toks, greedy, min(gap, rg), sens
    return lr.choose_prompt(model, length, n_gen, seed=seed, min_gap=min_gap,
                            context_sensitive=context_sensitive)


# ------------------------------------------------------------------------------------------------
# fixtures from a directory (CLI)


def load_fixture(directory):
    """Rebuild make_fixture.Fixture of a fixture directory written by either generator."""
    import make_fixture as mf
    import make_deepseek_fixture as mdf
    with open(os.path.join(directory, "fixture.json")) as f:
        d = json.load(f)
    cls = mdf.DSVariant if d.get("decoder_block") == "deepseek" else mf.Variant
    fields = {f.name for f in dataclasses.fields(cls)}
    d = {k: (tuple(v) if isinstance(v, list) and k != "targets" else v)
         for k, v in d.items() if k in fields}
    v = cls(**d)
    ckpt = os.path.join(directory, "ckpt")
    idx = os.path.join(ckpt, "model.safetensors.index.json")
    files = st.checkpoint_files([ckpt])
    args = [idx] if os.path.exists(idx) else files
    cfgs = [f for f in os.listdir(directory) if f == "config.json" or f.endswith(".yml")]
    cfg_path = os.path.join(directory, cfgs[0])
    return mf.Fixture(variant=v, directory=directory, checkpoint_args=args,
                      checkpoint_files=files, config_path=cfg_path, config={},
                      keys=[])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write a seeded adapter for a fixture directory")
    mk.add_argument("fixture")
    mk.add_argument("out")
    mk.add_argument("--format", default="maxtext", choices=["maxtext", "peft"])
    mk.add_argument("--targets", default="q,v")
    mk.add_argument("--rank", type=int, default=4)
    mk.add_argument("--alpha", type=float, default=8.0)
    mk.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    mk.add_argument("--layout", default="linen", choices=["linen", "nnx"])
    mk.add_argument("--sep", default=".", choices=[".", "/"])
    mk.add_argument("--unrolled", action="store_true")
    mk.add_argument("--rslora", action="store_true")
    mk.add_argument("--gain", type=float, default=0.5)
    mk.add_argument("--zero-b", action="store_true")
    mk.add_argument("--seed", type=int, default=0)
    lg = sub.add_parser("logits", help="reference logits of the merged model")
    lg.add_argument("fixture")
    lg.add_argument("--adapter", action="append", default=[])
    lg.add_argument("--lora-scale", type=float, default=1.0)
    lg.add_argument("--tokens", required=True)
    lg.add_argument("--out")
    lg.add_argument("--max-tokens", type=int, default=0)
    a = ap.parse_args(argv)
    fx = load_fixture(a.fixture)
    if a.cmd == "make":
        spec = AdapterSpec(fmt=a.format, targets=tuple(a.targets.split(",")), r=a.rank,
                           lora_alpha=a.alpha, dtype=a.dtype, layout=a.layout, sep=a.sep,
                           scanned=not a.unrolled, use_rslora=a.rslora, gain=a.gain,
                           zero_b=a.zero_b, seed=a.seed)
        ad = write_adapter(fx, spec, a.out)
        print(json.dumps({"directory": ad.directory, "files": ad.files,
                          "pairs": ["%d:%s" % p for p in ad.pairs]}, indent=2))
        return 0
    toks = [int(t) for t in a.tokens.split(",")]
    m = merged_model(fx, a.adapter, a.lora_scale)
    out = m.logits(toks)
    if a.out:
        np.save(a.out, out)
    if a.adapter:
        print("effect vs base: %.4f" % effect(m, merged_model(fx, []), toks))
    print("argmax per position:", [int(i) for i in out.argmax(-1)])
    if a.max_tokens:
        print("greedy:", m.greedy(toks, a.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
