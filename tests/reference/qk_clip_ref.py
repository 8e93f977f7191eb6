#!/usr/bin/python3
"""Independent numpy reference of QK-Clip (MuonClip) as kiln bakes it at export (docs/maxtext.md §3, issue 3).

Written from docs/maxtext.md §3 and the issue text, not from kiln's C++.

Max-logit statistics files (safetensors):
  * keys ending in `self_attention.attention_op.max_logits` or `self_attention.max_logits`,
    optionally followed by `.0` (Linen sow tuple), with `.` or `/` separators and any prefix
    before the layer component (`intermediates.decoder.`, `decoder.`, ...);
  * the component before `self_attention` names the layer(s): a scanned group `dense_layers`,
    `moe_layers` (DeepSeek) or `layers`, stacked with the layer axis FIRST (as MaxText keeps
    intermediates, docs/maxtext.md §1.2) -> [L_group, ..., H]; or one unrolled layer `dense_layers_i`,
    `moe_layers_j` (global index first_num_dense_layers + j) or `layers_N` (global index N, the
    form `kiln calibrate` writes) -> [..., H];
  * other keys are ignored; a max_logits key whose layer component is not one of these, a layer
    given twice, a wrong head count or a stacked group of the wrong length is an error.

Reduction (per head): S = max over every axis but heads -- and but the layer axis of a stacked
group, since kiln clips per layer; with per_group=True (`--qk-clip-per-group`, MaxText's
behaviour) a stacked group is reduced over its layer axis too and its one S is used for every
layer of the group. An unrolled key is its own group (MaxText trains unscanned models per layer).

gamma = min(1, tau / (S + 1e-6)) in f32; heads with S <= tau get gamma = 1 exactly (so they stay
bit-identical; MaxText's formula would give 1 - O(1e-7) for S in (tau - 1e-6, tau]); layers
without statistics get gamma = 1.
Weights (f32, before the single rounding to bf16): wq_b [Rq, H, Dn+Dr]: [:, h, :Dn] *= sqrt(g_h),
[:, h, Dn:] *= g_h; wkv_b [Rkv, H, Dn+Dv]: [:, h, :Dn] *= sqrt(g_h), values untouched; for
q_lora_rank = 0 the `query` kernel [E, H, Dn+Dr] takes wq_b's place (kiln clips it; MaxText does
not -- clip_query=False reproduces MaxText). Nothing else changes. Non-MLA blocks: refused unless
mode "query", which scales the Llama query kernel [E, H, D] head h by g_h.

Sequential calibrate-and-clip (issue 3 item 6): for l = 0 .. L-1, measure layer l's max logits on
the prompts with layers 0 .. l-1 already clipped, then clip layer l. per_group: the same over the
groups (dense, then MoE): a group's statistics are measured with the earlier groups clipped.

Entry points:
    read_max_logits(paths, cfg) -> [StatsEntry]
    reduce_stats(entries, num_layers, num_heads, per_group=False) -> S [L, H] f32 (NaN = none)
    gammas_from_stats(S, tau) -> [L, H] f32
    clip_layers(raw_layers, gammas, cfg, clip_query=True) -> new f32 layer dicts
    clipped_model(model, gammas) / qk_clip_from_files(ckpt, config, stats_paths, tau, ...)
    sequential_calibrate_and_clip(model, prompts, tau, per_group=False) -> (model, gammas, S)
    write_max_logits(path, stats [L, ..., H], cfg, form=..., key_form=..., ...)
    llama_query_clip(ckpt, config, stats_paths, tau, ...) -> llama_ref.RefModel
  MaxText-semantics functions on nested dicts (reproducing docs/maxtext.md's qk_clip_test.py table):
    maxtext_apply_qk_clip(params, intermediates, tau, qk_nope_head_dim, attention_type="mla")
    maxtext_max_logit_metric(intermediates), dot_product_max_logits(q, k)
"""

import contextlib
import copy
import dataclasses
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as st  # noqa: E402
import deepseek_ref as dr  # noqa: E402
import llama_ref as lr  # noqa: E402

EPS = np.float32(1e-6)
SUFFIXES = (("self_attention", "attention_op", "max_logits"), ("self_attention", "max_logits"))
LAYER_COMPONENT = re.compile(r"^(layers|dense_layers|moe_layers)(?:_(\d+))?$")


