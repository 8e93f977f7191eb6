#!/usr/bin/python3
"""End-to-end LoRA (docs/maxtext.md §4, issue 4): adapters written by tests/reference/lora_ref.py, merged at
export (`--merge-lora`) or kept as run-time adapters (`--lora-name`, `kiln adapter add`), against
the numpy reference of the merged model (lora_ref.merged_model: W' = bf16(W + s·A·B), on
llama_ref / deepseek_ref).

kiln command lines (the contract these tests are written to):
  kiln export <checkpoint/config args> --out ART --lora ADIR [--lora ADIR2] [--lora-scale S]
              --merge-lora                                       -> ordinary merged artifact
  kiln export <...> --out ART --lora ADIR --lora-name NAME [--lora-scale S]
                                                                  -> base + ART/adapters/NAME/
  kiln adapter add ART ADIR --name NAME [--lora-scale S]          (base blobs untouched)
  kiln adapter list ART --json  -> {"adapters": [{"name", "format", "rank", "bytes",
                                                  "targets" (number of (layer, tensor) pairs)}]}
  kiln adapter remove ART NAME
  kiln golden dump ART --tokens T --out F.npy [--adapter NAME]    (f32 [T, vocab] .npy)
  kiln run ART --tokens T --max-tokens N --json [--adapter NAME]  -> {"tokens": [...], ...}
  kiln run ART --prompts-file F --slots 3 --max-tokens 16 --json
        F: one request per line, `@NAME t1,t2,...` (adapter NAME) or `t1,t2,...` (base)
        -> {"requests": [{"tokens", "adapter" (NAME or null), "finish_reason"}, ...]} in order
  kiln inspect ART --json       -> {"adapters": [{"name", "bytes", "rank", "targets"}, ...], ...}

Acceptance per case (as test_llama_e2e): golden dump top-1 identical at every prompt position,
max|dlogit| <= 2% of max|reference logit|, `run --max-tokens 32` greedy tokens identical to the
reference's -- for the merged artifact and for the run-time adapter, both against the SAME merged
reference (run-time y = x·W + s·(x·A)·B differs from the merged bf16 weights by rounding only).
The prompt is chosen on the merged reference (top-1/top-2 gap >= 3% everywhere, greedy tokens
sensitive to decode-path bugs; DeepSeek: expert-choice gaps >= 3% too) and the adapter must move
the reference logits by >= MIN_EFFECT of max|logit| on it (so "adapter ignored" fails by far).

Coverage (issue 4 acceptance): Llama and DeepSeek fixtures; scanned and unrolled MaxText adapters
(Linen and NNX keys, "." and "/" separators, f32 and bf16); PEFT adapters with the llama3.1 RoPE
permutation, the llama2/mistral query scale, qwen3 (no transform), rsLoRA, rank_pattern and
alpha_pattern; every target (llama q k v o wi_0 wi_1 wo; DeepSeek wq_a wq_b query wkv_a wkv_b out
and the dense-layer MLP); merge and run-time for each; --lora-scale; two merged adapters; a zero-B
adapter (bit-identical logits); adapter add/list/remove/inspect; a mixed-adapter batch; bad
adapters (exit 1, one `kiln: error:` line naming the tensor/key/file, nothing left behind).
"""

import hashlib
import json
import os
import shutil
import unittest

import numpy as np

import common
from common import kiln, mf, st, tokens_arg, log, describe_row

import deepseek_ref as dr  # noqa: E402  (common puts tests/reference on sys.path)
import llama_ref as lr  # noqa: E402
import lora_ref as L  # noqa: E402
import make_deepseek_fixture as mdf  # noqa: E402

PROMPT_LEN = 20
N_GEN = 32
BATCH_GEN = 16
REL_TOL, MIN_GAP = common.REL_TOL, common.MIN_GAP
MIN_EFFECT = 0.1


def norm_msg(s):
    return s.replace("/", ".")


def file_snapshot(path, skip_manifest=False, skip_adapters=False):
    """{relative path: (sha256, mtime_ns)} of every file under an artifact directory."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            rel = os.path.relpath(full, path)
            if skip_manifest and rel == "manifest.kfb":
                continue
            if skip_adapters and rel.split(os.sep)[0] == "adapters":
                continue
            with open(full, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            out[rel] = (digest, os.stat(full).st_mtime_ns)
    return out


def base_blobs(path):
    """{file: bytes} of the base artifact's *.kblob files (top level only)."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".kblob"):
            with open(os.path.join(path, f), "rb") as fh:
                out[f] = fh.read()
    return out


def family_module(name):
    try:
        mdf.variant_by_name(name)
        return mdf
    except KeyError:
        return mf


# ------------------------------------------------------------------------------------------------


