#!/usr/bin/python3
"""Self-tests of the numpy reference and the fixture generator (no kiln binary needed).

Each check uses a second, independently written formulation (tiny safetensors parser, direct RoPE
formulas incl. Meta's llama3 `apply_scaling`, an incremental f64 decoder with a KV cache), so a bug
in the reference would have to be made twice, differently, to go unnoticed.
"""

import contextlib
import json
import math
import os
import struct
import unittest

import numpy as np

import common
from common import lr, mf, st


def parse_safetensors_independently(path):
    """Deliberately separate from safetensors_io: struct + json + frombuffer."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    spans = []
    for k, info in header.items():
        if k == "__metadata__":
            continue
        b, e = info["data_offsets"]
        spans.append((b, e, k))
        raw = body[b:e]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view("<f4")
        else:
            arr = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2"}[info["dtype"]]).astype("<f4")
        out[k] = (info["dtype"], arr.reshape(info["shape"]))
    spans.sort()
    return header, out, spans, len(body)


def bf16_nearest_bruteforce(values):
    """Round f32 values to bf16 by searching the full sorted table of finite bf16 values."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        vals = (bits << 16).view(np.float32).astype(np.float64)
    finite = np.isfinite(vals)
    bits, vals = bits[finite], vals[finite]
    order = np.argsort(vals, kind="stable")
    bits, vals = bits[order], vals[order]
    out = []
    for x in values.astype(np.float64):
        i = np.searchsorted(vals, x)
        cands = [j for j in (i - 1, i, i + 1) if 0 <= j < len(vals)]
        best = min(cands, key=lambda j: (abs(vals[j] - x), bits[j] & 1, bits[j]))
        out.append(vals[best])
    return np.array(out, dtype=np.float64)


@contextlib.contextmanager
def no_bf16_rounding():
    old = lr.bf16
    lr.bf16 = lambda x: np.asarray(x, dtype=np.float32)
    try:
        yield
    finally:
        lr.bf16 = old


# ------------------------------------------------------------------------------------------------
# an independent, incremental f64 implementation (no rounding at all) used to check the structure

def rope_direct_halfsplit(x, pos, theta):
    d = x.shape[-1]
    h = d // 2
    inv = theta ** (-2.0 * np.arange(h) / d)
    z = (x[..., :h] + 1j * x[..., h:]) * np.exp(1j * pos * inv)
    return np.concatenate([z.real, z.imag], axis=-1)


def llama3_apply_scaling(freqs):
    """Meta llama-models reference `apply_scaling` (written independently, f64)."""
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new.append(freq)
        elif wavelen > low_freq_wavelen:
            new.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor -
                                                                       low_freq_factor)
            new.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return np.array(new)