# ------------------------------------------------------------------------------------------------
# reading statistics files


@dataclasses.dataclass
class StatsEntry:
    key: str
    group: str            # "layers" | "dense_layers" | "moe_layers"
    stacked: bool
    layers: list          # global layer indices this entry covers (in order)
    array: np.ndarray     # as stored (f32)


def parse_stats_key(key):
    """(group, index or None) for a max-logits key, None for any other key.
    Raises ValueError for a max_logits key whose layer component is not recognised."""
    sep = "/" if "/" in key else "."
    parts = key.split(sep)
    if parts and parts[-1] == "0":
        parts = parts[:-1]
    for suf in SUFFIXES:
        n = len(suf)
        if len(parts) > n and tuple(parts[-n:]) == suf:
            m = LAYER_COMPONENT.match(parts[-n - 1])
            if not m:
                raise ValueError("%s: cannot tell which layer %r is" % (key, parts[-n - 1]))
            return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)
    if parts and parts[-1] == "max_logits":
        raise ValueError("%s: max_logits key not under self_attention[.attention_op]" % key)
    return None


def _group_ranges(cfg):
    L = int(cfg["num_decoder_layers"])
    if cfg.get("decoder_block") == "deepseek":
        nd = int(cfg.get("first_num_dense_layers", 0))
        return {"layers": (0, L), "dense_layers": (0, nd), "moe_layers": (nd, L - nd)}
    return {"layers": (0, L)}


def read_max_logits(paths, cfg):
    """Every max-logit statistic of the given safetensors file(s) as StatsEntry objects."""
    H = int(cfg["num_query_heads"])
    ranges = _group_ranges(cfg)
    entries, seen = [], {}
    for key, arr in st.read_checkpoint(paths).items():
        parsed = parse_stats_key(key)
        if parsed is None:
            continue
        group, idx = parsed
        if group not in ranges:
            raise ValueError("%s: no group %s in a %s model" % (key, group,
                                                                cfg.get("decoder_block")))
        first, count = ranges[group]
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim < 1 or arr.shape[-1] != H:
            raise ValueError("%s: shape %s, expected [..., %d heads]" % (key, arr.shape, H))
        if idx is None:
            if arr.ndim < 2 or arr.shape[0] != count:
                raise ValueError("%s: stacked statistics of shape %s, expected [%d layers, ..., "
                                 "%d]" % (key, arr.shape, count, H))
            layers = list(range(first, first + count))
        else:
            if idx >= count:
                raise ValueError("%s: layer %d out of range (%d layers)" % (key, idx, count))
            layers = [first + idx]
        for l in layers:
            if l in seen:
                raise ValueError("layer %d has statistics twice (%s, %s)" % (l, seen[l], key))
            seen[l] = key
        entries.append(StatsEntry(key, group, idx is None, layers, arr))
    return entries


def reduce_stats(entries, num_layers, num_heads, per_group=False):
    """S [L, H] f32: per layer and head the max statistic (NaN where a layer has none)."""
    S = np.full((num_layers, num_heads), np.nan, dtype=np.float32)
    for e in entries:
        a = e.array
        if e.stacked:
            per_layer = a.reshape(a.shape[0], -1, a.shape[-1]).max(axis=1)      # [n, H]
            if per_group:
                per_layer = np.broadcast_to(per_layer.max(axis=0), per_layer.shape)
            for j, l in enumerate(e.layers):
                S[l] = per_layer[j]
        else:
            S[e.layers[0]] = a.reshape(-1, a.shape[-1]).max(axis=0)
    return S


def gamma_kiln(S, tau):
    """f32 gamma; 1 exactly where S <= tau or S is NaN (no statistics)."""
    S = np.asarray(S, dtype=np.float32)
    t = np.float32(tau)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = (t / (S + EPS)).astype(np.float32)
        return np.where(np.isnan(S) | (S <= t), np.float32(1.0),
                        np.minimum(np.float32(1.0), g)).astype(np.float32)


def gamma_maxtext(S, tau):
    """MaxText's formula verbatim: min(1, tau / (S + 1e-6)) (f32)."""
    S = np.asarray(S, dtype=np.float32)
    return np.minimum(np.float32(1.0), (np.float32(tau) / (S + EPS)).astype(np.float32))


