#!/usr/bin/python3
"""End-to-end serving (issue 5): continuous batching, packed prefill, sampling algorithms, seeded
multi-sampling, stop tokens and finish reasons -- through `kiln run`, on a Llama fixture and a
DeepSeek fixture, against the numpy reference (tests/reference/llama_ref.py, deepseek_ref.py).

kiln command lines (the contract these tests are written to):
  kiln run ART --tokens T --max-tokens N [--sampling greedy|weighted|topk|nucleus|composite]
           [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop IDS] [--samples N] --json
      -> {"tokens", "logprobs", "finish_reason", "sampling", timings...}
         logprobs[i] = log-softmax of the raw logits at tokens[i] (tokens[0] from the prefill);
         finish_reason "length" (--max-tokens reached; the prefill's token counts), "stop" (a
         --stop id was produced; it is the last token), "context" (the context is full)
      with --samples N > 1: {"samples": [{"tokens", "logprobs", "finish_reason"}, ...]} -- one
         prefill, sample i on the stream sample_seed(seed, i), sample 0 = the plain seed
  kiln run ART --prompts-file F --slots N [--packed-prefill] --max-tokens M --json
      -> {"requests": [{"tokens", "logprobs", "finish_reason", "adapter"}, ...] in input order,
          "slots", "packed_prefill", "tokens_per_s", ...}; every request uses --seed (its own
          stream) and the same --stop / --max-tokens
  Bad sampling parameters / stop ids: exit 1, one stderr line `kiln: error: ...` naming them.

Acceptance checked here (issue 5):
  1. batching invariance -- 8 greedy requests (prompt lengths 5..30, plus one near the context
     end that finishes with "context"), --stop ids chosen so the requests finish at different
     steps (slots free and later requests enter at different times): every request's tokens,
     finish reason and log-probs (within 1e-4) are the same alone (--tokens), with --slots 4,
     --slots 1, --slots 4 --packed-prefill and --slots 3 --packed-prefill; the tokens are the
     reference's greedy tokens and the log-probs the reference's log-softmax (within LP_TOL).
     Prompts are chosen so the reference's top-1/top-2 gap is >= 3% of max|logit| at every
     compared step (DeepSeek: expert choices too), so rounding cannot legitimately flip a token.
  2. seeded composite sampling: same tokens alone and batched (plain and packed), on two runs,
     and with the knobs alone (--temperature/--top-k/--top-p imply composite); a different seed
     gives different tokens; the sampled tokens lie in the reference's top-k / top-p set.
  3. --samples 4 --sampling weighted: reproducible, sample 0 = the --samples 1 run, the samples
     differ from each other.
  4. stop tokens and finish reasons (stop vs length vs context, a stop on the prefill's token,
     stop beats length on the same token).
  5. bad parameters: --sampling topk --top-k 0, --sampling nucleus --top-p -0.5, --sampling
     bogus, --stop outside the vocabulary, --sampling weighted --temperature 0.
"""

import math
import os
import shutil
import tempfile
import unittest

import numpy as np

import common
from common import kiln, lr, mf, tokens_arg, log, describe_row

import deepseek_ref as dr  # noqa: E402  (common puts tests/reference on sys.path)
import make_deepseek_fixture as mdf  # noqa: E402

MIN_GAP = common.MIN_GAP
MIN_ROUTE_GAP = 0.03
N_GEN = 16                                   # --max-tokens of the batching tests
LENGTHS = (5, 30, 12, 22, 7, 18, 9)          # prompt lengths of the short requests
LONG_MARGIN = 4                              # the long request's prompt: context - 4 tokens
BATCH_LP_TOL = 1e-4                          # batched vs alone log-probs
LP_TOL = 0.05                                # kiln vs reference log-probs (absolute)
SAMPLING = ["--sampling", "composite", "--top-k", 20, "--top-p", 0.9, "--temperature", 0.8]
TOP_K, TOP_P = 20, 0.9
VALID_ALGOS = ("greedy", "weighted", "topk", "nucleus", "composite")


def log_softmax(rows):
    rows = np.asarray(rows, dtype=np.float64)
    m = rows.max(axis=-1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(axis=-1, keepdims=True))