def rope_direct_interleaved_llama31(x, pos, theta):
    d = x.shape[-1]
    inv = llama3_apply_scaling(theta ** (-2.0 * np.arange(d // 2) / d))
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos * inv)
    out = np.empty_like(x)
    out[..., 0::2] = z.real
    out[..., 1::2] = z.imag
    return out


def incremental_decoder_f64(model, tokens):
    """Token-by-token decoder with a KV cache, f64, written from docs/maxtext.md §2.4 in a different style."""
    c = model.cfg
    H, K, D = c["num_query_heads"], c["num_kv_heads"], c["head_dim"]
    eps = c["normalization_layer_epsilon"]
    theta = c["rope_max_timescale"]
    llama31 = lr.rope_kind(c) == "llama3.1"
    qwen = c["decoder_block"] == "qwen3"
    W = [{k: v.astype(np.float64) for k, v in t.items()} for t in model.layers]
    emb = model.g["embedding"].astype(np.float64)

    def norm(x, s):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * s

    def rope(x, p):
        return rope_direct_interleaved_llama31(x, p, theta) if llama31 else \
            rope_direct_halfsplit(x, p, theta)

    caches = [([], []) for _ in W]
    rows = []
    for p, tok in enumerate(tokens):
        x = emb[tok]
        for w, (kc, vc) in zip(W, caches):
            h = norm(x, w["pre_self_attention_layer_norm/scale"])
            q = np.einsum("e,ehd->hd", h, w["self_attention/query/kernel"])
            k = np.einsum("e,ekd->kd", h, w["self_attention/key/kernel"])
            v = np.einsum("e,ekd->kd", h, w["self_attention/value/kernel"])
            if c["use_qk_norm"]:
                q = norm(q, w["self_attention/query_norm/scale"])
                k = norm(k, w["self_attention/key_norm/scale"])
            q, k = rope(q, p), rope(k, p)
            if qwen:
                q = q / math.sqrt(D)
            kc.append(k)
            vc.append(v)
            Ks, Vs = np.stack(kc), np.stack(vc)            # [p+1, K, D]
            heads = []
            for hh in range(H):
                kv = hh // (H // K)
                s = Ks[:, kv, :] @ q[hh]
                a = np.exp(s - s.max())
                heads.append((a / a.sum()) @ Vs[:, kv, :])
            o = np.einsum("hd,hde->e", np.stack(heads), w["self_attention/out/kernel"])
            x = x + o
            h = norm(x, w["post_self_attention_layer_norm/scale"])
            gte = h @ w["mlp/wi_0/kernel"]
            x = x + ((gte / (1 + np.exp(-gte))) * (h @ w["mlp/wi_1/kernel"])) @ w["mlp/wo/kernel"]
        y = norm(x, model.g["final_norm"].astype(np.float64))
        if c["logits_via_embedding"]:
            lg = emb @ y
            if c["normalize_embedding_logits"]:
                lg = lg / math.sqrt(c["emb_dim"])
        else:
            lg = y @ model.g["logits_dense"].astype(np.float64)
        rows.append(lg)
    return np.stack(rows)


class Bf16RoundingTest(unittest.TestCase):
    def test_special_values(self):
        x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), np.inf, -np.inf,
                      np.float32(3.4028235e38), 0.0, -0.0], dtype=np.float32)
        r = st.bf16_round(x)
        self.assertEqual(r[0], 1.0)
        self.assertEqual(r[1], 1.0)                  # tie -> even (down)
        self.assertEqual(r[2], 1.0 + 2 ** -6)        # tie -> even (up)
        self.assertEqual(r[3], -1.0)
        self.assertEqual(r[4], np.inf)
        self.assertEqual(r[5], -np.inf)
        self.assertEqual(r[6], np.inf)               # overflow rounds to inf
        self.assertEqual(np.signbit(r[8]), True)
        nan = st.bf16_round(np.array([np.nan, -np.nan], dtype=np.float32))
        self.assertTrue(np.isnan(nan).all())

    def test_against_bruteforce(self):
        rng = np.random.default_rng(0)
        x = np.concatenate([
            rng.standard_normal(300).astype(np.float32),
            (rng.standard_normal(100) * 1e-39).astype(np.float32),   # f32 subnormals
            (rng.standard_normal(100) * 1e30).astype(np.float32),
            # exact ties: bf16 value + half an ulp
            ((st.f32_to_bf16_bits(rng.standard_normal(100)).astype(np.uint32) << 16)
             | 0x8000).view(np.float32),
        ])
        np.testing.assert_array_equal(st.bf16_round(x).astype(np.float64),
                                      bf16_nearest_bruteforce(x))