def gammas_from_stats(S, tau):
    return gamma_kiln(S, tau)


# ------------------------------------------------------------------------------------------------
# applying gamma to MLA weights (f32)


def _scale_nope_rope(kernel, gamma, dn, rope_power):
    """kernel [..., H, D]: [..., h, :dn] *= sqrt(g_h); [..., h, dn:] *= g_h ** rope_power."""
    g = np.asarray(gamma, dtype=np.float32)
    D = kernel.shape[-1]
    scale = np.empty((g.size, D), dtype=np.float32)
    scale[:, :dn] = np.sqrt(g)[:, None]
    scale[:, dn:] = (g if rope_power == 1 else np.ones_like(g))[:, None]
    return (np.asarray(kernel, dtype=np.float32) * scale).astype(np.float32)


def clip_mla_layer(w, gamma, cfg, clip_query=True):
    """One layer's f32 weight dict (canonical sub-keys, unscanned) -> clipped copy."""
    gamma = np.asarray(gamma, dtype=np.float32)
    out = dict(w)
    if np.all(gamma == 1.0):
        return out
    dn = cfg["qk_nope_head_dim"]
    for name, rope_power in (("self_attention/wq_b/kernel", 1), ("self_attention/wkv_b/kernel", 0)):
        if name in w:
            out[name] = _scale_nope_rope(w[name], gamma, dn, rope_power)
    if clip_query and "self_attention/query/kernel" in w:
        out["self_attention/query/kernel"] = _scale_nope_rope(w["self_attention/query/kernel"],
                                                              gamma, dn, 1)
    return out


def clip_layers(raw_layers, gammas, cfg, clip_query=True):
    if cfg.get("decoder_block") != "deepseek":
        raise ValueError("QK-Clip is only supported for MLA attention (use mode 'query' for "
                         "%s)" % cfg.get("decoder_block"))
    return [clip_mla_layer(w, g, cfg, clip_query) for w, g in zip(raw_layers, gammas)]


def clipped_model(model, gammas, clip_query=True):
    """deepseek_ref.RefModel with clipped (then bf16-rounded) layer weights."""
    return model.with_raw_layers(clip_layers(model.raw_layers, gammas, model.cfg, clip_query))


def qk_clip_from_files(checkpoint_paths, config, stats_paths, tau, per_group=False, overrides=(),
                       scan_axis=None, clip_query=True):
    """What `kiln export --max-logits F --qk-clip-threshold TAU` should bake.
    Returns (clipped RefModel, gammas [L, H], S [L, H])."""
    model = dr.RefModel.load(checkpoint_paths, config, overrides, scan_axis)
    c = model.cfg
    S = reduce_stats(read_max_logits(stats_paths, c), c["num_decoder_layers"],
                     c["num_query_heads"], per_group)
    g = gammas_from_stats(S, tau)
    return clipped_model(model, g, clip_query), g, S


def sequential_calibrate_and_clip(model, prompts, tau, per_group=False, clip_query=True):
    """Issue 3 item 6. Returns (clipped model, gammas [L, H], S [L, H] = the statistics each
    layer was clipped with, i.e. measured with the earlier layers/groups already clipped)."""
    c = model.cfg
    L, H = c["num_decoder_layers"], c["num_query_heads"]
    if per_group and c.get("decoder_block") == "deepseek":
        nd = c["first_num_dense_layers"]
        groups = [list(range(0, nd)), list(range(nd, L))]
    elif per_group:
        groups = [list(range(L))]
    else:
        groups = [[l] for l in range(L)]
    raw = list(model.raw_layers)
    gammas = np.ones((L, H), dtype=np.float32)
    S = np.full((L, H), np.nan, dtype=np.float32)
    cur = model
    for grp in groups:
        if not grp:
            continue
        stats = cur.max_logits(prompts, upto=grp[-1])
        s = stats[grp].max(axis=0) if per_group else stats[grp[0]]
        g = gammas_from_stats(s, tau)
        for l in grp:
            S[l] = stats[l] if not per_group else s
            gammas[l] = g
            raw[l] = clip_mla_layer(raw[l], g, c, clip_query)
        cur = model.with_raw_layers(list(raw))
    return cur, gammas, S


# ------------------------------------------------------------------------------------------------
# non-MLA: --qk-clip-mode=query on the Llama family