class LoraCase(common.TempDirCase):
    """Helpers shared by the LoRA suites."""

    def setUp(self):
        super().setUp()
        common.require_kiln(self)

    # -- fixtures and references -----------------------------------------------------------------

    def fixture(self, name, **overrides):
        mod = family_module(name)
        v = mod.variant_by_name(name)
        if overrides:
            v = v.replace(**overrides)
        return mod.write_fixture(v, os.path.join(self.tmp, "fixture"))

    def adapter(self, fx, spec, label):
        return L.write_adapter(fx, spec, os.path.join(self.tmp, "adapter-" + label))

    def prompt_for(self, fx, model, base_model, name):
        v = fx.variant
        prompt, want, gap, sensitive = L.choose_prompt(model, PROMPT_LEN, N_GEN, seed=v.seed,
                                                       min_gap=MIN_GAP,
                                                       context_sensitive=v.context_sensitive)
        self.assertGreaterEqual(gap, MIN_GAP, "%s: fixture problem - no prompt with clear "
                                "top-1 (and expert) margins on the merged reference (best "
                                "%.4f)" % (name, gap))
        self.assertEqual(sensitive, v.context_sensitive, "%s: fixture problem - no prompt "
                         "whose greedy tokens depend on the decode path" % name)
        eff = L.effect(model, base_model, prompt)
        base_greedy = base_model.greedy(prompt, N_GEN)
        log("    %-44s adapter effect on the logits %.3f of max|logit|; greedy tokens changed "
            "at %d of %d steps" % (name, eff, sum(a != b for a, b in zip(want, base_greedy)),
                                   N_GEN))
        self.assertGreaterEqual(eff, MIN_EFFECT, "%s: fixture problem - the adapter moves the "
                                "reference logits by only %.3f of max|logit|" % (name, eff))
        return prompt, want

    # -- kiln calls ------------------------------------------------------------------------------

    def export(self, fx, out, *extra, what="kiln export"):
        res = kiln("export", *fx.export_args(), "--out", out, *extra)
        self.assertKilnOk(res, what)
        self.assertTrue(os.path.isdir(out), "%s did not create %s" % (what, out))
        return out

    def golden(self, art, tokens, adapter=None, what="logits"):
        return common.engine_logits(self, art, tokens, adapter, what)

    def run_tokens(self, art, tokens, n, adapter=None, what="kiln run"):
        extra = ["--adapter", adapter] if adapter else []
        res = kiln("run", art, "--tokens", tokens_arg(tokens), "--max-tokens", n, "--json",
                   *extra)
        self.assertKilnOk(res, what)
        out = common.parse_json_stdout(res)
        self.assertIn("tokens", out, "%s: --json output has no 'tokens': %s" % (what, out))
        return [int(t) for t in out["tokens"]]

    def adapter_list(self, art):
        res = kiln("adapter", "list", art, "--json")
        self.assertKilnOk(res, "kiln adapter list")
        out = common.parse_json_stdout(res)
        self.assertIn("adapters", out, "adapter list --json has no 'adapters': %s" % out)
        return {a["name"]: a for a in out["adapters"]}

    # -- acceptance ------------------------------------------------------------------------------

    def compare_logits(self, name, got, ref, tokens):
        self.assertEqual(got.dtype, np.float32, "%s: golden dump dtype %s" % (name, got.dtype))
        self.assertEqual(got.shape, ref.shape, "%s: golden dump shape %s, expected %s"
                         % (name, got.shape, ref.shape))
        self.assertTrue(np.isfinite(got).all(), "%s: non-finite logits" % name)
        delta = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        ratio = float(delta.max() / np.abs(ref).max())
        pos, col = np.unravel_index(int(delta.argmax()), delta.shape)
        gaps = lr.relative_gaps(ref)
        log("    %-44s max|dlogit| = %.5f ratio = %.5f (limit %.2f) worst at pos %d id %d"
            % (name, delta.max(), ratio, REL_TOL, pos, col))
        bad = np.nonzero(got.argmax(-1) != ref.argmax(-1))[0]
        if len(bad):
            msgs = ["  pos %d (token %d): kiln top [%s] vs ref top [%s], ref rel gap %.4f"
                    % (p, tokens[p], describe_row(got[p]), describe_row(ref[p]), gaps[p])
                    for p in bad[:8]]
            self.fail("%s: top-1 differs at %d of %d positions:\n%s"
                      % (name, len(bad), len(tokens), "\n".join(msgs)))
        self.assertLessEqual(ratio, REL_TOL, "%s: max|dlogit| %.5f at pos %d id %d (kiln %.5f, "
                             "ref %.5f) exceeds %.0f%% of max|ref logit|"
                             % (name, delta.max(), pos, col, got[pos, col], ref[pos, col],
                                REL_TOL * 100))

    def compare_greedy(self, name, model, prompt, got, want):
        if got != want:
            n = min(len(got), len(want))
            i = next((j for j in range(n) if got[j] != want[j]), n)
            detail = ""
            if i < len(want):
                row = model.logits(list(prompt) + want[:i])[-1]
                detail = " (reference logits there: [%s])" % describe_row(row)
            self.fail("%s: greedy tokens diverge at step %d%s\n  kiln: %s\n  ref:  %s"
                      % (name, i, detail, got, want))

    def check_artifact(self, name, art, model, prompt, want, adapter=None):
        got = self.golden(art, prompt, adapter, "%s: golden dump" % name)
        self.compare_logits(name, got, model.logits(prompt), prompt)
        toks = self.run_tokens(art, prompt, N_GEN, adapter, "%s: kiln run" % name)
        self.compare_greedy(name, model, prompt, toks, want)

    def run_case(self, variant, specs, runtime="export", lora_scale=None, runtime_check=True):
        """Merge at export and (one adapter) run-time adapter, both vs the merged reference."""
        fx = self.fixture(variant)
        base = L.load_base(fx)
        ads = [self.adapter(fx, s, "%d" % i) for i, s in enumerate(specs)]
        us = 1.0 if lora_scale is None else lora_scale
        model = L.merged_model(fx, ads, us, base=base)
        base_model = L.merged_model(fx, [], base=base)
        name = self._testMethodName
        prompt, want = self.prompt_for(fx, model, base_model, name)
        scale_args = [] if lora_scale is None else ["--lora-scale", lora_scale]

        # merge at export
        merged = os.path.join(self.tmp, "merged.kiln")
        lora_args = []
        for a in ads:
            lora_args += ["--lora", a.directory]
        self.export(fx, merged, *lora_args, *scale_args, "--merge-lora",
                    what="%s: kiln export --merge-lora" % name)
        self.assertFalse(os.path.exists(os.path.join(merged, "adapters")) and
                         os.listdir(os.path.join(merged, "adapters")),
                         "%s: --merge-lora wrote run-time adapter blobs" % name)
        self.check_artifact(name + " [merged]", merged, model, prompt, want)

        if not runtime_check:
            return fx, ads, model, prompt
        self.assertEqual(len(ads), 1)
        ad = ads[0]
        plain = self.export(fx, os.path.join(self.tmp, "plain.kiln"), what="plain export")
        art = os.path.join(self.tmp, "runtime.kiln")
        if runtime == "export":
            self.export(fx, art, "--lora", ad.directory, "--lora-name", "ad1", *scale_args,
                        what="%s: kiln export --lora-name" % name)
            self.assertEqual(base_blobs(art), base_blobs(plain), "%s: the base blobs of an "
                             "export with a run-time adapter differ from a plain export" % name)
        else:
            shutil.copytree(plain, art)
            before = file_snapshot(art, skip_manifest=True)
            res = kiln("adapter", "add", art, ad.directory, "--name", "ad1", *scale_args)
            self.assertKilnOk(res, "%s: kiln adapter add" % name)
            self.assertEqual(file_snapshot(art, skip_manifest=True, skip_adapters=True), before,
                             "%s: kiln adapter add modified base files" % name)
        self.assertTrue(os.path.isdir(os.path.join(art, "adapters", "ad1")),
                        "%s: no %s/adapters/ad1/" % (name, art))
        listed = self.adapter_list(art)
        self.assertIn("ad1", listed, listed)
        entry = listed["ad1"]
        self.assertEqual(entry.get("format"), ad.spec.fmt, entry)
        self.assertEqual(entry.get("rank"), ad.spec.r, entry)
        self.assertEqual(entry.get("targets"), len(ad.pairs), "%s: targets = number of adapted "
                         "(layer, tensor) pairs %d: %s" % (name, len(ad.pairs), entry))
        self.assertGreater(entry.get("bytes", 0), 0, entry)
        self.check_artifact(name + " [run-time]", art, model, prompt, want, adapter="ad1")
        # without --adapter the artifact is the base model, bit for bit
        got = self.golden(art, prompt, None, "%s: golden dump without --adapter" % name)
        self.assertTrue(np.array_equal(got, self.golden(plain, prompt)), "%s: logits without "
                        "--adapter differ from the plain export's" % name)
        return fx, ads, model, prompt