class SafetensorsTest(common.TempDirCase):
    def test_round_trip_and_layout(self):
        rng = np.random.default_rng(1)
        tensors = {"a": (rng.standard_normal((3, 5)).astype(np.float32), "F32"),
                   "b.c/d": (rng.standard_normal(7), "BF16"),
                   "e": (rng.standard_normal((2, 2, 2)), "F16")}
        path = os.path.join(self.tmp, "x.safetensors")
        st.write_safetensors(path, tensors, metadata={"format": "pt"})
        header, arrays, spans, body_len = parse_safetensors_independently(path)
        self.assertEqual(header["__metadata__"], {"format": "pt"})
        # contiguous, non-overlapping, covering the whole body
        pos = 0
        for b, e, _ in spans:
            self.assertEqual(b, pos)
            pos = e
        self.assertEqual(pos, body_len)
        np.testing.assert_array_equal(arrays["a"][1], tensors["a"][0])
        np.testing.assert_array_equal(arrays["b.c/d"][1], st.bf16_round(tensors["b.c/d"][0]))
        np.testing.assert_array_equal(arrays["e"][1],
                                      tensors["e"][0].astype(np.float16).astype(np.float32))
        mine = st.read_safetensors(path)
        for k in tensors:
            np.testing.assert_array_equal(mine[k], arrays[k][1])

    def test_sharded(self):
        v = mf.variant_by_name("sharded-index")
        fx = mf.write_fixture(v, os.path.join(self.tmp, "s"))
        single = mf.write_fixture(v.replace(shards=0), os.path.join(self.tmp, "one"))
        with open(fx.checkpoint_args[0]) as f:
            index = json.load(f)
        self.assertEqual(len(set(index["weight_map"].values())), 3)
        merged = {}
        for fname in sorted(set(index["weight_map"].values())):
            _, arrays, _, _ = parse_safetensors_independently(os.path.join(
                os.path.dirname(fx.checkpoint_args[0]), fname))
            for k, (dt, arr) in arrays.items():
                self.assertEqual(index["weight_map"][k], fname)
                merged[k] = arr
        _, ref, _, _ = parse_safetensors_independently(single.checkpoint_files[0])
        self.assertEqual(sorted(merged), sorted(ref))
        for k in ref:
            np.testing.assert_array_equal(merged[k], ref[k][1])


class FixtureLayoutTest(common.TempDirCase):
    def load_raw(self, fx):
        out = {}
        for f in fx.checkpoint_files:
            _, arrays, _, _ = parse_safetensors_independently(f)
            out.update({k: a for k, (_, a) in arrays.items()})
        return out

    def test_scanned_unrolls_to_unrolled(self):
        base = mf.BASE.replace(seed=7, num_decoder_layers=3)
        E, H, D, F, L = 64, 4, 16, 128, 3
        unrolled = self.load_raw(mf.write_fixture(base.replace(scanned=False),
                                                  os.path.join(self.tmp, "u")))
        for axis in (0, 1):
            scanned = self.load_raw(mf.write_fixture(base.replace(scan_axis=axis),
                                                     os.path.join(self.tmp, "s%d" % axis)))
            q = scanned["params.params.decoder.layers.self_attention.query.kernel"]
            n = scanned["params.params.decoder.layers.pre_self_attention_layer_norm.scale"]
            o = scanned["params.params.decoder.layers.self_attention.out.kernel"]
            wo = scanned["params.params.decoder.layers.mlp.wo.kernel"]
            if axis == 1:   # docs/maxtext.md §1.2/§1.4: [E, L, H, D], [E, L], [H, L, D, E], [F, L, E]
                self.assertEqual(q.shape, (E, L, H, D))
                self.assertEqual(n.shape, (E, L))
                self.assertEqual(o.shape, (H, L, D, E))
                self.assertEqual(wo.shape, (F, L, E))
            else:
                self.assertEqual(q.shape, (L, E, H, D))
                self.assertEqual(n.shape, (L, E))
            for key, arr in scanned.items():
                if ".decoder.layers." not in key:
                    np.testing.assert_array_equal(arr, unrolled[key])
                    continue
                for i in range(L):
                    ukey = key.replace(".decoder.layers.", ".decoder.layers_%d." % i)
                    sl = arr[:, i] if axis == 1 else arr[i]
                    np.testing.assert_array_equal(sl, unrolled[ukey], err_msg=key)

    def test_key_layouts(self):
        v = mf.BASE.replace(seed=3)
        cases = {
            ("linen", "."): "params.params.decoder.layers.self_attention.query.kernel",
            ("linen", "/"): "params/params/decoder/layers/self_attention/query/kernel",
            ("nnx", "."): "model.decoder.layers.self_attention.query.kernel",
            ("nnx-decode", "."): "decoder.layers.self_attention.query.kernel.value",
            ("nnx-model-value", "/"): "model/decoder/layers/self_attention/query/kernel/value",
        }
        weights = []
        for (layout, sep), key in cases.items():
            fx = mf.write_fixture(v.replace(layout=layout, sep=sep),
                                  os.path.join(self.tmp, layout + ("s" if sep == "/" else "d")))
            raw = self.load_raw(fx)
            self.assertIn(key, raw)
            emb = key.split("decoder")[0] + "token_embedder" + sep + "embedding" + \
                (sep + "value" if key.endswith("value") else "")
            self.assertIn(emb, raw)
            self.assertEqual(raw[emb].shape, (256, 64))
            self.assertEqual(len(raw), 12)   # 3 globals + 9 stacked layer tensors
            cfg = lr.load_config(fx.config_path)
            weights.append(lr.load_weights(fx.checkpoint_args, cfg))
        for g, layers in weights[1:]:
            for k in g:
                np.testing.assert_array_equal(g[k], weights[0][0][k])
            for a, b in zip(layers, weights[0][1]):
                for k in a:
                    np.testing.assert_array_equal(a[k], b[k])

    def test_qwen3_and_tied_keys(self):
        v = mf.variant_by_name("qwen3-tied")
        raw = self.load_raw(mf.write_fixture(v, os.path.join(self.tmp, "q")))
        self.assertNotIn("params.params.decoder.logits_dense.kernel", raw)
        self.assertEqual(raw["params.params.decoder.layers.self_attention.query_norm.scale"].shape,
                         (16, 2))
        self.assertEqual(raw["params.params.decoder.layers.self_attention.key_norm.scale"].shape,
                         (16, 2))

    def test_storage_dtypes(self):
        for dt, code in (("bf16", "BF16"), ("f16", "F16"), ("f32", "F32")):
            fx = mf.write_fixture(mf.BASE.replace(dtype=dt), os.path.join(self.tmp, dt))
            header, _, _, _ = parse_safetensors_independently(fx.checkpoint_files[0])
            dts = {i["dtype"] for k, i in header.items() if k != "__metadata__"}
            self.assertEqual(dts, {code})

    def test_yaml_config_matches_json(self):
        v = mf.variant_by_name("yaml-llama3")
        fx = mf.write_fixture(v, os.path.join(self.tmp, "y"))
        with open(fx.config_path) as f:
            text = f.read()
        self.assertIn("rope_max_timescale: 500_000", text)
        self.assertIn("base_emb_dim: 64", text)
        from_yaml = lr.load_config(fx.config_path)
        from_json = lr.load_config(mf.config_dict(v))
        for k in ("emb_dim", "num_query_heads", "num_kv_heads", "head_dim", "mlp_dim",
                  "num_decoder_layers", "vocab_size", "rope_max_timescale",
                  "normalization_layer_epsilon", "logits_via_embedding", "decoder_block"):
            self.assertEqual(from_yaml[k], from_json[k], k)
        self.assertEqual(from_yaml["rope_max_timescale"], 500000.0)


