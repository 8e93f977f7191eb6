#!/usr/bin/python3
"""Self-tests of the DeepSeek / Kimi-K2 numpy reference, fixture generator and QK-Clip reference
(tests/reference/deepseek_ref.py, make_deepseek_fixture.py, qk_clip_ref.py). No kiln binary needed.

Each check uses a second, independently written formulation where it can: YaRN from complex
numbers with its own correction-range code, an incremental f64 decoder that caches only the MLA
latent + rope key and computes attention in the latent space (wkv_b absorbed into the query and
output sides) with a per-token loop for the MoE routing, hand-worked routing cases, an independent
safetensors parse of the fixtures against a shape table written from docs/maxtext.md §1.7, and the docs/maxtext.md §3
qk_clip_test.py table.
"""

import contextlib
import math
import os
import unittest

import numpy as np

import common
from common import st
from test_reference import parse_safetensors_independently

import deepseek_ref as dr  # noqa: E402  (tests/reference is on sys.path via common)
import make_deepseek_fixture as mdf  # noqa: E402
import qk_clip_ref as qc  # noqa: E402


@contextlib.contextmanager
def no_bf16_rounding():
    old = dr.bf16
    dr.bf16 = lambda x: np.asarray(x, dtype=np.float32)
    try:
        yield
    finally:
        dr.bf16 = old


_MODELS = {}


def fixture_model(name, tmp_root):
    """(fixture, RefModel) of a named variant, cached per process (fixtures are deterministic)."""
    if name not in _MODELS:
        fx = mdf.write_fixture(mdf.variant_by_name(name), os.path.join(tmp_root, name))
        _MODELS[name] = (fx, mdf.ref_model(fx))
    return _MODELS[name]


class _Tmp(unittest.TestCase):
    """One temporary directory per class (fixtures are reused by the tests of a class)."""

    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.root = tempfile.mkdtemp(prefix="kiln-dsref-")

    @classmethod
    def tearDownClass(cls):
        import shutil
        shutil.rmtree(cls.root, True)
        for k in [k for k, (fx, _) in _MODELS.items() if fx.directory.startswith(cls.root)]:
            del _MODELS[k]

    def model(self, name):
        return fixture_model(name, self.root)


# ------------------------------------------------------------------------------------------------
# YaRN (docs/maxtext.md §2.3c) and the softmax scale (§2.5)