def expected_finish(greedy, stop, n_max):
    """(tokens, finish_reason) of a greedy request with stop ids `stop` and --max-tokens n_max
    (no context limit)."""
    for k, t in enumerate(greedy[:n_max]):
        if t in stop:
            return greedy[:k + 1], "stop"
    return greedy[:n_max], "length"


class ServingChecks:
    """The tests; mixed into one TestCase per fixture family (VARIANT)."""

    VARIANT = None
    _shared = None  # per class: fixture, artifact, reference model and chosen prompts

    # -- fixture, artifact, reference and prompts (built once per class) -------------------------

    @classmethod
    def _deepseek(cls):
        try:
            mdf.variant_by_name(cls.VARIANT)
            return True
        except KeyError:
            return False

    def shared(self):
        cls = type(self)
        if cls._shared is not None:
            if isinstance(cls._shared, str):
                self.fail(cls._shared)
            return cls._shared
        common.require_kiln(self)
        tmp = tempfile.mkdtemp(prefix="kiln-serving-")
        cls.addClassCleanup(shutil.rmtree, tmp, True)
        ds = cls._deepseek()
        if ds:
            v = mdf.variant_by_name(cls.VARIANT)
            fx = mdf.write_fixture(v, os.path.join(tmp, "fixture"))
            model = mdf.ref_model(fx)
        else:
            v = mf.variant_by_name(cls.VARIANT)
            fx = mf.write_fixture(v, os.path.join(tmp, "fixture"))
            model = lr.RefModel.load(fx.checkpoint_args, fx.config_path, v.set_overrides,
                                     v.scan_axis if v.scanned else None)
        art = os.path.join(tmp, "model.kiln")
        res = kiln("export", *fx.export_args(), "--out", art)
        if res.rc != 0:
            cls._shared = "%s: kiln export failed:\n%s" % (cls.VARIANT, res.describe())
            self.fail(cls._shared)

        # short requests: prompts with clear margins at every position and greedy step
        reqs = []
        for i, length in enumerate(LENGTHS):
            seed = v.seed * 100 + i
            if ds:
                toks, greedy, gap, _, rgap = dr.choose_prompt(
                    model, length, N_GEN, seed=seed, min_gap=MIN_GAP,
                    min_route_gap=MIN_ROUTE_GAP, max_tries=100, context_sensitive=False)
                self.assertGreaterEqual(rgap, MIN_ROUTE_GAP, "fixture problem: no length-%d "
                                        "prompt with clear expert choices" % length)
            else:
                toks, greedy, gap, _ = lr.choose_prompt(model, length, N_GEN, seed=seed,
                                                        min_gap=MIN_GAP, max_tries=100,
                                                        context_sensitive=False)
            self.assertGreaterEqual(gap, MIN_GAP, "fixture problem: no length-%d prompt with "
                                    "clear top-1 margins (best %.4f)" % (length, gap))
            reqs.append({"prompt": toks, "greedy": greedy})

        # the stop ids: 1 or 2 ids making the short requests finish at as many different steps
        # as possible (some by "length")
        cands = sorted({t for r in reqs for t in r["greedy"]})
        best = None
        for a in range(len(cands)):
            for b in range(a, len(cands)):
                stop = {cands[a], cands[b]}
                ends = [expected_finish(r["greedy"], stop, N_GEN) for r in reqs]
                n_stop = sum(f == "stop" for _, f in ends)
                if n_stop < 2 or n_stop == len(reqs):
                    continue
                key = (len({len(t) for t, _ in ends}), -len(stop), n_stop)
                if best is None or key > best[0]:
                    best = (key, sorted(stop))
        self.assertIsNotNone(best, "fixture problem: no stop ids shared by the greedy "
                             "continuations")
        stop = best[1]

        # the long request: finishes with "context" after ctx - P + 1 tokens (or ctx - P); only
        # its last position and generated steps need clear margins
        ctx = v.max_target_length
        P = ctx - LONG_MARGIN
        n_long = LONG_MARGIN + 1
        rng = np.random.default_rng(v.seed + 7)
        for _ in range(200):
            toks = [int(t) for t in rng.integers(0, v.vocab_size, P)]
            greedy, gaps = model.greedy_with_margins(toks, n_long, stop_below=MIN_GAP)
            if len(greedy) == n_long and min(gaps) >= MIN_GAP and not set(greedy) & set(stop):
                break
        else:
            self.fail("fixture problem: no long prompt with clear margins")
        reqs.append({"prompt": toks, "greedy": greedy, "long": True})

        for r in reqs:
            p, g = r["prompt"], r["greedy"]
            r["ref_lp"] = [float(log_softmax(row)[t]) for row, t in
                           zip(model.logits(p + g[:-1])[len(p) - 1:], g)]
            if not r.get("long"):
                r["tokens"], r["finish"] = expected_finish(g, set(stop), N_GEN)
        log("    %-30s stop ids %s; short requests finish after %s tokens" % (
            cls.VARIANT, stop, [len(r["tokens"]) for r in reqs if not r.get("long")]))
        cls._shared = dict(v=v, fx=fx, model=model, art=art, tmp=tmp, reqs=reqs, stop=stop,
                           ctx=ctx)
        return cls._shared

    # -- kiln calls ------------------------------------------------------------------------------

    def run_json(self, *args, what="kiln run"):
        res = kiln("run", *args, "--json")
        self.assertKilnOk(res, what)
        return common.parse_json_stdout(res)

    def run_alone(self, prompt, n, *extra, what="kiln run --tokens"):
        out = self.run_json(self.shared()["art"], "--tokens", tokens_arg(prompt),
                            "--max-tokens", n, *extra, what=what)
        self.check_output(out, what)
        return out

    def run_file(self, prompts, n, slots, *extra, packed=False, what="kiln run --prompts-file"):
        path = os.path.join(self.tmp, "prompts-%d.txt" % len(os.listdir(self.tmp)))
        with open(path, "w") as f:
            for p in prompts:
                f.write(tokens_arg(p) + "\n")
        args = ["--prompts-file", path, "--slots", slots, "--max-tokens", n] + list(extra)
        if packed:
            args.append("--packed-prefill")
        out = self.run_json(self.shared()["art"], *args, what=what)
        self.assertIn("requests", out, "%s: no 'requests': %s" % (what, out))
        self.assertEqual(len(out["requests"]), len(prompts), "%s: %s" % (what, out))
        self.assertEqual(out.get("slots"), slots, "%s: 'slots' %s" % (what, out.get("slots")))
        self.assertIs(out.get("packed_prefill"), packed, "%s: 'packed_prefill' %s"
                      % (what, out.get("packed_prefill")))
        self.assertIn("tokens_per_s", out, what)
        for i, r in enumerate(out["requests"]):
            self.check_output(r, "%s request %d" % (what, i))
            self.assertIn("adapter", r, "%s request %d: %s" % (what, i, r))
            self.assertIsNone(r["adapter"], "%s request %d: %s" % (what, i, r))
        return out

    def check_output(self, o, what):
        for key in ("tokens", "logprobs", "finish_reason"):
            self.assertIn(key, o, "%s: no '%s': %s" % (what, key, o))
        self.assertEqual(len(o["tokens"]), len(o["logprobs"]), "%s: %s" % (what, o))
        self.assertIn(o["finish_reason"], ("length", "stop", "context"), "%s: %s" % (what, o))
        V = self.shared()["v"].vocab_size
        self.assertTrue(all(isinstance(t, int) and 0 <= t < V for t in o["tokens"]),
                        "%s: tokens %s" % (what, o["tokens"]))
        self.assertTrue(all(isinstance(x, (int, float)) and x <= 1e-6 and math.isfinite(x)
                            for x in o["logprobs"]), "%s: logprobs %s" % (what, o["logprobs"]))

    # -- comparisons -----------------------------------------------------------------------------

    def assertSameOutput(self, got, want, what):
        """tokens and finish reason identical, log-probs within BATCH_LP_TOL."""
        self.assertEqual(got["tokens"], want["tokens"], "%s: tokens differ\n  got:  %s\n  want: "
                         "%s" % (what, got["tokens"], want["tokens"]))
        self.assertEqual(got["finish_reason"], want["finish_reason"], what)
        d = np.abs(np.array(got["logprobs"], np.float64) - np.array(want["logprobs"], np.float64))
        self.assertTrue(d.size == 0 or d.max() <= BATCH_LP_TOL, "%s: log-probs differ by %.3g at "
                        "step %d (limit %g)\n  got:  %s\n  want: %s"
                        % (what, d.max(), int(d.argmax()), BATCH_LP_TOL, got["logprobs"],
                           want["logprobs"]))
        return float(d.max()) if d.size else 0.0

    def assertRefLogprobs(self, got, ref, what, tol=LP_TOL):
        d = np.abs(np.array(got, np.float64) - np.array(ref, np.float64))
        self.assertLessEqual(float(d.max()), tol, "%s: log-probs differ from the reference's "
                             "log-softmax by %.4f at step %d (limit %g)\n  kiln: %s\n  ref:  %s"
                             % (what, d.max(), int(d.argmax()), tol, np.round(got, 4).tolist(),
                                np.round(ref, 4).tolist()))
        return float(d.max())

    def assertGreedy(self, got, want, prompt, what):
        if got != want:
            n = min(len(got), len(want))
            i = next((j for j in range(n) if got[j] != want[j]), n)
            detail = ""
            if i < len(want):
                row = self.shared()["model"].logits(list(prompt) + want[:i])[-1]
                detail = " (reference logits there: [%s])" % describe_row(row)
            self.fail("%s: tokens differ from the reference's greedy tokens at step %d%s\n"
                      "  kiln: %s\n  ref:  %s" % (what, i, detail, got, want))

    # -- 1. greedy batching invariance -----------------------------------------------------------

    def test_greedy_batched_equals_alone_and_reference(self):
        sh = self.shared()
        reqs, stop, ctx = sh["reqs"], sh["stop"], sh["ctx"]
        stop_arg = ["--stop", tokens_arg(stop)]
        prompts = [r["prompt"] for r in reqs]
        alone = []
        worst_ref = 0.0
        for i, r in enumerate(reqs):
            what = "request %d alone (P=%d)" % (i, len(r["prompt"]))
            o = self.run_alone(r["prompt"], N_GEN, *stop_arg, what=what)
            self.assertEqual(o.get("sampling"), "greedy", "%s: %s" % (what, o))
            toks = o["tokens"]
            if r.get("long"):
                P = len(r["prompt"])
                self.assertEqual(o["finish_reason"], "context", "%s (context %d, --max-tokens "
                                 "%d): %s" % (what, ctx, N_GEN, o))
                self.assertIn(len(toks), (ctx - P, ctx - P + 1), "%s: %d tokens before the "
                              "context (%d) is full" % (what, len(toks), ctx))
                want = r["greedy"][:len(toks)]
            else:
                want = r["tokens"]
                self.assertEqual(o["finish_reason"], r["finish"], "%s: %s (stop ids %s, "
                                 "reference greedy %s)" % (what, o, stop, r["greedy"]))
            self.assertGreedy(toks, want, r["prompt"], what)
            worst_ref = max(worst_ref, self.assertRefLogprobs(
                o["logprobs"], r["ref_lp"][:len(toks)], what))
            alone.append(o)
        long_n = len(alone[-1]["tokens"])
        modes = [("--slots 4", 4, False), ("--slots 1", 1, False),
                 ("--slots 4 --packed-prefill", 4, True), ("--slots 3 --packed-prefill", 3, True)]
        worst = 0.0
        for name, slots, packed in modes:
            out = self.run_file(prompts, N_GEN, slots, *stop_arg, packed=packed,
                                what="kiln run --prompts-file " + name)
            self.assertEqual(out.get("sampling"), "greedy", out)
            for i, (row, a) in enumerate(zip(out["requests"], alone)):
                worst = max(worst, self.assertSameOutput(
                    row, a, "%s: request %d (P=%d) batched vs alone" % (name, i,
                                                                        len(prompts[i]))))
        log("    %-30s %d requests (finish after %s tokens) identical alone / %s; max "
            "|dlogp| batched vs alone %.2g, vs reference %.4f; context finish after %d tokens "
            "(P=%d, context %d)" % (self.VARIANT, len(reqs),
                                    [len(a["tokens"]) for a in alone],
                                    " / ".join(m[0] for m in modes), worst, worst_ref,
                                    long_n, ctx - LONG_MARGIN, ctx))

    # -- 2. seeded sampling ----------------------------------------------------------------------

    def golden_rows(self, prompt, toks):
        """kiln's own prefill logits (Engine.logits = golden dump) of prompt + toks[:-1] at the
        rows that produced toks."""
        seq = list(prompt) + list(toks[:-1])
        logits = common.engine_logits(self, self.shared()["art"], seq)
        return logits[len(prompt) - 1:].astype(np.float64)

    def check_sampled(self, prompt, o, what, composite=True):
        """A sampled request: each log-prob is the log-softmax of kiln's raw logits (its own
        prefill of the sequence, `golden dump`; decode and prefill agree to ~1e-6) at the token --
        not of tempered or filtered logits -- and within 2 * REL_TOL * max|logit| of the
        reference's (the logit criterion of the family suites; sampled tokens are often not the
        top-1, so the log-prob error is not small as for clear greedy tokens). With `composite`,
        each token lies in the top-k / top-p set of kiln's logits."""
        toks = o["tokens"]
        rows = self.golden_rows(prompt, toks)
        idx = np.arange(len(toks))
        own = log_softmax(rows)[idx, toks]
        d = np.abs(np.array(o["logprobs"], np.float64) - own)
        self.assertLessEqual(float(d.max()), BATCH_LP_TOL, "%s: log-probs are not the "
                             "log-softmax of the raw logits (off by %.4g at step %d)\n  kiln run:"
                             "    %s\n  golden dump: %s" % (what, d.max(), int(d.argmax()),
                                                            np.round(o["logprobs"], 4).tolist(),
                                                            np.round(own, 4).tolist()))
        if composite:
            for j, (row, t) in enumerate(zip(rows, toks)):
                srt = np.sort(row)[::-1]
                self.assertGreaterEqual(row[t], srt[TOP_K - 1], "%s step %d: token %d is not "
                                        "among the top %d [%s]"
                                        % (what, j, t, TOP_K, describe_row(row, TOP_K)))
                top = srt[:TOP_K]
                p = np.exp(top - top[0])
                p /= p.sum()
                above = float(p[top > row[t]].sum())
                self.assertLess(above, TOP_P + 1e-4, "%s step %d: token %d has %.4f of the "
                                "top-%d mass ranked above it (top-p %.2f)"
                                % (what, j, t, above, TOP_K, TOP_P))
        ref = self.shared()["model"].logits(list(prompt) + toks[:-1])[len(prompt) - 1:]
        ref_lp = log_softmax(ref)[idx, toks]
        tol = 2 * common.REL_TOL * np.abs(ref).max(axis=-1)
        dr_ = np.abs(np.array(o["logprobs"], np.float64) - ref_lp)
        bad = np.nonzero(dr_ > tol)[0]
        self.assertEqual(len(bad), 0, "%s: log-probs differ from the reference's log-softmax "
                         "by more than 2 * %.2f * max|logit| at steps %s\n  kiln: %s\n  ref:  %s"
                         % (what, common.REL_TOL, bad.tolist(),
                            np.round(o["logprobs"], 4).tolist(), np.round(ref_lp, 4).tolist()))
        return float(dr_.max())

    def test_seeded_sampling_batched_equals_alone(self):
        sh = self.shared()
        reqs = [r for r in sh["reqs"] if not r.get("long")]
        prompts = [r["prompt"] for r in reqs]
        seed = ["--seed", 11]
        alone = []
        worst_ref = 0.0
        for i, p in enumerate(prompts):
            what = "request %d alone, composite seed 11" % i
            o = self.run_alone(p, N_GEN, *SAMPLING, *seed, what=what)
            self.assertEqual(o.get("sampling"), "composite", "%s: %s" % (what, o))
            self.assertEqual(o["finish_reason"], "length", "%s: %s" % (what, o))
            self.assertEqual(len(o["tokens"]), N_GEN, "%s: %s" % (what, o))
            worst_ref = max(worst_ref, self.check_sampled(p, o, what))
            alone.append(o)
        # again, and with the knobs alone (temperature > 0, top-k and top-p < 1 -> composite)
        again = self.run_alone(prompts[0], N_GEN, *SAMPLING, *seed, what="second run")
        self.assertSameOutput(again, alone[0], "request 0 alone, second run")
        implied = self.run_alone(prompts[0], N_GEN, *SAMPLING[2:], *seed,
                                 what="--temperature/--top-k/--top-p without --sampling")
        self.assertEqual(implied.get("sampling"), "composite", implied)
        self.assertSameOutput(implied, alone[0], "request 0, sampling implied by the knobs")

        runs = {}
        for name, slots, packed in (("--slots 4", 4, False), ("--slots 4 (second run)", 4, False),
                                    ("--slots 3 --packed-prefill", 3, True)):
            out = self.run_file(prompts, N_GEN, slots, *SAMPLING, *seed, packed=packed,
                                what="kiln run --prompts-file %s, composite seed 11" % name)
            self.assertEqual(out.get("sampling"), "composite", out)
            for i, (row, a) in enumerate(zip(out["requests"], alone)):
                self.assertSameOutput(row, a, "%s: request %d batched vs alone (seed 11)"
                                      % (name, i))
            runs[name] = out
        other = self.run_file(prompts, N_GEN, 4, *SAMPLING, "--seed", 12,
                              what="kiln run --prompts-file, composite seed 12")
        changed = [i for i, (row, a) in enumerate(zip(other["requests"], alone))
                   if row["tokens"] != a["tokens"]]
        self.assertTrue(changed, "seed 12 gives the same tokens as seed 11 for all %d requests"
                        % len(prompts))
        for i in changed[:2]:
            self.check_sampled(prompts[i], other["requests"][i], "request %d, seed 12" % i)
        greedy_same = sum(a["tokens"] == r["greedy"] for a, r in zip(alone, reqs))
        self.assertLess(greedy_same, len(reqs), "composite sampling at temperature 0.8 gave "
                        "the greedy tokens for every request")
        log("    %-30s composite seed 11: %d requests identical alone / batched / packed / "
            "rerun; seed 12 changes %d of them; %d equal greedy; max |dlogp| vs reference %.4f"
            % (self.VARIANT, len(prompts), len(changed), greedy_same, worst_ref))

    # -- 3. multi-sampling -----------------------------------------------------------------------

    def test_multisampling(self):
        sh = self.shared()
        # the short prompt with the flattest first-token distribution
        model = sh["model"]
        prompts = [r["prompt"] for r in sh["reqs"] if not r.get("long")]
        ent = []
        for p in prompts:
            lp = log_softmax(model.logits(p)[-1] / 2.0)
            ent.append(float(-(np.exp(lp) * lp).sum()))
        prompt = prompts[int(np.argmax(ent))]
        args = ["--sampling", "weighted", "--temperature", 2.0, "--seed", 3]
        res = []
        for k in range(2):
            out = self.run_json(sh["art"], "--tokens", tokens_arg(prompt), "--max-tokens", N_GEN,
                                "--samples", 4, *args, what="--samples 4 run %d" % (k + 1))
            self.assertIn("samples", out, out)
            self.assertEqual(len(out["samples"]), 4, out)
            self.assertEqual(out.get("sampling"), "weighted", out)
            for i, s in enumerate(out["samples"]):
                self.check_output(s, "--samples 4 sample %d" % i)
                self.assertEqual(len(s["tokens"]), N_GEN, "sample %d: %s" % (i, s))
                self.assertEqual(s["finish_reason"], "length", "sample %d: %s" % (i, s))
            res.append(out["samples"])
        for i, (a, b) in enumerate(zip(*res)):
            self.assertEqual(a["tokens"], b["tokens"], "sample %d differs between two runs" % i)
            self.assertEqual(a["logprobs"], b["logprobs"], "sample %d log-probs differ between "
                             "two runs" % i)
        samples = res[0]
        distinct = {tuple(s["tokens"]) for s in samples}
        self.assertGreater(len(distinct), 1, "the 4 samples are identical (temperature 2.0): %s"
                           % samples[0]["tokens"])
        # one prefill: equal first tokens have bit-identical first log-probs
        firsts = {}
        for s in samples:
            firsts.setdefault(s["tokens"][0], set()).add(s["logprobs"][0])
        self.assertTrue(all(len(v) == 1 for v in firsts.values()), "first log-probs of one "
                        "prefill differ for the same token: %s" % firsts)
        one = self.run_alone(prompt, N_GEN, *args, what="--samples 1, weighted seed 3")
        self.assertSameOutput(samples[0], one, "--samples 4 sample 0 vs the --samples 1 run")
        one_flag = self.run_alone(prompt, N_GEN, *args, "--samples", 1, what="explicit --samples 1")
        self.assertSameOutput(one_flag, one, "explicit --samples 1 vs the default")
        worst = 0.0
        for i, s in enumerate(samples):
            worst = max(worst, self.check_sampled(prompt, s, "sample %d" % i, composite=False))
        # --stop ends each sample on its own, on the same stream: every sample is its no-stop
        # tokens cut after the first stop id
        counts = {}
        for s in samples:
            for t in set(s["tokens"][1:]):
                counts[t] = counts.get(t, 0) + 1
        x = max(counts, key=lambda t: (0 < counts[t] < 4, counts[t], -t))
        out = self.run_json(sh["art"], "--tokens", tokens_arg(prompt), "--max-tokens", N_GEN,
                            "--samples", 4, *args, "--stop", x, what="--samples 4 --stop")
        self.assertEqual(len(out.get("samples", [])), 4, out)
        for i, (s, full) in enumerate(zip(out["samples"], samples)):
            k = full["tokens"].index(x) + 1 if x in full["tokens"] else N_GEN
            want = {"tokens": full["tokens"][:k], "logprobs": full["logprobs"][:k],
                    "finish_reason": "stop" if x in full["tokens"] else "length"}
            self.assertSameOutput(s, want, "--samples 4 --stop %d: sample %d vs the no-stop "
                                  "sample cut at the stop id" % (x, i))
        log("    %-30s --samples 4 (weighted T=2, seed 3): %d distinct samples, reproducible, "
            "sample 0 = --samples 1, --stop %d ends them after %s tokens; max |dlogp| vs "
            "reference %.4f" % (self.VARIANT, len(distinct), x,
                                [len(s["tokens"]) for s in out["samples"]], worst))

    # -- 4. stop tokens and finish reasons -------------------------------------------------------

    def test_stop_tokens_and_finish_reasons(self):
        sh = self.shared()
        V, ctx = sh["v"].vocab_size, sh["ctx"]
        r = next((r for r in sh["reqs"] if not r.get("long")
                  and len(set(r["greedy"][:3])) == 3), None)
        self.assertIsNotNone(r, "fixture problem: no prompt whose first 3 greedy tokens differ")
        prompt, g = r["prompt"], r["greedy"]
        x = g[2]
        plain = self.run_alone(prompt, N_GEN, what="no --stop")
        self.assertEqual(plain["finish_reason"], "length", plain)
        self.assertEqual(plain["tokens"], g, "no --stop: %s vs reference %s"
                         % (plain["tokens"], g))
        o = self.run_alone(prompt, N_GEN, "--stop", x, what="--stop <3rd greedy token>")
        self.assertEqual(o["tokens"], g[:3], "--stop %d: %s (reference greedy %s)"
                         % (x, o["tokens"], g))
        self.assertEqual(o["finish_reason"], "stop", o)
        self.assertEqual(o["logprobs"], plain["logprobs"][:3], "--stop changed the log-probs")
        absent = next(t for t in range(V) if t not in g)
        o2 = self.run_alone(prompt, N_GEN, "--stop", "%d,%d" % (absent, x),
                            what="--stop <absent>,<3rd>")
        self.assertSameOutput(o2, o, "--stop with two ids")
        o3 = self.run_alone(prompt, 3, "--stop", x, what="--stop x --max-tokens 3")
        self.assertEqual(o3["tokens"], g[:3], o3)
        self.assertEqual(o3["finish_reason"], "stop", "a stop token that is also the last "
                         "allowed one must report 'stop': %s" % o3)
        o4 = self.run_alone(prompt, N_GEN, "--stop", g[0], what="--stop <prefill's token>")
        self.assertEqual(o4["tokens"], g[:1], o4)
        self.assertEqual(o4["finish_reason"], "stop", o4)
        o5 = self.run_alone(prompt, 1, what="--max-tokens 1")
        self.assertEqual(o5["tokens"], g[:1], o5)
        self.assertEqual(o5["finish_reason"], "length", o5)
        o6 = self.run_alone(prompt, 2, what="--max-tokens 2")
        self.assertEqual(o6["tokens"], g[:2], o6)
        self.assertEqual(o6["finish_reason"], "length", o6)
        # a prompt filling the whole context: the prefill's token only
        full = [int(t) for t in np.random.default_rng(5).integers(0, V, ctx)]
        o7 = self.run_alone(full, N_GEN, what="prompt of context length")
        self.assertEqual(len(o7["tokens"]), 1, o7)
        self.assertEqual(o7["finish_reason"], "context", o7)
        # the same in a batch: each request stops on its own
        out = self.run_file([prompt, full, prompt], N_GEN, 2, "--stop", x,
                            what="--prompts-file --stop")
        for i, want in enumerate((o, o7, o)):
            self.assertSameOutput(out["requests"][i], want, "batched request %d with --stop" % i)
        log("    %-30s --stop %d ends after %d tokens ('stop'); without it %d tokens "
            "('length'); a %d-token prompt gives 1 token ('context')"
            % (self.VARIANT, x, len(o["tokens"]), len(plain["tokens"]), ctx))

    # -- 5. bad parameters -----------------------------------------------------------------------

    def assertBadParam(self, args, names, rcs=(1,), tokens=None):
        sh = self.shared()
        toks = tokens_arg(sh["reqs"][0]["prompt"] if tokens is None else tokens)
        res = kiln("run", sh["art"], "--tokens", toks, "--max-tokens", 4, *args, "--json")
        what = " ".join(str(a) for a in args)
        self.assertIn(res.rc, rcs, "%s: expected exit %s:\n%s" % (what, " or ".join(
            str(c) for c in rcs), res.describe()))
        lines = res.stderr_lines
        self.assertEqual(len(lines), 1, "%s: expected one stderr line:\n%s"
                         % (what, res.describe()))
        self.assertTrue(lines[0].startswith("kiln: error: "), "%s: message must start with "
                        "'kiln: error: ':\n%s" % (what, res.describe()))
        low = lines[0].lower().replace("_", "-")
        for n in names:
            alts = n if isinstance(n, tuple) else (n,)
            self.assertTrue(any(a in low for a in alts), "%s: message must name %s:\n%s"
                            % (what, " or ".join(alts), res.describe()))
        self.assertEqual(res.stdout.strip(), "", "%s: printed output despite the error" % what)
        return lines[0]

    def test_bad_sampling_parameters(self):
        sh = self.shared()
        g0 = sh["reqs"][0]["greedy"][0]
        cases = [  # (args, words the message must contain, accepted exit codes)
            (["--sampling", "topk", "--top-k", 0], ["top-k"], (1,)),
            (["--sampling", "nucleus", "--top-p", -0.5], ["top-p"], (1,)),
            (["--sampling", "bogus"], ["bogus"] + list(VALID_ALGOS), (1, 2)),
            (["--stop", 999999], ["stop"], (1,)),
            (["--stop", "%d,999999" % g0], ["stop"], (1,)),
            (["--sampling", "weighted", "--temperature", 0], ["temperature"], (1,)),
            (["--sampling", "composite", "--top-k", 0, "--top-p", 0.5], ["top-k"], (1,)),
            # the multi-sample entry point checks the same
            (["--samples", 2, "--stop", 999999], ["stop"], (1,)),
            (["--samples", 2, "--sampling", "topk", "--top-k", 0], ["top-k"], (1,)),
        ]
        for args, names, rcs in cases:
            with self.subTest(args=" ".join(str(x) for x in args)):
                msg = self.assertBadParam(args, names, rcs)
                log("    %-30s %s" % (self.VARIANT, msg))
        # and the prompts-file entry point (plain and packed prefill)
        path = os.path.join(self.tmp, "p.txt")
        with open(path, "w") as f:
            f.write("1,2,3\n4,5\n")
        for args, names in ((["--sampling", "topk", "--top-k", 0], ["top-k"]),
                            (["--stop", 999999], ["stop"]),
                            (["--stop", 999999, "--packed-prefill"], ["stop"])):
            with self.subTest(args="--prompts-file " + " ".join(str(x) for x in args)):
                res = kiln("run", sh["art"], "--prompts-file", path, "--slots", 2, *args,
                           "--json")
                self.assertEqual(res.rc, 1, res.describe())
                self.assertEqual(len(res.stderr_lines), 1, res.describe())
                self.assertTrue(res.stderr_lines[0].startswith("kiln: error: "), res.describe())
                for n in names:
                    self.assertIn(n, res.stderr_lines[0].lower().replace("_", "-"),
                                  res.describe())
                self.assertEqual(res.stdout.strip(), "", res.describe())


class LlamaServingTest(ServingChecks, common.TempDirCase):
    VARIANT = "linen-scan1-f32"


class DeepSeekServingTest(ServingChecks, common.TempDirCase):
    VARIANT = "ds3-linen-scan1-f32"


if __name__ == "__main__":
    unittest.main()