@contextlib.contextmanager
def _no_weight_rounding():
    old = lr.bf16_round
    lr.bf16_round = lambda a: np.asarray(a, dtype=np.float32)
    try:
        yield
    finally:
        lr.bf16_round = old


def llama_query_clip(checkpoint_paths, config, stats_paths, tau, mode=None, per_group=False,
                     overrides=(), scan_axis=None):
    """Llama-family QK-Clip: refused (ValueError) unless mode == "query", which multiplies query
    head h by gamma_h (exact under GQA: only the logits of that query head scale)."""
    cfg = lr.load_config(config, overrides, scan_axis)
    if mode != "query":
        raise ValueError("QK-Clip is only supported for MLA attention (decoder_block %s); "
                         "use --qk-clip-mode=query" % cfg["decoder_block"])
    with _no_weight_rounding():
        g, layers = lr.load_weights(checkpoint_paths, cfg)
    S = reduce_stats(read_max_logits(stats_paths, cfg), cfg["num_decoder_layers"],
                     cfg["num_query_heads"], per_group)
    gam = gammas_from_stats(S, tau)
    for w, gl in zip(layers, gam):
        q = w["self_attention/query/kernel"].astype(np.float32)
        w["self_attention/query/kernel"] = (q * gl[None, :, None]).astype(np.float32)
    rnd = lambda a: st.bf16_round(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return (lr.RefModel(cfg, {k: rnd(v) for k, v in g.items()},
                        [{k: rnd(v) for k, v in w.items()} for w in layers]), gam, S)


# ------------------------------------------------------------------------------------------------
# writing statistics files (to craft test inputs)


def stats_key(component, key_form="attention_op", prefix="decoder", sep=".", sow_tuple=False):
    parts = [p for p in prefix.split(".") if p] if prefix else []
    parts += [component, "self_attention"]
    if key_form == "attention_op":
        parts.append("attention_op")
    elif key_form != "direct":
        raise ValueError("key_form must be 'attention_op' or 'direct'")
    parts.append("max_logits")
    if sow_tuple:
        parts.append("0")
    return sep.join(parts)


def write_max_logits(path, stats, cfg, form="layers", key_form="attention_op", prefix="decoder",
                     sep=".", sow_tuple=False, dtype="F32", layers=None, extra=None):
    """Write statistics `stats` [L, ..., H] (per global layer; e.g. [L, H] or [L, b, H]).

    form: "layers"   one key per layer, `layers_N` with the global N (kiln calibrate's form)
          "groups"   one key per layer, `dense_layers_i` / `moe_layers_j` (DeepSeek) else layers_N
          "stacked"  one key per scanned group, layer axis first: `dense_layers` [Ld, ..., H] and
                     `moe_layers` [Lm, ..., H] (DeepSeek), `layers` [L, ..., H] otherwise
    layers: restrict to these global layers (forms "layers"/"groups"; others get no key).
    extra: additional {key: array} written verbatim (e.g. unrelated intermediates)."""
    stats = np.asarray(stats, dtype=np.float32)
    L = int(cfg["num_decoder_layers"])
    if stats.shape[0] != L:
        raise ValueError("stats must have the %d layers first, got %s" % (L, stats.shape))
    ds = cfg.get("decoder_block") == "deepseek"
    nd = int(cfg.get("first_num_dense_layers", 0)) if ds else 0
    keep = range(L) if layers is None else sorted(layers)
    kw = dict(key_form=key_form, prefix=prefix, sep=sep, sow_tuple=sow_tuple)
    tensors = {}
    if form == "layers" or (form == "groups" and not ds):
        for l in keep:
            tensors[stats_key("layers_%d" % l, **kw)] = (stats[l], dtype)
    elif form == "groups":
        for l in keep:
            comp = "dense_layers_%d" % l if l < nd else "moe_layers_%d" % (l - nd)
            tensors[stats_key(comp, **kw)] = (stats[l], dtype)
    elif form == "stacked":
        if layers is not None:
            raise ValueError("stacked statistics cover whole groups")
        groups = ([("dense_layers", 0, nd), ("moe_layers", nd, L)] if ds else
                  [("layers", 0, L)])
        for comp, a, b in groups:
            if b > a:
                tensors[stats_key(comp, **kw)] = (stats[a:b], dtype)
    else:
        raise ValueError("unknown form %r" % form)
    for k, v in (extra or {}).items():
        tensors[k] = v
    st.write_safetensors(path, tensors, metadata={"format": "kiln-max-logits"})
    return list(tensors)


# ------------------------------------------------------------------------------------------------
# MaxText semantics on nested dicts (qk_clip_utils.py as described in docs/maxtext.md §3)


def _find_max_logits(node):
    """Accepts {max_logits: (arr,)}, {max_logits: arr} or {attention_op: {max_logits: arr}}."""
    if not isinstance(node, dict):
        return None
    if "max_logits" in node:
        v = node["max_logits"]
        return np.asarray(v[0] if isinstance(v, (tuple, list)) else v, dtype=np.float32)
    if isinstance(node.get("attention_op"), dict):
        return _find_max_logits(node["attention_op"])
    return None


def _lookup(tree, path):
    node = tree
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def maxtext_apply_qk_clip(params, intermediates, tau, qk_nope_head_dim, attention_type="mla"):
    """Returns a clipped deep copy of `params` (nested dicts of numpy arrays)."""
    if attention_type != "mla":
        raise ValueError("QK-Clip is only supported for MLA attention")
    out = copy.deepcopy(params)

    def walk(node, path):
        for k, v in list(node.items()):
            p = path + (k,)
            if isinstance(v, dict):
                walk(v, p)
                continue
            if len(p) < 2 or p[-2] not in ("wq_b", "wkv_b"):
                continue
            ml = _find_max_logits(_lookup(intermediates or {}, p[:-2]))
            if ml is None:
                continue
            S = ml.reshape(-1, ml.shape[-1]).max(axis=0)
            g = gamma_maxtext(S, tau)
            node[k] = _scale_nope_rope(v, g, qk_nope_head_dim, 1 if p[-2] == "wq_b" else 0)

    walk(out, ())
    return out


def maxtext_max_logit_metric(intermediates):
    """Global max over every max_logits array in the tree (calculate_max_logit_metric); None if
    there is none."""
    best = None

    def walk(node):
        nonlocal best
        if not isinstance(node, dict):
            return
        ml = node.get("max_logits")
        if ml is not None:
            a = np.asarray(ml[0] if isinstance(ml, (tuple, list)) else ml, dtype=np.float32)
            if a.size:
                m = float(a.max())
                best = m if best is None else max(best, m)
        for k, v in node.items():
            if k != "max_logits":
                walk(v)

    walk(intermediates or {})
    return best


def dot_product_max_logits(q, k, mask=None):
    """q [b, t, H, d], k [b, s, H, d] -> [b, H]: max over (t, s) of q.k (masked entries never
    win)."""
    logits = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64))
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    return logits.max(axis=(2, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# self-test of the docs/maxtext.md §3 table (also run by tests/e2e/test_deepseek_reference.py)


def spec_table_checks():
    """Reproduce every row of the docs/maxtext.md §3 qk_clip_test.py table on numpy arrays.
    Returns a list of (row name, passed, detail)."""
    res = []

    def row(name, ok, detail=""):
        res.append((name, bool(ok), detail))

    rng = np.random.default_rng(0)
    tau, dn = 10.0, 4

    def params(h, with_wkv_a=False):
        p = {"decoder": {"layers_0": {"self_attention": {
            "wq_b": {"kernel": rng.standard_normal((8, h, 6)).astype(np.float32)},
            "wkv_b": {"kernel": rng.standard_normal((8, h, 6)).astype(np.float32)}}}}}
        if with_wkv_a:
            p["decoder"]["layers_0"]["self_attention"]["wkv_a"] = {
                "kernel": rng.standard_normal((8, 6)).astype(np.float32)}
        return p

    def inter(ml, form="sow"):
        ml = np.asarray(ml, dtype=np.float32)
        leaf = {"sow": {"max_logits": (ml,)}, "bare": {"max_logits": ml},
                "attention_op": {"attention_op": {"max_logits": ml}}}[form]
        return {"decoder": {"layers_0": {"self_attention": leaf}}}

    def kern(p, name):
        return p["decoder"]["layers_0"]["self_attention"][name]["kernel"]

    for cls in ("QKClipTest", "QKClipNNXTest"):
        try:
            maxtext_apply_qk_clip(params(2), inter([[20, 5]]), tau, dn,
                                  attention_type="dot_product")
            row(cls + ".test_raises_error_for_non_mla", False, "no error")
        except ValueError as e:
            row(cls + ".test_raises_error_for_non_mla",
                "only supported for MLA" in str(e), str(e))

    for cls, form in (("QKClipTest", "sow"), ("QKClipNNXTest", "attention_op")):
        p = params(2)
        q = maxtext_apply_qk_clip(p, inter([[20, 5]], form), tau, dn)
        s = np.float32(np.sqrt(np.float32(tau) / (np.float32(20) + EPS)))
        g = np.float32(tau) / (np.float32(20) + EPS)
        ok = (np.allclose(kern(q, "wq_b")[:, 0, :4], kern(p, "wq_b")[:, 0, :4] * s, rtol=1e-6)
              and np.allclose(kern(q, "wq_b")[:, 0, 4:], kern(p, "wq_b")[:, 0, 4:] * g, rtol=1e-6)
              and np.allclose(kern(q, "wkv_b")[:, 0, :4], kern(p, "wkv_b")[:, 0, :4] * s,
                              rtol=1e-6)
              and np.array_equal(kern(q, "wkv_b")[:, 0, 4:], kern(p, "wkv_b")[:, 0, 4:])
              and np.array_equal(kern(q, "wq_b")[:, 1], kern(p, "wq_b")[:, 1])
              and np.array_equal(kern(q, "wkv_b")[:, 1], kern(p, "wkv_b")[:, 1])
              and abs(float(g) - 0.5) < 1e-6)
        row(cls + ".test_apply_qk_clip_logic", ok)

    p = params(3)
    q = maxtext_apply_qk_clip(p, inter([[40, 9.9, 1]]), tau, dn)
    ok = (np.allclose(kern(q, "wq_b")[:, 0, :4], kern(p, "wq_b")[:, 0, :4] * np.sqrt(0.25),
                      rtol=1e-6)
          and np.array_equal(kern(q, "wq_b")[:, 1:], kern(p, "wq_b")[:, 1:])
          and np.array_equal(kern(q, "wkv_b")[:, 1:], kern(p, "wkv_b")[:, 1:]))
    row("QKClipTest.test_verify_per_head_clipping", ok)

    for cls, form in (("QKClipTest", "sow"), ("QKClipNNXTest", "attention_op")):
        p = params(1)
        q = maxtext_apply_qk_clip(p, inter([[50]], form), 100.0, dn)
        ok = np.array_equal(kern(q, "wq_b"), kern(p, "wq_b"))
        if cls == "QKClipNNXTest":
            ok = ok and np.array_equal(kern(q, "wkv_b"), kern(p, "wkv_b"))
        row(cls + ".test_no_clipping_when_below_threshold", ok)

    p = params(1, with_wkv_a=True)
    q = maxtext_apply_qk_clip(p, inter([[100]]), tau, dn)
    row("QKClipTest.test_shared_keys_are_untouched",
        np.array_equal(kern(q, "wkv_a"), kern(p, "wkv_a")) and
        not np.array_equal(kern(q, "wq_b"), kern(p, "wq_b")))

    for cls in ("QKClipTest", "QKClipNNXTest"):
        p = params(2)
        q = maxtext_apply_qk_clip(p, {}, tau, dn)
        row(cls + ".test_resilience_to_missing_stats",
            all(np.array_equal(kern(q, n), kern(p, n)) for n in ("wq_b", "wkv_b")))

    m = dot_product_max_logits(np.array([[[[10, 0, 0, 0]], [[0, 10, 0, 0]]]]),
                               np.array([[[[1, 0, 0, 0]], [[1, 0, 0, 0]]]]))
    row("MaxLogitsMetricTest.test_dot_product_max_logits", m.shape == (1, 1) and m[0, 0] == 10)

    tree = {"decoder": {
        "layers_0": {"self_attention": {"max_logits": (np.array([[10., 20.]]),)}},
        "layers_1": {"self_attention": {"max_logits": (np.array([[5., 50.]]),)}},
        "layers_2": {"self_attention": {}}}}
    row("MaxLogitsMetricTest.test_calculate_max_logit_metric",
        maxtext_max_logit_metric(tree) == 50.0)
    row("MaxLogitsMetricTest.test_calculate_max_logit_metric_empty",
        maxtext_max_logit_metric({"decoder": {"layers_0": {}}}) is None)

    # QKClipMLATest: a real MLA layer (H=4, Rq=Rkv=16, Dn=Dr=8, Dv=32, E=128, seq 128): the
    # max_logits statistic of deepseek_ref's attention is present and the clip runs
    H, Rq, Rkv, Dn_, Dr_, Dv_, E, T = 4, 16, 16, 8, 8, 32, 128, 128
    cfg = dr.load_config({"decoder_block": "deepseek", "emb_dim": E, "num_query_heads": H,
                          "mlp_dim": 64, "moe_mlp_dim": 16, "num_decoder_layers": 1,
                          "vocab_size": 16, "num_experts": 2, "num_experts_per_tok": 1,
                          "shared_experts": 0, "q_lora_rank": Rq, "kv_lora_rank": Rkv,
                          "qk_nope_head_dim": Dn_, "qk_rope_head_dim": Dr_, "v_head_dim": Dv_,
                          "first_num_dense_layers": 1})
    w = {"self_attention/wq_a/kernel": rng.standard_normal((E, Rq)) / np.sqrt(E),
         "self_attention/q_norm/scale": np.ones(Rq),
         "self_attention/wq_b/kernel": rng.standard_normal((Rq, H, Dn_ + Dr_)) * 2,
         "self_attention/wkv_a/kernel": rng.standard_normal((E, Rkv + Dr_)) / np.sqrt(E) * 2,
         "self_attention/kv_norm/scale": np.ones(Rkv),
         "self_attention/wkv_b/kernel": rng.standard_normal((Rkv, H, Dn_ + Dv_)),
         "self_attention/out/kernel": rng.standard_normal((H, Dv_, E)) / 16}
    w = {k: np.asarray(v, np.float32) for k, v in w.items()}
    m0 = dr.RefModel(cfg, {}, [])
    x = dr.bf16(rng.standard_normal((T, E)))
    _, ml = m0.mla(x, dr.round_weights(w), np.arange(T))
    ok = ml.shape == (H,) and np.isfinite(ml).all()
    tau2 = float(np.median(ml))
    g = gamma_kiln(ml, tau2)
    wc = dr.round_weights(clip_mla_layer(w, g, cfg))
    _, ml2 = m0.mla(x, wc, np.arange(T))
    clipped = ml > tau2
    ok = ok and clipped.any() and np.all(ml2[clipped] <= tau2 * 1.01) and \
        np.array_equal(ml2[~clipped], ml[~clipped])
    row("QKClipMLATest.test_mla_dot_product_integration", ok,
        "max_logits %s -> %s (tau %.3f)" % (ml, ml2, tau2))
    # splash / TPU-only rows have no CPU counterpart: the dot-product statistic is the only one

    p = params(2)
    lin = maxtext_apply_qk_clip(p, inter([[100, 1]], "bare"), tau, dn)
    row("QKClipNNXTest.test_max_logits_directly_under_self_attention",
        not np.array_equal(kern(lin, "wq_b")[:, 0], kern(p, "wq_b")[:, 0]) and
        np.array_equal(kern(lin, "wq_b")[:, 1], kern(p, "wq_b")[:, 1]))

    p = params(2)
    a = maxtext_apply_qk_clip(p, inter([[40, 9]], "sow"), tau, dn)
    b = maxtext_apply_qk_clip(p, inter([[40, 9]], "attention_op"), tau, dn)
    row("QKClipNNXTest.test_linen_nnx_parity",
        all(np.allclose(kern(a, n), kern(b, n), atol=1e-6) for n in ("wq_b", "wkv_b")))

    nnx_tree = {"decoder": {"layers_0": {"self_attention": {"max_logits": np.array([[10., 20.]])}},
                            "layers_1": {"self_attention": {"max_logits": np.array([[5., 50.]])}}}}
    row("CalculateMaxLogitNNXTest.test_nnx_shape", maxtext_max_logit_metric(nnx_tree) == 50.0)
    return res


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="QK-Clip reference (docs/maxtext.md §3 table self-check)")
    ap.parse_args(argv)
    bad = 0
    for name, ok, detail in spec_table_checks():
        print("%-60s %s %s" % (name, "ok" if ok else "FAILED", detail if not ok else ""))
        bad += not ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