def yarn_direct(x, pos, d, theta, factor, orig, beta_fast, beta_slow, interleave=True):
    """Independent f64/complex YaRN: DeepSeek-V3 reference semantics written out again."""
    def corr(n):
        return (d * math.log(orig / (n * 2 * math.pi))) / (2 * math.log(theta))
    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    i = np.arange(d // 2)
    ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
    base = 1.0 / theta ** (np.arange(0, d, 2) / d)
    freqs = base / factor * ramp + base * (1.0 - ramp)
    if interleave:
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., :d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * np.asarray(pos)[:, None, None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


def yarn_cfg(**kw):
    c = dict(rope_max_timescale=10000.0, rope_factor=40.0, original_max_position_embeddings=4096,
             max_position_embeddings=163840, beta_fast=32.0, beta_slow=1.0, rope_truncate=True,
             rope_interleave=True)
    c.update(kw)
    return c


class YarnTest(unittest.TestCase):
    def test_correction_range_constants(self):
        # docs/maxtext.md §2.3(c): d = 64
        self.assertEqual(dr.yarn_correction_range(64, 1e4, 4096, 32, 1), (10, 23))   # DeepSeek-V3
        self.assertEqual(dr.yarn_correction_range(64, 5e4, 4096, 1, 1), (19, 20))    # Kimi-K2
        # the fixtures' rope dim 8: V3 constants -> (1, 3); original context 64 -> (0, 2)
        self.assertEqual(dr.yarn_correction_range(8, 1e4, 4096, 32, 1), (1, 3))
        self.assertEqual(dr.yarn_correction_range(8, 1e4, 64, 32, 1), (0, 2))
        self.assertEqual(dr.yarn_correction_range(8, 5e4, 64, 1, 1), (0, 1))
        # without truncation the raw (clamped) correction dims are used
        lo, hi = dr.yarn_correction_range(64, 1e4, 4096, 32, 1, truncate=False)
        self.assertAlmostEqual(lo, 64 * math.log(4096 / (64 * math.pi)) / (2 * math.log(1e4)))
        self.assertTrue(10 < lo < 11 and 22 < hi < 23)

    def test_frequencies(self):
        f = dr.yarn_inv_freq(64, 1e4, 40.0, 4096, 32, 1).astype(np.float64)
        base = 1e4 ** (-np.arange(32) * 2 / 64)
        np.testing.assert_allclose(f[:11], base[:11], rtol=1e-6)          # i <= low: unscaled
        np.testing.assert_allclose(f[23:], base[23:] / 40, rtol=1e-6)     # i >= high: / factor
        r = (15 - 10) / 13.0
        self.assertAlmostEqual(f[15] / base[15], (1 - r) + r / 40, places=5)
        # low == high gets high += 0.001: a step, not a division by zero
        f = dr.yarn_inv_freq(8, 1e4, 10.0, 4096, 1.0, 1.0)
        self.assertTrue(np.isfinite(f).all())

    def test_softmax_scale_constants(self):
        def sc(**kw):
            c = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, mscale=1.0, rope_factor=40.0,
                     max_position_embeddings=163840, original_max_position_embeddings=4096)
            c.update(kw)
            return dr.softmax_scale(c)
        self.assertAlmostEqual(sc(), 0.1352338, places=6)                          # DeepSeek-V3
        self.assertAlmostEqual(sc(mscale=0.707), 0.1147214, places=6)              # V2-16b
        self.assertAlmostEqual(sc(rope_factor=32.0, max_position_embeddings=131072),
                               0.1308608, places=6)                                # Kimi-K2
        self.assertAlmostEqual(sc(max_position_embeddings=4096), 192 ** -0.5, places=9)
        self.assertAlmostEqual(0.1 * math.log(40) + 1, 1.368888, places=6)
        self.assertAlmostEqual(0.1 * math.log(32) + 1, 1.346574, places=6)

    def test_rope_matches_complex_formula(self):
        rng = np.random.default_rng(11)
        for d, kw in ((8, {}), (8, dict(original_max_position_embeddings=64)),
                      (64, {}), (64, dict(rope_max_timescale=5e4, rope_factor=32.0,
                                          beta_fast=1.0, beta_slow=1.0)),
                      (16, dict(rope_interleave=False))):
            c = yarn_cfg(**kw)
            x = st.bf16_round(rng.standard_normal((60, 3, d)))
            pos = np.arange(0, 600, 10)
            want = yarn_direct(x.astype(np.float64), pos, d, c["rope_max_timescale"],
                               c["rope_factor"], c["original_max_position_embeddings"],
                               c["beta_fast"], c["beta_slow"], c["rope_interleave"])
            with no_bf16_rounding():
                got = dr.apply_yarn_rope(x, pos, c)
            np.testing.assert_allclose(got, want, atol=2e-4, err_msg=str((d, kw)))  # f32 angles
            np.testing.assert_allclose(dr.apply_yarn_rope(x, pos, c), want,
                                       atol=0.01 * np.abs(x).max(), err_msg=str((d, kw)))

    def test_relative_position_property(self):
        """q_pe(p).k_pe(s) depends only on p - s, whatever the (concatenated) output layout."""
        rng = np.random.default_rng(12)
        c = yarn_cfg(original_max_position_embeddings=64)
        q = rng.standard_normal((1, 1, 8))
        k = rng.standard_normal((1, 1, 8))
        with no_bf16_rounding():
            def dot(p, s):
                return float(dr.apply_yarn_rope(q, [p], c).ravel().astype(np.float64) @
                             dr.apply_yarn_rope(k, [s], c).ravel().astype(np.float64))
            self.assertAlmostEqual(dot(7, 3), dot(104, 100), places=4)
            self.assertAlmostEqual(dot(50, 50), dot(0, 0), places=4)
            self.assertNotAlmostEqual(dot(7, 3), dot(9, 3), places=3)
            # pairwise (interleaved) output: the same dot products (a permutation of both sides)
            qo = dr.apply_yarn_rope(q, [7], c).ravel()
            ko = dr.apply_yarn_rope(k, [3], c).ravel()
            perm = np.empty(8, dtype=int)
            perm[0::2], perm[1::2] = np.arange(4), np.arange(4) + 4
            self.assertAlmostEqual(float(qo[perm] @ ko[perm]), dot(7, 3), places=5)

    def test_position_outside_table_refused(self):
        c = yarn_cfg(max_position_embeddings=100)
        with self.assertRaises(ValueError):
            dr.apply_yarn_rope(np.zeros((1, 1, 8)), [100], c)


# ------------------------------------------------------------------------------------------------
# MLA: latent-space (absorbed) attention == the expanded computation; full model vs an
# incremental f64 decoder with a latent cache


def route_by_hand(scores_f64, bias, cfg):
    """Per-token routing, written from docs/maxtext.md §2.7 in plain python (no rounding)."""
    X, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    ds3 = str(cfg["model_name"]).startswith(("deepseek3", "deepseek4"))
    post = [s + (bias[e] if bias is not None else 0.0) for e, s in enumerate(scores_f64)]
    cand = list(range(X))
    if ds3 and cfg["n_routing_groups"] != -1:
        G, kg = cfg["n_routing_groups"], cfg["topk_routing_group"]
        n = X // G
        gscore = []
        for g in range(G):
            vals = sorted(post[g * n:(g + 1) * n], reverse=True)
            gscore.append(vals[0] + vals[1])
        keep = sorted(range(G), key=lambda g: (-gscore[g], g))[:kg]
        cand = [e for e in range(X) if e // n in keep]
    chosen = sorted(cand, key=lambda e: (-post[e], e))[:k]
    src = scores_f64 if ds3 else post
    w = [src[e] for e in chosen]
    if cfg["routed_score_func"] == "sigmoid":
        tot = sum(w)
        w = [x / (tot + 1e-20) for x in w]
    return chosen, [x * cfg["routed_scaling_factor"] for x in w]


def latent_decoder_f64(model, tokens):
    """Token-by-token f64 decoder. Attention per head in the latent space: the cache holds only
    the normalised latent c_kv [Rkv] and the roped shared key k_pe [Dr] per token;
    q_lat = W_uk^h q_nope^h, score = s (q_lat . c_kv + q_pe . k_pe), o^h = W_uv^h (sum p c_kv).
    No bf16 rounding anywhere (weights are the model's bf16-rounded values)."""
    c = model.cfg
    H, Rkv = c["num_query_heads"], c["kv_lora_rank"]
    Dn, Dr = c["qk_nope_head_dim"], c["qk_rope_head_dim"]
    eps = c["normalization_layer_epsilon"]
    scale = dr.softmax_scale(c)
    W = [{k: (v if k == "kind" else v.astype(np.float64)) for k, v in t.items()}
         for t in model.layers]
    emb = model.g["embedding"].astype(np.float64)

    def norm(x, s):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * s

    def rope(x, p):
        return yarn_direct(x[None, None], [p], Dr, c["rope_max_timescale"], c["rope_factor"],
                           c["original_max_position_embeddings"], c["beta_fast"],
                           c["beta_slow"], c["rope_interleave"])[0, 0]

    def swiglu(x, a, b, o):
        g = x @ a
        return ((g / (1 + np.exp(-g))) * (x @ b)) @ o

    caches = [([], []) for _ in W]
    rows = []
    for p, tok in enumerate(tokens):
        x = emb[tok]
        for w, (lat_c, pe_c) in zip(W, caches):
            h = norm(x, w["pre_self_attention_layer_norm/scale"])
            if c["q_lora_rank"] > 0:
                q = np.einsum("r,rhd->hd", norm(h @ w["self_attention/wq_a/kernel"],
                                                w["self_attention/q_norm/scale"]),
                              w["self_attention/wq_b/kernel"])
            else:
                q = np.einsum("e,ehd->hd", h, w["self_attention/query/kernel"])
            ckv = h @ w["self_attention/wkv_a/kernel"]
            lat_c.append(norm(ckv[:Rkv], w["self_attention/kv_norm/scale"]))
            pe_c.append(rope(ckv[Rkv:], p))
            lat, pe = np.stack(lat_c), np.stack(pe_c)                 # [p+1, Rkv], [p+1, Dr]
            wkv_b = w["self_attention/wkv_b/kernel"]
            o = np.zeros(c["emb_dim"])
            for hh in range(H):
                q_lat = wkv_b[:, hh, :Dn] @ q[hh, :Dn]                 # absorbed W_uk
                q_pe = rope(q[hh, Dn:], p)
                sc = scale * (lat @ q_lat + pe @ q_pe)
                a = np.exp(sc - sc.max())
                a /= a.sum()
                o_h = (a @ lat) @ wkv_b[:, hh, Dn:]                     # absorbed W_uv
                o += o_h @ w["self_attention/out/kernel"][hh]
            x = x + o
            h = norm(x, w["post_self_attention_layer_norm/scale"])
            if w["kind"] == "dense":
                x = x + swiglu(h, w["mlp/wi_0/kernel"], w["mlp/wi_1/kernel"], w["mlp/wo/kernel"])
                continue
            gl = h @ w[dr.MOE + "gate/kernel"]
            f = c["routed_score_func"]
            if f == "sigmoid":
                s = 1 / (1 + np.exp(-gl))
            elif f == "softmax":
                s = np.exp(gl - gl.max())
                s = s / s.sum()
            else:
                s = gl
            bias = w.get(dr.MOE + "gate/bias")
            chosen, wts = route_by_hand(list(s), None if bias is None else list(bias), c)
            y = np.zeros(c["emb_dim"])
            for e, we in zip(chosen, wts):
                y += we * swiglu(h, w[dr.MOE + "wi_0"][e], w[dr.MOE + "wi_1"][e],
                                 w[dr.MOE + "wo"][e])
            if c["shared_experts"] > 0:
                y += swiglu(h, w[dr.SHARED + "wi_0/kernel"], w[dr.SHARED + "wi_1/kernel"],
                            w[dr.SHARED + "wo/kernel"])
            x = x + y
        y = norm(x, model.g["final_norm"].astype(np.float64))
        if c["logits_via_embedding"]:
            lg = emb @ y
            if c["normalize_embedding_logits"]:
                lg = lg / math.sqrt(c["emb_dim"])
        else:
            lg = y @ model.g["logits_dense"].astype(np.float64)
        rows.append(lg)
    return np.stack(rows)


class MLATest(_Tmp):
    def test_absorbed_equals_expanded_one_layer(self):
        """One MLA block: the reference's expanded K/V attention vs latent-space attention."""
        for name in ("ds3-linen-scan1-f32", "ds2-lite-qlora0-softmax"):
            fx, m = self.model(name)
            c = m.cfg
            w = m.layers[0]
            T = 24
            H, Rkv = c["num_query_heads"], c["kv_lora_rank"]
            Dn, Dv = c["qk_nope_head_dim"], c["v_head_dim"]
            x = st.bf16_round(np.random.default_rng(3).standard_normal((T, c["emb_dim"])))
            pos = np.arange(T)

            def absorbed():
                if c["q_lora_rank"]:
                    cq = dr.rmsnorm(dr.matmul_bf16(x, w["self_attention/wq_a/kernel"]),
                                    w["self_attention/q_norm/scale"],
                                    c["normalization_layer_epsilon"])
                    q = np.einsum("tr,rhd->thd", cq, w["self_attention/wq_b/kernel"])
                else:
                    q = np.einsum("te,ehd->thd", x, w["self_attention/query/kernel"])
                q = dr.bf16(q)
                q_pe = dr.apply_yarn_rope(q[..., Dn:], pos, c)
                ckv = dr.matmul_bf16(x, w["self_attention/wkv_a/kernel"])
                lat = dr.rmsnorm(ckv[:, :Rkv], w["self_attention/kv_norm/scale"],
                                 c["normalization_layer_epsilon"]).astype(np.float64)
                k_pe = dr.apply_yarn_rope(ckv[:, None, Rkv:], pos, c)[:, 0].astype(np.float64)
                wk = w["self_attention/wkv_b/kernel"][..., :Dn]          # [Rkv, H, Dn]
                wv = w["self_attention/wkv_b/kernel"][..., Dn:]          # [Rkv, H, Dv]
                q_lat = np.einsum("thd,rhd->thr", q[..., :Dn].astype(np.float64), wk)
                sc = dr.softmax_scale(c) * (np.einsum("thr,sr->hts", q_lat, lat) +
                                            np.einsum("thd,sd->hts", q_pe.astype(np.float64),
                                                      k_pe))
                sc = np.where(np.tril(np.ones((T, T), bool))[None], sc, -np.inf)
                p = np.exp(sc - sc.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                o_lat = np.einsum("hts,sr->thr", p, lat)
                o = np.einsum("thr,rhv->thv", o_lat, wv)
                return np.einsum("thv,hve->te", o, w["self_attention/out/kernel"])

            with no_bf16_rounding():
                exp_o, _ = m.mla(x, w, pos)
                abs_o = absorbed()
            np.testing.assert_allclose(exp_o, abs_o, atol=1e-5 * np.abs(abs_o).max(),
                                       err_msg=name)
            got, _ = m.mla(x, w, pos)            # with MaxText's rounding points
            self.assertLess(np.abs(got - abs_o).max() / np.abs(abs_o).max(), 0.03, name)
            self.assertEqual(w["self_attention/out/kernel"].shape[:2], (H, Dv))

    def check_model(self, name, n_tok=10):
        fx, m = self.model(name)
        toks = [int(t) for t in np.random.default_rng(5).integers(0, m.cfg["vocab_size"], n_tok)]
        want = latent_decoder_f64(m, toks)
        with no_bf16_rounding():
            got = m.logits(toks)
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), err_msg=name)
        ratio = np.abs(m.logits(toks) - want).max() / np.abs(want).max()
        self.assertLess(ratio, 0.02, name)

    def test_model_v3_sigmoid_bias_prebias(self):
        self.check_model("ds3-linen-scan1-f32")

    def test_model_groups(self):
        self.check_model("ds3-groups")

    def test_model_v2_softmax_qlora0_2shared(self):
        self.check_model("ds2-lite-qlora0-softmax")

    def test_model_kimi_postbias_orig64(self):
        self.check_model("kimi-yarn-orig64-nnx-unrolled-bf16")

    def test_model_softmax_bias_halfsplit_tied_nodense(self):
        for n in ("ds3-softmax-bias", "ds3-rope-halfsplit-input", "ds3-tied",
                  "ds3-nodense-scan1", "ds3-maxpos-eq-orig", "kimi-groups-ignored"):
            self.check_model(n, n_tok=6)


# ------------------------------------------------------------------------------------------------
# routing worked by hand (docs/maxtext.md §2.7)


def rcfg(**kw):
    c = dict(model_name="deepseek3-tiny", num_experts=8, num_experts_per_tok=2,
             routed_score_func="sigmoid", routed_scaling_factor=2.5, n_routing_groups=-1,
             topk_routing_group=-1)
    c.update(kw)
    return c


def logit(p):
    return math.log(p / (1 - p))


class RoutingTest(unittest.TestCase):
    def route(self, scores, bias=None, **kw):
        """Route one token whose sigmoid/softmax scores are (about) `scores`."""
        c = rcfg(**kw)
        if c["routed_score_func"] == "sigmoid":
            gl = np.array([[logit(s) for s in scores]])
        else:
            gl = np.array([scores], dtype=np.float64)
        gl = st.bf16_round(gl)
        b = None if bias is None else st.bf16_round(np.array(bias))
        return dr.route(gl, b, c), gl, b, c

    def test_v3_bias_selects_prebias_weights(self):
        s = [0.9, 0.8, 0.7, 0.3, 0.2, 0.2, 0.1, 0.1]
        b = [-0.5, 0, 0, 0, 0, 0, 0, 0.3]
        r, gl, bb, c = self.route(s, b)
        self.assertEqual(sorted(r["indices"][0]), [1, 2])           # 0.4, 0.8, 0.7, ... 0.4
        sc = r["scores"][0].astype(np.float64)
        w = sc[[1, 2]] / (st.bf16_round(np.float32(sc[1] + sc[2])) + 1e-20) * 2.5
        np.testing.assert_allclose(np.sort(r["weights"][0]), np.sort(st.bf16_round(w)))
        self.assertAlmostEqual(float(r["weights"][0].sum()), 2.5, delta=0.02)
        # independent per-token version
        chosen, wts = route_by_hand(list(sc), list(bb.astype(np.float64)), c)
        self.assertEqual(sorted(chosen), [1, 2])

    def test_kimi_postbias_weights(self):
        s = [0.9, 0.8, 0.7, 0.3, 0.2, 0.2, 0.1, 0.1]
        b = [-0.5, 0.1, -0.1, 0, 0, 0, 0, 0.3]
        r, _, bb, _ = self.route(s, b, model_name="kimi-k2-tiny", routed_scaling_factor=2.827)
        self.assertEqual(list(r["indices"][0]), [1, 2])
        post = st.bf16_round(r["scores"][0].astype(np.float64) + bb)
        self.assertEqual(list(post[[1, 2]]), list(r["sel_scores"][0][[1, 2]]))
        w = post[[1, 2]] / (st.bf16_round(np.float32(post[1] + post[2])) + 1e-20) * \
            float(st.bf16_round(np.float32(2.827)))
        np.testing.assert_allclose(r["weights"][0], st.bf16_round(w))
        # deepseek3 name with the same numbers weights with the pre-bias scores instead
        r3, _, _, _ = self.route(s, b, routed_scaling_factor=2.827)
        self.assertEqual(list(r3["indices"][0]), [1, 2])
        self.assertFalse(np.array_equal(r3["weights"][0], r["weights"][0]))

    def test_v2_softmax_no_renormalisation(self):
        logits = [2.0, 1.0, 0.5, 0.0, -1.0, -1.0, -2.0, 0.25]
        r, gl, _, _ = self.route(logits, routed_score_func="softmax", routed_scaling_factor=1.0,
                                 model_name="deepseek2-tiny", num_experts_per_tok=3)
        self.assertEqual(list(r["indices"][0]), [0, 1, 2])
        p = np.exp(gl[0] - gl[0].max())
        p /= p.sum()
        np.testing.assert_allclose(r["weights"][0], p[:3], rtol=2e-2)
        self.assertLess(float(r["weights"][0].sum()), 0.95)           # no renormalisation
        r2, _, _, _ = self.route(logits, routed_score_func="softmax", routed_scaling_factor=16.0,
                                 model_name="deepseek2-tiny", num_experts_per_tok=3)
        np.testing.assert_allclose(r2["weights"][0], r["weights"][0] * 16, rtol=1e-6)

    def test_group_limited_routing(self):
        # 4 groups of 2; global top-2 = experts 0 (group 0) and 7 (group 3), but group sums
        # (top-2 of a group = both members) favour groups 1 and 2
        s = [0.95, 0.05, 0.7, 0.6, 0.65, 0.62, 0.1, 0.9]
        kw = dict(n_routing_groups=4, topk_routing_group=2)
        r, _, _, c = self.route(s, **kw)
        self.assertEqual(list(r["indices"][0]), [2, 4])
        self.assertTrue(np.isneginf(r["sel_scores"][0][[0, 1, 6, 7]]).all())
        self.assertEqual(route_by_hand(list(r["scores"][0].astype(np.float64)), None,
                                       dict(c, **kw))[0], [2, 4])
        # top-2 sums inside larger groups: 2 groups of 4, keep 1; group 0 has the single best
        # expert but group 1 the better top-2 sum
        s2 = [0.99, 0.1, 0.1, 0.1, 0.8, 0.7, 0.1, 0.1]
        r2, _, _, _ = self.route(s2, n_routing_groups=2, topk_routing_group=1)
        self.assertEqual(list(r2["indices"][0]), [4, 5])
        # the same fields are ignored for other model names (docs/maxtext.md §2.7: deepseek_routing only
        # for deepseek3*/deepseek4*)
        r3, _, _, _ = self.route(s, model_name="kimi-k2-tiny", **kw)
        self.assertEqual(list(r3["indices"][0]), [0, 7])
        self.assertFalse(dr.uses_group_routing(rcfg(model_name="kimi-k2-tiny", **kw)))
        self.assertTrue(dr.uses_group_routing(rcfg(model_name="deepseek4-x", **kw)))

    def test_ties_lower_index_first(self):
        r, _, _, _ = self.route([0.5, 0.7, 0.7, 0.7, 0.1, 0.1, 0.1, 0.1])
        self.assertEqual(list(r["indices"][0]), [1, 2])
        self.assertEqual(r["margin"][0], 0.0)

    def test_sigmoid_renormalisation_epsilon(self):
        # sigmoid(-100) ~ 3.7e-44 (a subnormal): the +1e-20 dominates the sum
        gl = np.full((1, 8), -100.0, dtype=np.float32)
        r = dr.route(gl, None, rcfg())
        self.assertTrue((np.abs(r["weights"][0]) < 1e-20).all(), r["weights"])

    def test_no_score_func(self):
        gl = st.bf16_round(np.array([[1.0, 3.0, 2.0, -1.0]]))
        r = dr.route(gl, None, rcfg(num_experts=4, routed_score_func="",
                                    routed_scaling_factor=2.0))
        self.assertEqual(list(r["indices"][0]), [1, 2])
        np.testing.assert_array_equal(r["weights"][0], [6.0, 4.0])

    def test_margins(self):
        r, _, _, _ = self.route([0.9, 0.8, 0.5, 0.3, 0.2, 0.2, 0.1, 0.1])
        self.assertAlmostEqual(float(r["margin"][0]), (0.8 - 0.5) / 0.8, delta=0.01)


# ------------------------------------------------------------------------------------------------
# fixtures: keys, shapes, layouts (docs/maxtext.md §1.1, §1.2, §1.7)


def expected_unscanned(E=64, H=4, Rq=32, Rkv=16, Dn=16, Dr=8, Dv=16, F=96, Fm=32, X=8, S=1,
                       bias=True):
    """docs/maxtext.md §1.7 table, typed in again."""
    att = {"pre_self_attention_layer_norm/scale": (E,),
           "self_attention/wkv_a/kernel": (E, Rkv + Dr),
           "self_attention/kv_norm/scale": (Rkv,),
           "self_attention/wkv_b/kernel": (Rkv, H, Dn + Dv),
           "self_attention/out/kernel": (H, Dv, E),
           "post_self_attention_layer_norm/scale": (E,)}
    if Rq:
        att.update({"self_attention/wq_a/kernel": (E, Rq), "self_attention/q_norm/scale": (Rq,),
                    "self_attention/wq_b/kernel": (Rq, H, Dn + Dr)})
    else:
        att["self_attention/query/kernel"] = (E, H, Dn + Dr)
    dense = dict(att, **{"mlp/wi_0/kernel": (E, F), "mlp/wi_1/kernel": (E, F),
                         "mlp/wo/kernel": (F, E)})
    moe = dict(att, **{"DeepSeekMoeBlock_0/MoeBlock_0/gate/kernel": (E, X),
                       "DeepSeekMoeBlock_0/MoeBlock_0/wi_0": (X, E, Fm),
                       "DeepSeekMoeBlock_0/MoeBlock_0/wi_1": (X, E, Fm),
                       "DeepSeekMoeBlock_0/MoeBlock_0/wo": (X, Fm, E)})
    if bias:
        moe["DeepSeekMoeBlock_0/MoeBlock_0/gate/bias"] = (X,)
    if S:
        moe.update({"DeepSeekMoeBlock_0/shared_experts/wi_0/kernel": (E, S * Fm),
                    "DeepSeekMoeBlock_0/shared_experts/wi_1/kernel": (E, S * Fm),
                    "DeepSeekMoeBlock_0/shared_experts/wo/kernel": (S * Fm, E)})
    return dense, moe


def scanned_shape(shape, L, axis):
    s = list(shape)
    s.insert(axis, L)
    return tuple(s)


class FixtureLayoutTest(common.TempDirCase):
    def load_raw(self, fx):
        out = {}
        for f in fx.checkpoint_files:
            _, arrays, _, _ = parse_safetensors_independently(f)
            out.update({k: a for k, (_, a) in arrays.items()})
        return out

    def test_scanned_keys_and_shapes(self):
        for axis in (1, 0):
            v = mdf.variant_by_name("ds3-2dense-scan1").replace(scan_axis=axis)
            raw = self.load_raw(mdf.write_fixture(v, os.path.join(self.tmp, "a%d" % axis)))
            dense, moe = expected_unscanned()
            want = {"params.params.token_embedder.embedding": (256, 64),
                    "params.params.decoder.decoder_norm.scale": (64,),
                    "params.params.decoder.logits_dense.kernel": (64, 256)}
            for grp, table, L in (("dense_layers", dense, 2), ("moe_layers", moe, 2)):
                for k, shp in table.items():
                    want["params.params.decoder.%s.%s" % (grp, k.replace("/", "."))] = \
                        scanned_shape(shp, L, axis)
            self.assertEqual(sorted(raw), sorted(want))
            for k, shp in want.items():
                self.assertEqual(raw[k].shape, shp, k)
        # spot checks of docs/maxtext.md §0.2 / §1.7 (axis 1): query-side [Rq, L, H, Dqk], norms [E, L],
        # experts [X, L, E, Fm], bias [X, L]
        v = mdf.variant_by_name("ds3-2dense-scan1")
        raw = self.load_raw(mdf.write_fixture(v, os.path.join(self.tmp, "b")))
        p = "params.params.decoder.moe_layers.DeepSeekMoeBlock_0.MoeBlock_0."
        self.assertEqual(raw[p + "wi_0"].shape, (8, 2, 64, 32))
        self.assertEqual(raw[p + "wo"].shape, (8, 2, 32, 64))
        self.assertEqual(raw[p + "gate.bias"].shape, (8, 2))
        self.assertEqual(raw["params.params.decoder.dense_layers.pre_self_attention_layer_norm."
                             "scale"].shape, (64, 2))
        self.assertEqual(raw["params.params.decoder.moe_layers.self_attention.wq_b.kernel"].shape,
                         (32, 2, 4, 24))

    def test_scanned_unrolls_to_unrolled(self):
        base = mdf.variant_by_name("ds3-2dense-scan1")
        un = self.load_raw(mdf.write_fixture(base.replace(scanned=False),
                                             os.path.join(self.tmp, "u")))
        self.assertIn("params.params.decoder.dense_layers_1.mlp.wo.kernel", un)
        self.assertIn("params.params.decoder.moe_layers_1.DeepSeekMoeBlock_0.MoeBlock_0.wi_0", un)
        self.assertNotIn("params.params.decoder.moe_layers_2.self_attention.out.kernel", un)
        for axis in (0, 1):
            sc = self.load_raw(mdf.write_fixture(base.replace(scan_axis=axis),
                                                 os.path.join(self.tmp, "s%d" % axis)))
            n = 0
            for key, arr in sc.items():
                for grp in ("dense_layers", "moe_layers"):
                    tag = ".decoder.%s." % grp
                    if tag not in key:
                        continue
                    for i in range(2):
                        ukey = key.replace(tag, ".decoder.%s_%d." % (grp, i))
                        np.testing.assert_array_equal(np.take(arr, i, axis=axis), un[ukey], key)
                        n += 1
                if ".decoder.dense_layers." not in key and ".decoder.moe_layers." not in key:
                    np.testing.assert_array_equal(arr, un[key])
            self.assertEqual(n, len([k for k in un if "_layers_" in k]))

    def test_layouts_load_identical_weights(self):
        base = mdf.variant_by_name("ds3-linen-scan1-f32")
        cases = [dict(), dict(sep="/"), dict(layout="nnx"), dict(layout="nnx", scan_axis=0),
                 dict(layout="nnx-decode", sep="/"), dict(layout="nnx-model-value"),
                 dict(scanned=False), dict(scanned=False, layout="nnx-decode"),
                 dict(shards=2), dict(dtype="bf16"), dict(dtype="f16", layout="nnx")]
        keys = {(): "params.params.decoder.moe_layers.DeepSeekMoeBlock_0.MoeBlock_0.wi_0",
                ("sep",): "params/params/decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_0",
                ("layout",): "model.decoder.moe_layers.DeepSeekMoeBlock_0.MoeBlock_0.wi_0"}
        ref = None
        for i, kw in enumerate(cases):
            v = base.replace(**kw)
            fx = mdf.write_fixture(v, os.path.join(self.tmp, "l%d" % i))
            if tuple(kw) in keys and kw.get("layout", "nnx") == "nnx":
                self.assertIn(keys[tuple(kw)], self.load_raw(fx))
            if kw == dict(layout="nnx-decode", sep="/"):
                self.assertIn("decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/gate/bias/value",
                              self.load_raw(fx))
            if kw == dict(scanned=False, layout="nnx-decode"):
                self.assertIn("decoder.dense_layers_0.mlp.wi_0.kernel.value", self.load_raw(fx))
            cfg = dr.load_config(fx.config_path, scan_axis=v.scan_axis if v.scanned else None)
            g, layers = dr.load_raw_weights(fx.checkpoint_args, cfg)
            rnd = [dr.round_weights(t) for t in layers]
            if ref is None:
                ref = (dr.round_weights(g), rnd)
                self.assertEqual([t["kind"] for t in layers], ["dense", "moe", "moe"])
                continue
            def same(x, y, what):
                if kw.get("dtype") == "f16":      # f16 storage: 11-bit significand, f16 range
                    np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-4, err_msg=what)
                else:
                    np.testing.assert_array_equal(x, y, what)
            for k in g:
                same(dr.round_weights(g)[k], ref[0][k], "%s %s" % (kw, k))
            for a, b in zip(rnd, ref[1]):
                self.assertEqual(sorted(a), sorted(b))
                for k in a:
                    if k != "kind":
                        same(a[k], b[k], "%s %s" % (kw, k))

    def test_optional_tensors(self):
        def keys(name, **kw):
            v = mdf.variant_by_name(name).replace(**kw)
            return set(self.load_raw(mdf.write_fixture(v, os.path.join(self.tmp, v.name + str(
                len(kw))))))
        k = keys("ds2-lite-qlora0-softmax")
        self.assertIn("params.params.decoder.moe_layers.self_attention.query.kernel", k)
        self.assertFalse(any(".wq_a." in x or ".q_norm." in x or ".wq_b." in x for x in k))
        self.assertFalse(any("gate.bias" in x for x in k))
        raw = self.load_raw(mdf.write_fixture(mdf.variant_by_name("ds2-lite-qlora0-softmax"),
                                              os.path.join(self.tmp, "ds2")))
        self.assertEqual(raw["params.params.decoder.moe_layers.DeepSeekMoeBlock_0.shared_experts."
                             "wi_0.kernel"].shape, (64, 2, 64))        # [E, L, S*Fm], S = 2
        k = keys("ds3-shared0")
        self.assertFalse(any("shared_experts" in x for x in k))
        k = keys("ds3-nodense-scan1")
        self.assertFalse(any("dense_layers" in x for x in k))
        k = keys("ds3-tied")
        self.assertFalse(any("logits_dense" in x for x in k))
        k = keys("ds3-nodense-unrolled-nnxdecode")
        self.assertIn("decoder/moe_layers_2/self_attention/wkv_b/kernel/value", k)

    def test_config_fields(self):
        c = mdf.config_dict(mdf.variant_by_name("ds3-linen-scan1-f32"))
        for f in ("decoder_block", "model_name", "emb_dim", "num_query_heads", "num_kv_heads",
                  "num_decoder_layers", "first_num_dense_layers", "mlp_dim", "moe_mlp_dim",
                  "num_experts", "num_experts_per_tok", "shared_experts",
                  "routed_scaling_factor", "routed_score_func", "routed_bias",
                  "n_routing_groups", "topk_routing_group", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_type",
                  "rope_max_timescale", "max_position_embeddings",
                  "original_max_position_embeddings", "rope_factor", "beta_fast", "beta_slow",
                  "mscale", "rope_interleave", "rope_truncate", "rope_attention_scaling",
                  "normalization_layer_epsilon", "vocab_size", "logits_via_embedding",
                  "max_target_length", "param_scan_axis"):
            self.assertIn(f, c)
        self.assertEqual(c["decoder_block"], "deepseek")
        self.assertEqual(c["num_kv_heads"], c["num_query_heads"])
        self.assertEqual(c["rope_type"], "yarn")

    def test_variant_matrix_covers_options(self):
        vs = mdf.variants()
        names = [v.name for v in vs]
        self.assertEqual(len(names), len(set(names)))
        self.assertEqual(len({v.seed for v in vs}), len(vs))
        have = lambda f: any(f(v) for v in vs)  # noqa: E731
        for what, f in [
                ("linen", lambda v: v.layout == "linen"), ("nnx", lambda v: v.layout == "nnx"),
                ("nnx-decode", lambda v: v.layout == "nnx-decode"),
                ("nnx-model-value", lambda v: v.layout == "nnx-model-value"),
                ("slash", lambda v: v.sep == "/"), ("bf16", lambda v: v.dtype == "bf16"),
                ("f16", lambda v: v.dtype == "f16"), ("scan0", lambda v: v.scanned and
                                                      v.scan_axis == 0),
                ("unrolled", lambda v: not v.scanned), ("sharded", lambda v: v.shards > 1),
                ("dense0", lambda v: v.first_num_dense_layers == 0),
                ("dense2", lambda v: v.first_num_dense_layers > 1),
                ("qlora0", lambda v: v.q_lora_rank == 0), ("qlora", lambda v: v.q_lora_rank > 0),
                ("nobias", lambda v: not v.routed_bias and v.routed_score_func == "sigmoid"),
                ("softmax", lambda v: v.routed_score_func == "softmax"),
                ("softmax+bias", lambda v: v.routed_score_func == "softmax" and v.routed_bias),
                ("groups", lambda v: v.group_routing),
                ("groups-ignored", lambda v: v.n_routing_groups != -1 and not v.group_routing),
                ("shared0", lambda v: v.shared_experts == 0),
                ("shared2", lambda v: v.shared_experts == 2), ("tied",
                                                               lambda v: v.logits_via_embedding),
                ("kimi", lambda v: v.model_name.startswith("kimi")),
                ("halfsplit-pairs", lambda v: not v.rope_interleave),
                ("no-mscale", lambda v: v.max_position_embeddings <=
                 v.original_max_position_embeddings)]:
            self.assertTrue(have(f), what)