class RopeTest(unittest.TestCase):
    def test_default_rope_matches_complex_formula(self):
        rng = np.random.default_rng(2)
        x = st.bf16_round(rng.standard_normal((40, 3, 16)))
        pos = np.arange(40)
        for theta in (10000.0, 1e6):
            got = lr.apply_default_rope(x, pos, theta)
            want = rope_direct_halfsplit(x.astype(np.float64), pos[:, None, None], theta)
            # sin/cos are rounded to bf16 (2^-9 relative) and so is the output
            np.testing.assert_allclose(got, want, atol=0.02 * np.abs(x).max())
            with no_bf16_rounding():
                exact = lr.apply_default_rope(x, pos, theta)
            np.testing.assert_allclose(exact, want, atol=1e-4)

    def test_llama31_frequencies_match_meta(self):
        for d, theta in ((128, 500000.0), (16, 500000.0), (64, 10000.0)):
            ours = lr.llama31_inv_freq(d, theta)[0::2].astype(np.float64)
            meta = llama3_apply_scaling(theta ** (-2.0 * np.arange(d // 2) / d))
            np.testing.assert_allclose(ours, meta, rtol=2e-6)
        # all three bands are exercised for the real Llama 3.1 head (d=128, theta=5e5)
        base = 500000.0 ** (-2.0 * np.arange(64) / 128)
        wl = 2 * math.pi / base
        self.assertTrue((wl < 2048).any() and (wl > 8192).any() and
                        ((wl >= 2048) & (wl <= 8192)).any())

    def test_llama31_rope_matches_complex_formula(self):
        rng = np.random.default_rng(3)
        x = st.bf16_round(rng.standard_normal((30, 2, 16)))
        pos = np.arange(0, 3000, 100)
        want = rope_direct_interleaved_llama31(x.astype(np.float64), pos[:, None, None], 5e5)
        with no_bf16_rounding():
            got = lr.apply_llama31_rope(x, pos, 5e5)
        np.testing.assert_allclose(got, want, atol=2e-3)   # f32 angles at pos ~3000
        np.testing.assert_allclose(lr.apply_llama31_rope(x, pos, 5e5), want,
                                   atol=0.01 * np.abs(x).max())

    def test_llama31_interleaved_equals_hf_halfsplit_after_permutation(self):
        """docs/maxtext.md §10.1: MaxText llama3.1 q/k kernels are HF's with each head's output dims
        interleaved (new[2j] = old[j], new[2j+1] = old[j + D/2]); with the interleaved RoPE the
        scores q.k equal HF's half-split RoPE on the original layout."""
        rng = np.random.default_rng(4)
        D, theta = 16, 5e5
        q_hf = rng.standard_normal((50, D))
        k_hf = rng.standard_normal((50, D))
        perm = np.empty(D, dtype=int)
        perm[0::2] = np.arange(D // 2)
        perm[1::2] = np.arange(D // 2) + D // 2
        pos = np.arange(50)[:, None]
        inv = llama3_apply_scaling(theta ** (-2.0 * np.arange(D // 2) / D))

        def hf_rope(x):
            ang = pos * inv
            c, s = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
            rot = np.concatenate([-x[:, D // 2:], x[:, :D // 2]], -1)
            return x * c + rot * s

        s_hf = hf_rope(q_hf) @ hf_rope(k_hf).T
        with no_bf16_rounding():
            qm = lr.apply_llama31_rope(q_hf[:, perm][:, None, :], np.arange(50), theta)[:, 0]
            km = lr.apply_llama31_rope(k_hf[:, perm][:, None, :], np.arange(50), theta)[:, 0]
        np.testing.assert_allclose(qm.astype(np.float64) @ km.astype(np.float64).T, s_hf,
                                   atol=1e-3)


class ForwardStructureTest(common.TempDirCase):
    """The reference with rounding disabled equals an incremental f64 decoder (KV cache)."""

    def check(self, name):
        v = mf.variant_by_name(name)
        fx = mf.write_fixture(v, os.path.join(self.tmp, name))
        m = lr.RefModel.load(fx.checkpoint_args, fx.config_path, v.set_overrides,
                             v.scan_axis if v.scanned else None)
        toks = [int(t) for t in np.random.default_rng(5).integers(0, v.vocab_size, 12)]
        with no_bf16_rounding():
            got = m.logits(toks)
        want = incremental_decoder_f64(m, toks)
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), err_msg=name)
        # and the bf16 reference stays within the e2e tolerance of the exact math
        ratio = np.abs(m.logits(toks) - want).max() / np.abs(want).max()
        self.assertLess(ratio, 0.01, name)

    def test_llama_default_rope_gqa(self):
        self.check("linen-scan1-f32")

    def test_llama31_rope(self):
        self.check("llama3.1-rope")

    def test_mha_tied_normalized(self):
        self.check("tied-normalized")

    def test_qwen3_tied(self):
        self.check("qwen3-tied")

    def test_qwen3_untied_scan0(self):
        self.check("qwen3-untied-nnx-scan0-bf16")

    def test_wide(self):
        self.check("wide-gqa3")


class SensitivityTest(unittest.TestCase):
    """The e2e criteria catch plausible engine bugs and tolerate precision-only differences
    (tests/reference/sensitivity.py on the qwen3 variant, which has the most applicable
    mutations; run the script itself for all variants incl. the llama3.1 long-context one)."""

    def test_mutations_detected(self):
        import sensitivity
        lines = []
        failures = sensitivity.run(["qwen3-untied-nnx-scan0-bf16"], out=lines.append)
        self.assertEqual(failures, [], "\n".join(lines))


if __name__ == "__main__":
    unittest.main()