# ------------------------------------------------------------------------------------------------


class LoraLlamaTest(LoraCase):
    def test_llama2_maxtext_linen_scanned_qkvo(self):
        self.run_case("linen-scan1-f32", [L.AdapterSpec(
            fmt="maxtext", layout="linen", sep=".", scanned=True, targets=("q", "k", "v", "o"),
            r=4, lora_alpha=8.0, seed=11)], runtime="export")

    def test_llama2_maxtext_nnx_unrolled_mlp_bf16_layer_subset_lora_scale(self):
        # 3-layer unrolled bf16 checkpoint; the adapter skips layer 1; --lora-scale 0.5
        self.run_case("nnxdecode-unrolled-bf16", [L.AdapterSpec(
            fmt="maxtext", layout="nnx", sep="/", scanned=False, dtype="bf16",
            targets=("wi_0", "wi_1", "wo"), names="path", layers=(0, 2), r=6, lora_alpha=3.0,
            gain=0.5, seed=12)], runtime="add", lora_scale=0.5)

    def test_llama31_peft_all_targets_rope_permutation(self):
        self.run_case("llama3.1-rope", [L.AdapterSpec(
            fmt="peft", targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo"), r=8,
            lora_alpha=16.0, seed=13)], runtime="export")

    def test_llama2_peft_rslora_rank_and_alpha_patterns(self):
        self.run_case("linen-scan1-bf16-slash", [L.AdapterSpec(
            fmt="peft", targets=("q", "k", "v", "o", "wi_0"), r=4, lora_alpha=8.0,
            use_rslora=True, dtype="bf16",
            rank_pattern={"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2},
            alpha_pattern={"o_proj": 4.0, "model.layers.0.mlp.gate_proj": 32.0},
            seed=14)], runtime="add")

    def test_qwen3_peft_no_query_scale(self):
        self.run_case("qwen3-untied-nnx-scan0-bf16", [L.AdapterSpec(
            fmt="peft", targets=("q", "k", "v", "o"), r=4, lora_alpha=4.0, seed=15)],
            runtime="export")

    def test_mistral_peft_query_scale_runtime_add(self):
        self.run_case("mistral", [L.AdapterSpec(
            fmt="peft", targets=("q", "wi_1"), r=4, lora_alpha=8.0, gain=0.35, seed=16)],
            runtime="add")

    def test_mistral_two_adapters_merged(self):
        """MaxText NNX "." scanned bf16 (q, wo) + PEFT (v, up_proj), both merged."""
        self.run_case("mistral", [
            L.AdapterSpec(fmt="maxtext", layout="nnx", sep=".", scanned=True, dtype="bf16",
                          targets=("q", "wo"), r=4, lora_alpha=4.0, seed=17),
            L.AdapterSpec(fmt="peft", targets=("v", "wi_1"), r=2, lora_alpha=4.0, seed=18)],
            runtime_check=False)


class LoraDeepSeekTest(LoraCase):
    def test_ds3_maxtext_linen_scanned_mla_and_dense_mlp(self):
        # groups dense_layers (1 layer) and moe_layers (2 layers): attention in both, MLP in the
        # dense group only; o_proj by its short name, the others as module paths
        self.run_case("ds3-linen-scan1-f32", [L.AdapterSpec(
            fmt="maxtext", layout="linen", sep="/", scanned=True, names="short",
            targets=("wq_a", "wq_b", "wkv_a", "wkv_b", "o", "wi_0", "wi_1", "wo"), r=4,
            lora_alpha=8.0, seed=21)], runtime="export")

    def test_ds3_maxtext_nnx_unrolled_bf16_layer_subset(self):
        # 2 dense + 2 MoE layers; layers 1..3 adapted (dense_layers_1, moe_layers_0/1)
        self.run_case("ds3-2dense-scan1", [L.AdapterSpec(
            fmt="maxtext", layout="nnx", sep="/", scanned=False, dtype="bf16", names="path",
            targets=("wkv_b", "out", "wo"), layers=(1, 2, 3), r=4, lora_alpha=8.0, gain=0.35,
            seed=22)], runtime="add")

    def test_ds_qlora0_peft_query_kv_and_dense_mlp(self):
        self.run_case("ds3-qlora0", [L.AdapterSpec(
            fmt="peft", targets=("q", "wkv_a", "wkv_b", "o", "wi_0", "wi_1", "wo"), r=4,
            lora_alpha=8.0, use_rslora=True, seed=23)], runtime="export")


# ------------------------------------------------------------------------------------------------


class LoraZeroBTest(LoraCase):
    """An adapter whose B is all zeros changes nothing: bit-identical logits."""

    def check(self, variant, spec):
        fx = self.fixture(variant)
        ad = self.adapter(fx, spec.replace(zero_b=True), "zero")
        art = self.export(fx, os.path.join(self.tmp, "a.kiln"), "--lora", ad.directory,
                          "--lora-name", "zero")
        prompt = [int(t) for t in np.random.default_rng(5).integers(0, fx.variant.vocab_size,
                                                                     17)]
        base = self.golden(art, prompt)
        with_zero = self.golden(art, prompt, "zero")
        self.assertTrue(np.array_equal(base, with_zero), "zero-B adapter changed the logits "
                        "(max |d| = %g)" % np.abs(base - with_zero).max())
        merged = self.export(fx, os.path.join(self.tmp, "m.kiln"), "--lora", ad.directory,
                             "--merge-lora")
        got = self.golden(merged, prompt)
        self.assertTrue(np.array_equal(base, got), "merging a zero-B adapter changed the logits "
                        "(max |d| = %g)" % np.abs(base - got).max())

    def test_zero_b_llama(self):
        self.check("linen-scan1-f32", L.AdapterSpec(
            fmt="maxtext", targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo"), seed=31))

    def test_zero_b_deepseek_peft(self):
        self.check("ds3-linen-scan1-f32", L.AdapterSpec(
            fmt="peft", targets=("wq_a", "wq_b", "wkv_a", "wkv_b", "o", "wi_0"), seed=32))


class LoraAdapterManagementTest(LoraCase):
    """adapter add / list / inspect / remove on a DeepSeek artifact (PEFT q_a/q_b/kv_a/o and a
    MaxText adapter); logits checked on a random prompt (top-1 where the reference gap is
    >= 3%, max|dlogit| <= 2%)."""

    def test_add_list_inspect_remove(self):
        fx = self.fixture("ds3-linen-scan1-bf16-slash")
        base = L.load_base(fx)
        specs = {
            "peft-a": L.AdapterSpec(fmt="peft", targets=("wq_a", "wq_b", "wkv_a", "o"), r=4,
                                    lora_alpha=8.0, dtype="bf16", seed=41),
            "mt.b": L.AdapterSpec(fmt="maxtext", layout="linen", sep=".", scanned=False,
                                  targets=("wkv_b", "wi_0"), names="path", r=2,
                                  lora_alpha=2.0, seed=42),
        }
        ads = {n: self.adapter(fx, s, n) for n, s in specs.items()}
        art = self.export(fx, os.path.join(self.tmp, "a.kiln"))
        before = file_snapshot(art, skip_manifest=True)
        for n, ad in ads.items():
            res = kiln("adapter", "add", art, ad.directory, "--name", n)
            self.assertKilnOk(res, "adapter add %s" % n)
        self.assertEqual(file_snapshot(art, skip_manifest=True, skip_adapters=True), before,
                         "adapter add modified base files")
        listed = self.adapter_list(art)
        self.assertEqual(sorted(listed), sorted(specs), listed)
        for n, ad in ads.items():
            e = listed[n]
            self.assertEqual(e.get("format"), ad.spec.fmt, e)
            self.assertEqual(e.get("rank"), ad.spec.r, e)
            self.assertEqual(e.get("targets"), len(ad.pairs), e)
            self.assertGreater(e.get("bytes", 0), 0, e)
        res = kiln("inspect", art, "--json")
        self.assertKilnOk(res, "inspect --json")
        info = common.parse_json_stdout(res)
        self.assertIn("adapters", info, "inspect --json has no 'adapters'")
        ins = {a.get("name"): a for a in info["adapters"]}
        for n, ad in ads.items():
            self.assertIn(n, ins, info["adapters"])
            self.assertGreater(ins[n].get("bytes", 0), 0, ins[n])
            self.assertEqual(ins[n].get("rank"), ad.spec.r, ins[n])
            self.assertIn("targets", ins[n], ins[n])
        self.assertKilnOk(kiln("inspect", art, "--verify"), "inspect --verify with adapters")

        models = {n: L.merged_model(fx, [ad], base=base) for n, ad in ads.items()}
        base_model = L.merged_model(fx, [], base=base)
        # a prompt whose expert choices are clear (>= 3%) under both adapters
        for seed in range(600, 700):
            prompt = [int(t) for t in np.random.default_rng(seed).integers(0, 256, 24)]
            if all(min(m.routing_margin(prompt)) >= MIN_GAP for m in models.values()):
                break
        else:
            self.fail("fixture problem: no prompt with clear expert choices")
        logits = {}
        for n, model in models.items():
            got = self.golden(art, prompt, n)
            common.check_long_logits(self, n, got, model.logits(prompt), len(prompt), log)
            self.assertGreaterEqual(L.effect(model, base_model, prompt), MIN_EFFECT,
                                    "fixture problem: adapter %s barely matters" % n)
            logits[n] = got

        res = kiln("adapter", "remove", art, "peft-a")
        self.assertKilnOk(res, "adapter remove")
        self.assertFalse(os.path.exists(os.path.join(art, "adapters", "peft-a")),
                         "adapter remove left adapters/peft-a behind")
        self.assertEqual(sorted(self.adapter_list(art)), ["mt.b"])
        res = kiln("golden", "dump", art, "--tokens", tokens_arg(prompt), "--out",
                   os.path.join(self.tmp, "x.npy"), "--adapter", "peft-a")
        self.assertEqual(res.rc, 1, "golden dump with a removed adapter must fail:\n"
                         + res.describe())
        self.assertTrue(np.array_equal(self.golden(art, prompt, "mt.b"), logits["mt.b"]),
                        "removing one adapter changed another adapter's logits")
        self.assertEqual(file_snapshot(art, skip_manifest=True, skip_adapters=True), before,
                         "adapter remove modified base files")
        res = kiln("run", art, "--tokens", "1,2,3", "--max-tokens", 2, "--adapter", "nope")
        self.assertEqual(res.rc, 1, "run with an unknown adapter must exit 1:\n"
                         + res.describe())


class LoraMixedBatchTest(LoraCase):
    """`kiln run --prompts-file` with two adapters and no adapter in one batch (3 slots, 5
    requests): every row's greedy tokens equal the request run alone and the reference."""

    def test_mixed_batch(self):
        fx = self.fixture("linen-scan1-f32", seed=51)
        base = L.load_base(fx)
        ads = {
            "a1": self.adapter(fx, L.AdapterSpec(fmt="maxtext", layout="linen", sep="/",
                                                 scanned=False, targets=("q", "v", "wo"),
                                                 r=4, lora_alpha=8.0, gain=0.35, seed=52),
                               "a1"),
            "a2": self.adapter(fx, L.AdapterSpec(fmt="peft", targets=("k", "o", "wi_0", "wi_1"),
                                                 r=4, lora_alpha=8.0, gain=0.35, seed=53),
                               "a2"),
        }
        models = {None: L.merged_model(fx, [], base=base)}
        for n, ad in ads.items():
            models[n] = L.merged_model(fx, [ad], base=base)
        plan = [("a1", 14), (None, 18), ("a2", 11), ("a1", 20), (None, 9)]
        requests = []
        seed = 500
        for name, length in plan:
            # a prompt with clear margins on its own model whose greedy tokens differ under the
            # other two models (so a row run with the wrong adapter fails)
            for _ in range(40):
                seed += 1
                toks, want, gap, _ = lr.choose_prompt(models[name], length, BATCH_GEN,
                                                      seed=seed, min_gap=MIN_GAP,
                                                      max_tries=5, context_sensitive=False)
                if gap < MIN_GAP:
                    continue
                if all(models[o].greedy(toks, BATCH_GEN) != want for o in models if o != name):
                    break
            else:
                self.fail("fixture problem: no distinguishing prompt for %s" % name)
            requests.append((name, toks, want))
        art = self.export(fx, os.path.join(self.tmp, "a.kiln"), "--lora", ads["a1"].directory,
                          "--lora-name", "a1")
        self.assertKilnOk(kiln("adapter", "add", art, ads["a2"].directory, "--name", "a2"),
                          "adapter add a2")
        path = os.path.join(self.tmp, "prompts.txt")
        with open(path, "w") as f:
            for name, toks, _ in requests:
                f.write(("@%s " % name if name else "") + tokens_arg(toks) + "\n")
        res = kiln("run", art, "--prompts-file", path, "--slots", 3, "--max-tokens", BATCH_GEN,
                   "--json")
        self.assertKilnOk(res, "kiln run --prompts-file")
        out = common.parse_json_stdout(res)
        self.assertIn("requests", out, out)
        rows = out["requests"]
        self.assertEqual(len(rows), len(requests), out)
        for i, ((name, toks, want), row) in enumerate(zip(requests, rows)):
            self.assertEqual(row.get("adapter"), name, "row %d: %s" % (i, row))
            self.assertIn("finish_reason", row, "row %d: %s" % (i, row))
            alone = self.run_tokens(art, toks, BATCH_GEN, name, "row %d alone" % i)
            got = [int(t) for t in row["tokens"]]
            self.assertEqual(got, alone, "row %d (adapter %s): batched tokens differ from the "
                             "request run alone" % (i, name))
            self.compare_greedy("row %d (adapter %s)" % (i, name), models[name], toks, got,
                                want)
        log("    mixed batch: %d requests (%s) identical to solo runs and the reference"
            % (len(rows), ", ".join(str(n) for n, _, _ in requests)))


class LoraThenQkClipTest(LoraCase):
    """`--merge-lora` with QK-Clip: the adapter is merged first and the clip scales the merged
    weights (issue 4 item 2). wq_b / wkv_b of the artifact equal the reference's
    bf16(clip(W + s·A·B)) to within one bf16 step (f32 vs f64 accumulation of A·B may round the
    other way), while the other order, bf16(clip(W) + s·A·B), is far off on every clipped head."""

    def test_merge_happens_before_qk_clip(self):
        import qk_clip_ref as qc
        import test_qk_clip_e2e as tq
        fx = self.fixture("qkclip-ds3")
        v = fx.variant
        base = L.load_base(fx)
        cfg = base[0]
        ad = self.adapter(fx, L.AdapterSpec(fmt="peft", targets=("wq_b", "wkv_b", "wq_a"), r=4,
                                            lora_alpha=8.0, gain=0.5, seed=61), "clip")
        Lyr, H = v.num_decoder_layers, v.num_query_heads
        S = np.full((Lyr, H), 3.0, dtype=np.float32)
        S[:, 0] = 2 * tq.TAU                      # head 0 of every layer: gamma 1/2
        S[1, H - 1] = 4 * tq.TAU                  # and one more head in layer 1: gamma 1/4
        stats = os.path.join(self.tmp, "stats.safetensors")
        qc.write_max_logits(stats, tq.stats_with_batch(S, np.random.default_rng(2)), fx.config,
                            form="layers")
        gammas = qc.gammas_from_stats(S, tq.TAU)
        art_path = self.export(fx, os.path.join(self.tmp, "a.kiln"), "--lora", ad.directory,
                               "--merge-lora", "--max-logits", stats, "--qk-clip-threshold",
                               tq.TAU, what="export --merge-lora --max-logits")
        art = tq.Artifact(self, art_path)
        self.assertIsNotNone(art.qk, "no qk_clip record")
        np.testing.assert_array_equal(art.gammas(), gammas)

        _, _, merged, _ = L.merged_raw_layers(fx, [ad], base=base)
        merge_then_clip = qc.clip_layers(merged, gammas, cfg)
        clip_then_merge = L.merged_raw_layers(
            fx, [ad], base=(cfg, base[1], qc.clip_layers(base[2], gammas, cfg)))[2]
        Dn = cfg["qk_nope_head_dim"]
        for l in range(Lyr):
            for name in ("attn.wq_b", "attn.wkv_b"):
                canon = tq.CLIP_TENSORS[name]
                got = art.bits(l, name)
                want = st.f32_to_bf16_bits(merge_then_clip[l][canon]).reshape(got.shape)
                steps = np.abs(got.astype(np.int32) - want.astype(np.int32))
                self.assertLessEqual(int(steps.max()), 1, "layer %d %s: differs from "
                                     "bf16(clip(W + dW)) by %d bf16 steps"
                                     % (l, name, int(steps.max())))
                other = st.f32_to_bf16_bits(clip_then_merge[l][canon]).reshape(got.shape)
                g = st.bf16_bits_to_f32(got).reshape(got.shape)[:, 0, :Dn]
                o = st.bf16_bits_to_f32(other).reshape(got.shape)[:, 0, :Dn]
                rel = float(np.abs(g - o).max() / np.abs(o).max())
                self.assertGreater(rel, 0.02, "layer %d %s head 0: merge-then-clip and "
                                   "clip-then-merge agree (%.4f); the test cannot tell the order"
                                   % (l, name, rel))
        log("    merge then QK-Clip: wq_b / wkv_b within one bf16 step of bf16(clip(W + dW)) in "
            "all %d layers" % Lyr)

    def test_runtime_adapter_of_clipped_artifact(self):
        """A run-time adapter of a clipped artifact (export --lora-name, and adapter add) has
        B's columns scaled by the artifact's gammas, so base + adapter computes
        clip(W) + s·A·clip(B) = clip(W + s·A·B): the stored B equals the reference's
        bf16(clip(B)) and the logits match the merged-then-clipped reference."""
        import qk_clip_ref as qc
        import test_qk_clip_e2e as tq
        fx = self.fixture("qkclip-ds3")
        v = fx.variant
        base = L.load_base(fx)
        cfg = base[0]
        ad = self.adapter(fx, L.AdapterSpec(fmt="maxtext", targets=("wq_b", "wkv_b", "o"),
                                            names="path", r=4, lora_alpha=8.0, gain=0.35,
                                            seed=62), "clip")
        Lyr, H = v.num_decoder_layers, v.num_query_heads
        S = np.full((Lyr, H), 3.0, dtype=np.float32)
        S[:, 1] = 2 * tq.TAU
        S[2, 0] = 3 * tq.TAU
        stats = os.path.join(self.tmp, "stats.safetensors")
        qc.write_max_logits(stats, tq.stats_with_batch(S, np.random.default_rng(3)), fx.config,
                            form="layers")
        gammas = qc.gammas_from_stats(S, tq.TAU)
        clip_args = ["--max-logits", stats, "--qk-clip-threshold", tq.TAU]
        exported = self.export(fx, os.path.join(self.tmp, "x.kiln"), "--lora", ad.directory,
                               "--lora-name", "ad1", *clip_args)
        added = self.export(fx, os.path.join(self.tmp, "y.kiln"), *clip_args)
        self.assertKilnOk(kiln("adapter", "add", added, ad.directory, "--name", "ad1"),
                          "adapter add to a clipped artifact")

        _, pairs = L.read_adapter(ad.directory, cfg)
        dn = cfg["qk_nope_head_dim"]
        for art in (exported, added):
            for l in range(Lyr):
                blob = tq.read_blob(os.path.join(art, "adapters", "ad1", "layer-%03d.kblob" % l))
                for tensor, module, rope_power in (("attn.wq_b", "self_attention/wq_b", 1),
                                                   ("attn.wkv_b", "self_attention/wkv_b", 0)):
                    got = np.frombuffer(blob[tensor + ".lora_b"], dtype="<u2")
                    b2 = pairs[(l, module)].b2.astype(np.float32)
                    r = b2.shape[0]
                    want = st.f32_to_bf16_bits(qc._scale_nope_rope(
                        b2.reshape(r, H, -1), gammas[l], dn, rope_power)).reshape(-1)
                    steps = np.abs(got.astype(np.int32) - want.astype(np.int32))
                    self.assertLessEqual(int(steps.max()), 1, "%s layer %d %s.lora_b: not B with "
                                         "the artifact's QK-Clip column scales" % (art, l, tensor))
                    plain = st.f32_to_bf16_bits(b2).reshape(-1)
                    self.assertFalse(np.array_equal(got, plain), "%s layer %d %s.lora_b: "
                                     "unscaled although the layer has clipped heads"
                                     % (art, l, tensor))

        _, _, merged, _ = L.merged_raw_layers(fx, [ad], base=base)
        model = dr.RefModel(cfg, base[1], qc.clip_layers(merged, gammas, cfg))
        clipped_base = dr.RefModel(cfg, base[1], qc.clip_layers(base[2], gammas, cfg))
        prompt, want = self.prompt_for(fx, model, clipped_base, self._testMethodName)
        for what, art in (("export --lora-name", exported), ("adapter add", added)):
            self.check_artifact("clipped + run-time adapter [%s]" % what, art, model, prompt,
                                want, adapter="ad1")


# ------------------------------------------------------------------------------------------------
# bad adapters


BAD_LLAMA = mf.BASE.replace(name="bad-lora-base", seed=43)
BAD_QWEN3 = mf.variant_by_name("qwen3-tied").replace(name="bad-lora-qwen3", seed=44)
BAD_DS = mdf.variant_by_name("ds3-linen-scan1-f32").replace(name="bad-lora-ds", seed=45)


def _rewrite(ad, fn):
    """Rewrite an adapter's tensors: fn(dict name -> (array, dtype)) mutates the dict."""
    path = ad.files[0]
    header, _ = st.read_header(path)
    arrays = st.read_safetensors(path)
    t = {k: (arrays[k], header[k]["dtype"]) for k in arrays}
    fn(t)
    st.write_safetensors(path, t)


def _config(ad, fn):
    p = os.path.join(ad.directory, "adapter_config.json")
    with open(p) as f:
        c = json.load(f)
    fn(c)
    with open(p, "w") as f:
        json.dump(c, f)


def _find(keys, *parts):
    hits = [k for k in keys if all(p in k for p in parts)]
    assert hits, (parts, keys)
    return hits[0]


def bad_missing_config(fx, d):
    L.write_adapter(fx, L.AdapterSpec(targets=("q", "v"), seed=1), d)
    os.remove(os.path.join(d, "adapter_config.json"))
    return ["adapter_config.json"]


def bad_rank_mismatch_maxtext(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(targets=("q", "v"), r=4, seed=2), d)
    kb = _find(ad.keys, "query", "lora_b")

    def fn(t):
        b, dt = t[kb]
        t[kb] = (np.concatenate([b, b[:1]], axis=0), dt)      # [5, L, H, D]
    _rewrite(ad, fn)
    return [kb, "self_attention.query", "layers.self_attention.query"]


def bad_rank_mismatch_peft(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(fmt="peft", targets=("q", "v"), r=4, seed=3), d)
    kb = _find(ad.keys, "layers.1.self_attn.v_proj", "lora_B")

    def fn(t):
        b, dt = t[kb]
        t[kb] = (b[:, :2], dt)                                # [out, 2] vs A [4, in]
    _rewrite(ad, fn)
    return [kb, "layers.1.self_attn.v_proj"]


def bad_unknown_target_query_norm(fx, d):
    """qwen3 fixture: a LoRA pair on self_attention/query_norm (a norm scale, not a kernel)."""
    ad = L.write_adapter(fx, L.AdapterSpec(targets=("q",), seed=4), d)
    Lyr, D, r = fx.variant.num_decoder_layers, fx.variant.head_dim, 4
    rng = np.random.default_rng(0)
    ka = "params.params.decoder.layers.self_attention.query_norm.lora_a.kernel"
    kb = "params.params.decoder.layers.self_attention.query_norm.lora_b.kernel"

    def fn(t):
        t[ka] = (rng.standard_normal((D, Lyr, r)).astype(np.float32), "F32")
        t[kb] = (rng.standard_normal((r, Lyr, D)).astype(np.float32), "F32")
    _rewrite(ad, fn)
    _config(ad, lambda c: c["target_modules"].append("self_attention.query_norm"))
    return ["query_norm"]


def bad_unknown_target_moe_expert_maxtext(fx, d):
    """DeepSeek: a LoRA pair on a routed expert weight (MoeBlock_0/wi_0, no `kernel` level)."""
    ad = L.write_adapter(fx, L.AdapterSpec(targets=("wkv_b",), names="path", seed=5), d)
    v = fx.variant
    X, E, Fm, n, r = v.num_experts, v.emb_dim, v.moe_mlp_dim, v.num_moe, 4
    base = "params.params.decoder.moe_layers.DeepSeekMoeBlock_0.MoeBlock_0.wi_0."
    rng = np.random.default_rng(1)

    def fn(t):
        t[base + "lora_a.kernel"] = (rng.standard_normal((X, n, E, r)).astype(np.float32),
                                     "F32")
        t[base + "lora_b.kernel"] = (rng.standard_normal((r, n, X, Fm)).astype(np.float32),
                                     "F32")
    _rewrite(ad, fn)
    _config(ad, lambda c: c["target_modules"].append("MoeBlock_0.wi_0"))
    return ["MoeBlock_0"]


def bad_unknown_target_moe_expert_peft(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(fmt="peft", targets=("wkv_b",), seed=6), d)
    v = fx.variant
    k = "base_model.model.model.layers.1.mlp.experts.3.gate_proj."
    rng = np.random.default_rng(2)

    def fn(t):
        t[k + "lora_A.weight"] = (rng.standard_normal((4, v.emb_dim)).astype(np.float32), "F32")
        t[k + "lora_B.weight"] = (rng.standard_normal((v.moe_mlp_dim, 4)).astype(np.float32),
                                  "F32")
    _rewrite(ad, fn)
    _config(ad, lambda c: c["target_modules"].append("gate_proj"))
    return ["experts.3", "layers.1.mlp.experts"]


def bad_shape_in_dim_maxtext(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(targets=("wi_0", "v"), names="path", seed=7), d)
    ka = _find(ad.keys, "wi_0", "lora_a")

    def fn(t):
        a, dt = t[ka]
        t[ka] = (np.concatenate([a, a[:8]], axis=0), dt)      # in-dim E + 8
    _rewrite(ad, fn)
    return [ka, "mlp.wi_0"]


def bad_shape_in_dim_peft(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(fmt="peft", targets=("q",), seed=8), d)
    ka = _find(ad.keys, "layers.0.self_attn.q_proj", "lora_A")

    def fn(t):
        a, dt = t[ka]
        t[ka] = (a[:, :-3], dt)                               # in-dim E - 3
    _rewrite(ad, fn)
    return [ka, "layers.0.self_attn.q_proj"]


def bad_layer_count_scanned(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(targets=("k",), seed=9), d)

    def fn(t):
        for k in list(t):
            a, dt = t[k]
            t[k] = (np.concatenate([a, a[:, :1]], axis=1), dt)   # L + 1 on the layer axis
    _rewrite(ad, fn)
    return ad.keys + ["self_attention.key"]


def bad_layer_count_unrolled(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(targets=("k",), scanned=False, seed=10), d)
    L_ = fx.variant.num_decoder_layers

    def fn(t):
        for k in list(t):
            if "layers_0" in k:
                t[k.replace("layers_0", "layers_%d" % L_)] = t[k]
    _rewrite(ad, fn)
    return ["layers_%d" % L_]


def bad_layer_count_peft(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(fmt="peft", targets=("v",), seed=11), d)

    def fn(t):
        for k in list(t):
            if ".layers.0." in k:
                t[k.replace(".layers.0.", ".layers.5.")] = t[k]
    _rewrite(ad, fn)
    return ["layers.5"]


def _peft_config_change(key, value):
    def make(fx, d):
        ad = L.write_adapter(fx, L.AdapterSpec(fmt="peft", targets=("q", "v"), seed=12), d)
        _config(ad, lambda c: c.__setitem__(key, value))
        return [key]
    return make


def bad_embedding_lora_keys(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(fmt="peft", targets=("q",), seed=13), d)
    v = fx.variant
    k = "base_model.model.model.embed_tokens."
    rng = np.random.default_rng(3)

    def fn(t):
        t[k + "lora_embedding_A"] = (rng.standard_normal((4, v.vocab_size)).astype(np.float32),
                                     "F32")
        t[k + "lora_embedding_B"] = (rng.standard_normal((v.emb_dim, 4)).astype(np.float32),
                                     "F32")
    _rewrite(ad, fn)
    _config(ad, lambda c: c["target_modules"].append("embed_tokens"))
    return ["embed_tokens", "lora_embedding"]


def bad_embedding_target(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(fmt="peft", targets=("q",), seed=14), d)
    _config(ad, lambda c: c["target_modules"].append("embed_tokens"))
    return ["embed_tokens"]


def bad_two_files_without_index(fx, d):
    ad = L.write_adapter(fx, L.AdapterSpec(targets=("q", "v"), seed=15), d)
    path = ad.files[0]
    header, _ = st.read_header(path)
    arrays = st.read_safetensors(path)
    names = sorted(arrays)
    half = len(names) // 2
    os.remove(path)
    st.write_safetensors(os.path.join(d, "adapter-1.safetensors"),
                         {k: (arrays[k], header[k]["dtype"]) for k in names[:half]})
    st.write_safetensors(os.path.join(d, "adapter-2.safetensors"),
                         {k: (arrays[k], header[k]["dtype"]) for k in names[half:]})
    return [os.path.basename(d), "adapter-1.safetensors", "adapter-2.safetensors", "index"]


BAD_CASES = [
    # (name, fixture variant, builder)
    ("missing_config", BAD_LLAMA, bad_missing_config),
    ("rank_mismatch_maxtext", BAD_LLAMA, bad_rank_mismatch_maxtext),
    ("rank_mismatch_peft", BAD_LLAMA, bad_rank_mismatch_peft),
    ("unknown_target_query_norm", BAD_QWEN3, bad_unknown_target_query_norm),
    ("unknown_target_moe_expert_maxtext", BAD_DS, bad_unknown_target_moe_expert_maxtext),
    ("unknown_target_moe_expert_peft", BAD_DS, bad_unknown_target_moe_expert_peft),
    ("shape_in_dim_maxtext", BAD_LLAMA, bad_shape_in_dim_maxtext),
    ("shape_in_dim_peft", BAD_LLAMA, bad_shape_in_dim_peft),
    ("layer_count_scanned", BAD_LLAMA, bad_layer_count_scanned),
    ("layer_count_unrolled", BAD_LLAMA, bad_layer_count_unrolled),
    ("layer_count_peft", BAD_LLAMA, bad_layer_count_peft),
    ("peft_use_dora", BAD_LLAMA, _peft_config_change("use_dora", True)),
    ("peft_modules_to_save", BAD_LLAMA, _peft_config_change("modules_to_save", ["lm_head"])),
    ("peft_bias_all", BAD_LLAMA, _peft_config_change("bias", "all")),
    ("embedding_lora_keys", BAD_LLAMA, bad_embedding_lora_keys),
    ("embedding_target", BAD_LLAMA, bad_embedding_target),
    ("two_safetensors_without_index", BAD_LLAMA, bad_two_files_without_index),
]


def _write_fixture(v, d):
    return (mdf if isinstance(v, mdf.DSVariant) else mf).write_fixture(v, d)


class BadAdapterTest(LoraCase):
    """Each bad adapter: `export --merge-lora`, `export --lora-name` and `adapter add` exit 1 with
    one `kiln: error:` line naming the offending tensor/key or file; the export leaves no --out
    directory (nor anything else next to it); after the failed `adapter add` the artifact's file
    list and manifest.kfb bytes are unchanged."""

    def assertBad(self, res, keys, what):
        self.assertEqual(res.rc, 1, "%s: expected exit 1:\n%s" % (what, res.describe()))
        lines = res.stderr_lines
        self.assertEqual(len(lines), 1, "%s: expected one stderr line:\n%s"
                         % (what, res.describe()))
        msg = lines[0]
        self.assertTrue(msg.startswith("kiln: error: "), "%s: message must start with 'kiln: "
                        "error: ':\n%s" % (what, res.describe()))
        self.assertTrue(any(norm_msg(k) in norm_msg(msg) for k in keys),
                        "%s: message must name the tensor/key/file (one of %s):\n%s"
                        % (what, keys, res.describe()))
        return msg

    def check(self, variant, builder):
        fx = _write_fixture(variant, os.path.join(self.tmp, "fixture"))
        adir = os.path.join(self.tmp, "bad-adapter")
        keys = builder(fx, adir)
        parent = os.path.join(self.tmp, "out")
        os.makedirs(parent)
        out = os.path.join(parent, "model.kiln")
        for mode in (["--merge-lora"], ["--lora-name", "bad"]):
            res = kiln("export", *fx.export_args(), "--out", out, "--lora", adir, *mode)
            msg = self.assertBad(res, keys, "export %s" % mode[0])
            self.assertFalse(os.path.exists(out), "failed export left %s behind" % out)
            self.assertEqual(os.listdir(parent), [], "failed export left %s"
                             % os.listdir(parent))
        art = self.export(fx, os.path.join(self.tmp, "art.kiln"))
        with open(os.path.join(art, "manifest.kfb"), "rb") as f:
            manifest = f.read()
        files = sorted(file_snapshot(art))
        res = kiln("adapter", "add", art, adir, "--name", "bad")
        self.assertBad(res, keys, "adapter add")
        self.assertEqual(sorted(file_snapshot(art)), files, "failed adapter add changed the "
                         "artifact's files")
        with open(os.path.join(art, "manifest.kfb"), "rb") as f:
            self.assertEqual(f.read(), manifest, "failed adapter add changed manifest.kfb")
        log("    %-44s %s" % (self._testMethodName, msg))


class BadAdapterReferenceTest(common.TempDirCase):
    """The bad adapters are really bad: the reference's own reader refuses each (no kiln)."""

    def test_reference_refuses_every_bad_adapter(self):
        fixtures = {}
        for name, variant, builder in BAD_CASES:
            if variant.name not in fixtures:
                fixtures[variant.name] = _write_fixture(
                    variant, os.path.join(self.tmp, variant.name))
            fx = fixtures[variant.name]
            adir = os.path.join(self.tmp, "bad-" + name)
            builder(fx, adir)
            with self.assertRaises((ValueError, KeyError, OSError), msg=name):
                L.read_adapter(adir, L.base_config(fx))


def _make_bad_test(variant, builder):
    def test(self):
        self.check(variant, builder)
    return test


for _name, _variant, _builder in BAD_CASES:
    setattr(BadAdapterTest, "test_bad_" + _name, _make_bad_test(_variant, _builder))


if __name__ == "__main__":
    unittest.main()