# ------------------------------------------------------------------------------------------------
# fixture quality: clear top-1 margins, robust routing, sensitivity of the criteria


MUTATIONS = {
    "no-mscale": lambda v: v.max_position_embeddings > v.original_max_position_embeddings,
    "no-yarn": lambda v: v.original_max_position_embeddings < 4096,
    "rope-pairs-flipped": lambda v: True,
    "no-q-norm": lambda v: v.q_lora_rank > 0,
    "no-kv-norm": lambda v: True,
    "swap-weighting": lambda v: v.routed_bias and v.routed_score_func == "sigmoid" and
    not v.group_routing,
    "ignore-bias-select": lambda v: v.routed_bias and not v.group_routing,
    "no-groups": lambda v: v.group_routing,
    "no-renorm": lambda v: v.routed_score_func == "sigmoid",
    "no-rsf": lambda v: v.routed_scaling_factor != 1.0,
    "no-shared": lambda v: v.shared_experts > 0,
}


class FixtureQualityTest(_Tmp):
    def test_routing_margins_every_variant(self):
        """The routing code gives every variant wide selection gaps on random token sequences."""
        for v in mdf.variants():
            _, m = self.model(v.name)
            toks = [int(t) for t in np.random.default_rng(v.seed).integers(0, 256, 40)]
            sel, grp = m.routing_margin(toks)
            self.assertGreater(sel, 0.05, v.name)
            self.assertGreater(grp, 0.05, v.name)
            rs = m.routing(toks)
            used = set(np.unique(np.concatenate([r["indices"].ravel() for r in rs])))
            self.assertGreater(len(used), v.num_experts // 2, "%s: experts used %s"
                               % (v.name, used))

    def test_group_and_bias_design_changes_selection(self):
        """Group limiting / the router bias really change which experts are chosen."""
        for name, mut in (("ds3-groups", "no-groups"), ("ds3-linen-scan1-f32",
                                                        "ignore-bias-select"),
                          ("ds3-softmax-bias", "ignore-bias-select")):
            _, m = self.model(name)
            toks = [int(t) for t in np.random.default_rng(1).integers(0, 256, 40)]
            a = [r["indices"] for r in m.routing(toks)]
            m.mutations = frozenset([mut])
            try:
                b = [r["indices"] for r in m.routing(toks)]
            finally:
                m.mutations = frozenset()
            changed = sum(int((np.sort(x, -1) != np.sort(y, -1)).any(-1).sum())
                          for x, y in zip(a, b))
            self.assertGreater(changed, 5, name)

    def test_prompt_choice_and_mutations(self):
        """choose_prompt finds a prompt meeting the e2e margins; on it, each plausible engine bug
        (mutation) breaks the e2e criteria (top-1 at every position, 2% of max|logit|)."""
        for name in ("ds3-yarn-orig64", "ds3-groups"):
            v = mdf.variant_by_name(name)
            _, m = self.model(name)
            toks, greedy, gap, sens, rg = dr.choose_prompt(m, 20, 32, seed=v.seed)
            self.assertGreaterEqual(gap, 0.03, name)
            self.assertGreaterEqual(rg, 0.03, name)
            self.assertTrue(sens, name)
            ref = m.logits(toks)
            for mut, applies in MUTATIONS.items():
                if not applies(v):
                    continue
                m.mutations = frozenset([mut])
                try:
                    got = m.logits(toks)
                finally:
                    m.mutations = frozenset()
                ratio = np.abs(got - ref).max() / np.abs(ref).max()
                top = int((got.argmax(-1) != ref.argmax(-1)).sum())
                self.assertTrue(ratio > 0.02 or top > 0, "%s: mutation %s not detected (ratio "
                                "%.4f, top-1 changes %d)" % (name, mut, ratio, top))


# ------------------------------------------------------------------------------------------------
# QK-Clip


class QKClipTableTest(unittest.TestCase):
    def test_spec_table(self):
        rows = qc.spec_table_checks()
        self.assertGreaterEqual(len(rows), 17)
        for name, ok, detail in rows:
            with self.subTest(row=name):
                self.assertTrue(ok, "%s: %s" % (name, detail))


def stats_cfg(nd=1, L=3, H=4):
    return {"decoder_block": "deepseek", "num_decoder_layers": L, "first_num_dense_layers": nd,
            "num_query_heads": H}


class QKClipFileTest(common.TempDirCase):
    def test_key_parsing(self):
        P = qc.parse_stats_key
        self.assertEqual(P("intermediates.decoder.moe_layers.self_attention.attention_op."
                           "max_logits.0"), ("moe_layers", None))
        self.assertEqual(P("decoder/dense_layers_0/self_attention/max_logits"),
                         ("dense_layers", 0))
        self.assertEqual(P("decoder.layers_12.self_attention.attention_op.max_logits"),
                         ("layers", 12))
        self.assertEqual(P("foo.bar.decoder.moe_layers_3.self_attention.max_logits.0"),
                         ("moe_layers", 3))
        self.assertIsNone(P("decoder.layers_0.self_attention.attention_op.other"))
        self.assertIsNone(P("params.params.decoder.layers.self_attention.wq_b.kernel"))
        with self.assertRaises(ValueError):
            P("decoder.blocks_0.self_attention.max_logits")

    def test_forms_round_trip(self):
        cfg = stats_cfg()
        rng = np.random.default_rng(0)
        stats = rng.uniform(0, 20, (3, 2, 4)).astype(np.float32)        # [L, batch, H]
        per_layer = stats.max(axis=1)
        cases = [dict(form="layers"), dict(form="groups", key_form="direct"),
                 dict(form="stacked", sow_tuple=True, prefix="intermediates.decoder"),
                 dict(form="stacked", sep="/", key_form="direct"),
                 dict(form="groups", sep="/", sow_tuple=True, prefix="x.y.decoder")]
        for i, kw in enumerate(cases):
            path = os.path.join(self.tmp, "s%d.safetensors" % i)
            keys = qc.write_max_logits(path, stats, cfg, **kw)
            ents = qc.read_max_logits(path, cfg)
            self.assertEqual(len(ents), len(keys))
            S = qc.reduce_stats(ents, 3, 4)
            np.testing.assert_array_equal(S, per_layer, str(kw))
            Sg = qc.reduce_stats(ents, 3, 4, per_group=True)
            if kw["form"] == "stacked":   # dense group = layer 0; MoE group = layers 1, 2
                np.testing.assert_array_equal(Sg[0], per_layer[0])
                np.testing.assert_array_equal(Sg[1], per_layer[1:].max(0))
                np.testing.assert_array_equal(Sg[2], per_layer[1:].max(0))
            else:
                np.testing.assert_array_equal(Sg, per_layer)
        # unrelated intermediates in the same file are ignored
        path = os.path.join(self.tmp, "extra.safetensors")
        qc.write_max_logits(path, stats, cfg, extra={"decoder.layers_0.mlp.act": np.ones(3,
                                                                                     np.float32)})
        self.assertEqual(len(qc.read_max_logits(path, cfg)), 3)

    def test_bad_files(self):
        cfg = stats_cfg()
        stats = np.ones((3, 4), np.float32)
        p = os.path.join(self.tmp, "dup.safetensors")
        st.write_safetensors(p, {
            "decoder.layers_1.self_attention.max_logits": stats[1],
            "decoder.moe_layers_0.self_attention.attention_op.max_logits": stats[1]})
        with self.assertRaisesRegex(ValueError, "twice"):
            qc.read_max_logits(p, cfg)
        p = os.path.join(self.tmp, "heads.safetensors")
        st.write_safetensors(p, {"decoder.layers_1.self_attention.max_logits": np.ones(5,
                                                                                    np.float32)})
        with self.assertRaisesRegex(ValueError, "heads"):
            qc.read_max_logits(p, cfg)
        p = os.path.join(self.tmp, "len.safetensors")
        st.write_safetensors(p, {"decoder.moe_layers.self_attention.max_logits": np.ones(
            (3, 1, 4), np.float32)})
        with self.assertRaisesRegex(ValueError, "stacked"):
            qc.read_max_logits(p, cfg)

    def test_gamma(self):
        S = np.array([20.0, 10.0, 9.0, np.nan, 10.0000005], np.float32)
        g = qc.gamma_kiln(S, 10.0)
        self.assertAlmostEqual(float(g[0]), 0.5, places=6)
        self.assertEqual(list(g[1:4]), [1.0, 1.0, 1.0])
        self.assertLess(g[4], 1.0)
        self.assertLess(qc.gamma_maxtext(np.float32(10.0), 10.0), 1.0)   # MaxText: 1 - 1e-7
        self.assertEqual(g.dtype, np.float32)

    def test_clip_weights(self):
        fx, m = None, None
        for name in ("ds3-linen-scan1-f32", "ds2-lite-qlora0-softmax"):
            v = mdf.variant_by_name(name)
            fx = mdf.write_fixture(v, os.path.join(self.tmp, name))
            m = mdf.ref_model(fx)
            c = m.cfg
            Dn = c["qk_nope_head_dim"]
            gam = np.ones((3, 4), np.float32)
            gam[1, 0], gam[1, 2] = 0.25, 0.64
            clipped = qc.clip_layers(m.raw_layers, gam, c)
            for l, (a, b) in enumerate(zip(m.raw_layers, clipped)):
                for k in a:
                    touched = k in ("self_attention/wq_b/kernel", "self_attention/wkv_b/kernel",
                                    "self_attention/query/kernel") and l == 1
                    if not touched:
                        self.assertIs(b[k], a[k], (name, l, k))
            a, b = m.raw_layers[1], clipped[1]
            q = "self_attention/wq_b/kernel" if c["q_lora_rank"] else "self_attention/query/kernel"
            np.testing.assert_array_equal(b[q][..., 0, :Dn], (a[q][..., 0, :Dn] *
                                                              np.float32(0.5)))
            np.testing.assert_array_equal(b[q][..., 0, Dn:], a[q][..., 0, Dn:] *
                                          np.float32(0.25))
            np.testing.assert_array_equal(b[q][..., 2, Dn:], a[q][..., 2, Dn:] *
                                          np.float32(0.64))
            np.testing.assert_array_equal(b[q][..., [1, 3], :], a[q][..., [1, 3], :])
            kv = "self_attention/wkv_b/kernel"
            np.testing.assert_array_equal(b[kv][:, 0, :Dn], a[kv][:, 0, :Dn] * np.float32(0.5))
            np.testing.assert_array_equal(b[kv][:, :, Dn:], a[kv][:, :, Dn:])     # values
            np.testing.assert_array_equal(b[kv][:, [1, 3]], a[kv][:, [1, 3]])
        # MaxText leaves the query kernel of q_lora_rank = 0 models alone
        mx = qc.clip_layers(m.raw_layers, gam, m.cfg, clip_query=False)
        self.assertIs(mx[1]["self_attention/query/kernel"],
                      m.raw_layers[1]["self_attention/query/kernel"])
        with self.assertRaisesRegex(ValueError, "only supported for MLA"):
            qc.clip_layers(m.raw_layers, gam, dict(m.cfg, decoder_block="llama2"))

    def test_export_from_file_missing_layers_and_identity(self):
        v = mdf.variant_by_name("qkclip-ds3")
        fx = mdf.write_fixture(v, os.path.join(self.tmp, "f"))
        m = mdf.ref_model(fx)
        prompts = [[int(t) for t in np.random.default_rng(s).integers(0, 256, 16)]
                   for s in range(2)]
        per = m.max_logits(prompts, per_prompt=True).transpose(1, 0, 2)    # [L, P, H]
        tau = 7.75
        path = os.path.join(self.tmp, "ml.safetensors")
        qc.write_max_logits(path, per, fx.config, form="layers", layers=[0, 2])  # 1, 3 missing
        cm, g, S = qc.qk_clip_from_files(fx.checkpoint_args, fx.config_path, path, tau)
        self.assertTrue(np.isnan(S[1]).all() and np.isnan(S[3]).all())
        self.assertTrue((g[1] == 1).all() and (g[3] == 1).all())
        for l in (1, 3):
            for k in m.layers[l]:
                if k != "kind":
                    np.testing.assert_array_equal(cm.layers[l][k], m.layers[l][k])
        below = S[0] <= tau
        for h in np.nonzero(below)[0]:
            np.testing.assert_array_equal(cm.layers[0]["self_attention/wq_b/kernel"][:, h],
                                          m.layers[0]["self_attention/wq_b/kernel"][:, h])
        self.assertTrue((~below).any() and below.any(), S[0])
        for k in ("self_attention/wkv_a/kernel", "self_attention/wq_a/kernel",
                  "self_attention/q_norm/scale", "self_attention/kv_norm/scale",
                  "self_attention/out/kernel"):
            np.testing.assert_array_equal(cm.layers[0][k], m.layers[0][k])
        # deterministic
        cm2, g2, _ = qc.qk_clip_from_files(fx.checkpoint_args, fx.config_path, path, tau)
        np.testing.assert_array_equal(g, g2)
        for k in cm.layers[0]:
            if k != "kind":
                np.testing.assert_array_equal(cm.layers[0][k], cm2.layers[0][k])

    def test_calibrate_clip_and_sequential(self):
        """Issue 3 acceptance (a) and (b) on the numpy side."""
        v = mdf.variant_by_name("qkclip-ds3")
        fx = mdf.write_fixture(v, os.path.join(self.tmp, "q"))
        m = mdf.ref_model(fx)
        prompts = [[int(t) for t in np.random.default_rng(s).integers(0, 256, 20)]
                   for s in range(3)]
        tau = 7.75
        S0 = m.max_logits(prompts)
        over = S0 > tau
        self.assertGreaterEqual(int(over.any(axis=1).sum()), 3, S0)   # several layers clipped
        self.assertTrue((~over).any(), S0)
        path = os.path.join(self.tmp, "stats.safetensors")
        qc.write_max_logits(path, m.max_logits(prompts, per_prompt=True).transpose(1, 0, 2),
                            fx.config, form="stacked", sow_tuple=True,
                            prefix="intermediates.decoder")
        cm, g, S = qc.qk_clip_from_files(fx.checkpoint_args, fx.config_path, path, tau)
        np.testing.assert_array_equal(S, S0)
        S1 = cm.max_logits(prompts)
        first = int(np.nonzero(over.any(axis=1))[0][0])
        np.testing.assert_array_equal(S1[:first], S0[:first])
        self.assertTrue((S1[first][over[first]] <= tau * 1.01).all(), (S0[first], S1[first]))
        np.testing.assert_array_equal(S1[first][~over[first]], S0[first][~over[first]])
        # one-shot statistics only bind the first clipped layer ...
        # ... the sequential procedure binds every layer
        sm, g2, S2 = qc.sequential_calibrate_and_clip(m, prompts, tau)
        S3 = sm.max_logits(prompts)
        self.assertTrue((S3 <= tau * 1.01).all(), S3)
        np.testing.assert_array_equal(g2[first], g[first])
        self.assertTrue(((g2 < 1) == (S2 > tau)).all())
        # per-group sequential: one gamma per head for every layer of a group
        pm, g3, _ = qc.sequential_calibrate_and_clip(m, prompts, tau, per_group=True)
        np.testing.assert_array_equal(g3[1], g3[2])
        np.testing.assert_array_equal(g3[2], g3[3])

    def test_llama_query_mode(self):
        import make_fixture as mf
        v = mf.variant_by_name("linen-scan1-f32")
        fx = mf.write_fixture(v, os.path.join(self.tmp, "llama"))
        cfg = common.lr.load_config(fx.config_path)
        path = os.path.join(self.tmp, "ml.safetensors")
        qc.write_max_logits(path, np.array([[8.0, 20.0, 1.0, 5.0], [1.0, 1.0, 1.0, 40.0]]),
                            cfg, form="stacked")
        with self.assertRaisesRegex(ValueError, "only supported for MLA"):
            qc.llama_query_clip(fx.checkpoint_args, fx.config_path, path, 10.0)
        cm, g, S = qc.llama_query_clip(fx.checkpoint_args, fx.config_path, path, 10.0,
                                       mode="query")
        base = common.lr.RefModel.load(fx.checkpoint_args, fx.config_path)
        np.testing.assert_allclose(g, [[1, 0.5, 1, 1], [1, 1, 1, 0.25]], rtol=1e-6)
        qk = "self_attention/query/kernel"
        np.testing.assert_array_equal(cm.layers[0][qk][:, 0], base.layers[0][qk][:, 0])
        np.testing.assert_allclose(cm.layers[0][qk][:, 1], base.layers[0][qk][:, 1] * 0.5,
                                   rtol=1e-2)
        np.testing.assert_array_equal(cm.layers[1]["self_attention/key/kernel"],
                                      base.layers[1]["self_attention/key/kernel"])


# ------------------------------------------------------------------------------------------------
# entry points


class EntryPointTest(common.TempDirCase):
    def test_entry_points(self):
        v = mdf.variant_by_name("ds3-nnx-scan0-f32-value-slash")
        fx = mdf.write_fixture(v, os.path.join(self.tmp, "e"))
        toks = [5, 17, 200, 3, 99, 42]
        lg = dr.reference_logits(fx.checkpoint_args, fx.config_path, toks, scan_axis=0)
        self.assertEqual(lg.shape, (6, 256))
        self.assertEqual(lg.dtype, np.float32)
        g = dr.reference_greedy(fx.checkpoint_args, fx.config_path, toks, 3, scan_axis=0)
        self.assertEqual(g[0], int(lg[-1].argmax()))
        ml = dr.reference_max_logits(fx.checkpoint_args, fx.config_path, toks, scan_axis=0)
        self.assertEqual(ml.shape, (3, 4))
        ml2 = dr.reference_max_logits(fx.checkpoint_args, fx.config_path, [toks, toks[:3]],
                                      scan_axis=0)
        np.testing.assert_array_equal(ml, ml2)           # a prefix never exceeds the whole
        # the config's param_scan_axis is used when scan_axis is not given
        np.testing.assert_array_equal(dr.reference_logits(fx.checkpoint_args, fx.config_path,
                                                          toks), lg)
        with self.assertRaises(ValueError):
            dr.reference_logits(fx.checkpoint_args, fx.config_path, toks, scan_axis=1)
        # prefix property: logits of a prefix are the first rows (causal, deterministic)
        np.testing.assert_array_equal(dr.reference_logits(fx.checkpoint_args, fx.config_path,
                                                          toks[:4]), lg[:4])


if __name__ == "__main__":
    unittest.main()
