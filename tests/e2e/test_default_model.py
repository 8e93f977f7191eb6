#!/usr/bin/python3
"""The shipped default model (models/default, trained by tools/train_default.py): perplexity of
the engine against the training script's own figure and the numpy reference, for the base, the
merged adapter and the run-time adapter; the tokenizer round trip; text in, text out."""

import json
import os
import subprocess
import sys
import unittest

import common
from common import kiln

MODEL = os.path.join(common.REPO, "models", "default")
PPL_REF = os.path.join(common.REF_DIR, "perplexity_ref.py")
TOL = 0.01  # the 1 %


def numpy_perplexity(*extra):
    out = subprocess.run([sys.executable, PPL_REF, MODEL, "--json"] + list(extra),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600, check=True)
    return json.loads(out.stdout)["perplexity"]


class DefaultModelTest(common.TempDirCase):
    @classmethod
    def setUpClass(cls):
        cls.ref = json.load(open(os.path.join(MODEL, "reference.json")))
        cls.tmpdir = common.tempfile.mkdtemp(prefix="kiln-default-")
        base = ["--checkpoint", os.path.join(MODEL, "model.safetensors"),
                "--config", os.path.join(MODEL, "config.yml")]
        tok = ["--tokenizer", os.path.join(MODEL, "tokenizer.model")]
        ad = ["--lora", os.path.join(MODEL, "adapter")]
        cls.art = os.path.join(cls.tmpdir, "base.kiln")
        cls.merged = os.path.join(cls.tmpdir, "merged.kiln")
        cls.clipped = os.path.join(cls.tmpdir, "clipped.kiln")
        cls.notok = os.path.join(cls.tmpdir, "notok.kiln")
        cls.exports = [
            kiln("export", *base, *tok, *ad, "--lora-name", "style", "--out", cls.art),
            kiln("export", *base, *tok, *ad, "--merge-lora", "--out", cls.merged),
            kiln("export", *base, *tok, "--qk-clip-threshold", 10, "--qk-clip-calibrate",
                 os.path.join(MODEL, "calibration.txt"), "--out", cls.clipped),
            kiln("export", *base, "--out", cls.notok)]

    @classmethod
    def tearDownClass(cls):
        common.shutil.rmtree(cls.tmpdir, ignore_errors=True)

    def setUp(self):
        super().setUp()
        for res in self.exports:
            self.assertKilnOk(res, "export")

    def eval_ppl(self, art, *extra):
        res = kiln("eval", art, "--text-file", os.path.join(MODEL, "heldout.txt"), "--json",
                   *extra, timeout=600)
        self.assertKilnOk(res, "eval")
        j = common.parse_json_stdout(res)
        self.assertEqual(j["predicted_tokens"], self.ref["heldout"]["predicted_tokens"], j)
        return j["perplexity"]

    def check(self, name, engine, numpy_ppl):
        trained = self.ref["perplexity"][name]
        common.log("    %-13s kiln %.4f  training script %.4f  numpy %.4f" %
                   (name, engine, trained, numpy_ppl))
        self.assertLess(abs(engine / trained - 1), TOL)
        self.assertLess(abs(engine / numpy_ppl - 1), TOL)

    def test_perplexity_base(self):
        self.check("base", self.eval_ppl(self.art), numpy_perplexity())

    def test_perplexity_merged_adapter(self):
        self.check("lora_merged", self.eval_ppl(self.merged),
                   numpy_perplexity("--adapter", os.path.join(MODEL, "adapter"), "--mode",
                                    "merged"))

    def test_perplexity_runtime_adapter(self):
        self.check("lora_runtime", self.eval_ppl(self.art, "--adapter", "style"),
                   numpy_perplexity("--adapter", os.path.join(MODEL, "adapter"), "--mode",
                                    "runtime"))

    def test_perplexity_with_qk_clip_is_reported(self):
        base, clipped = self.eval_ppl(self.art), self.eval_ppl(self.clipped)
        common.log("    QK-Clip (tau 10, calibrated): perplexity %.4f -> %.4f (%+.2f%%)" %
                   (base, clipped, 100 * (clipped / base - 1)))
        self.assertLess(abs(clipped / base - 1), 0.5)

    def test_tokenizer_round_trip(self):
        text = os.path.join(MODEL, "heldout.txt")
        ids = os.path.join(MODEL, "heldout.tokens")
        enc = kiln("tokenize", self.art, "--text-file", text)
        self.assertKilnOk(enc)
        want_ids = [ln for ln in open(ids).read().splitlines() if ln.strip()]
        self.assertEqual(enc.stdout.splitlines(), want_ids)
        dec = kiln("tokenize", self.art, "--decode", "--tokens-file", ids)
        self.assertKilnOk(dec)
        lines = [ln for ln in open(text, encoding="utf-8").read().splitlines() if ln]
        self.assertEqual(dec.stdout.splitlines(), lines)

    def test_text_in_text_out_and_adapter_changes_it(self):
        prompt = "And the LORD said unto"
        base = kiln("run", self.art, "--prompt", prompt, "--max-tokens", 40, "--json")
        styled = kiln("run", self.art, "--prompt", prompt, "--max-tokens", 40, "--adapter",
                      "style", "--json")
        self.assertKilnOk(base)
        self.assertKilnOk(styled)
        tb, ts = common.parse_json_stdout(base)["text"], common.parse_json_stdout(styled)["text"]
        common.log("    base:  %s\n    style: %s" % (tb, ts))
        corpus = set(open(os.path.join(MODEL, "heldout.txt")).read().split())
        words = tb.replace(",", " ").replace(".", " ").replace(":", " ").replace(";", " ").split()
        self.assertTrue(words and all(w.isalpha() for w in words), tb)
        self.assertNotEqual(tb, ts)
        self.assertTrue(corpus)

    def test_artifact_without_tokenizer_refuses_text_and_takes_ids(self):
        res = kiln("run", self.notok, "--prompt", "In the beginning", "--max-tokens", 2)
        self.assertEqual(res.rc, 1, res.describe())
        self.assertIn("no tokenizer", res.stderr_lines[0])
        self.assertEqual(len(res.stderr_lines), 1, res.describe())
        self.assertKilnOk(kiln("run", self.notok, "--tokens", "1,20,30", "--max-tokens", 2))

    def test_bad_tokenizer_inputs_are_one_line_errors(self):
        out = os.path.join(self.tmpdir, "bad.kiln")
        base = ["--checkpoint", os.path.join(MODEL, "model.safetensors"),
                "--config", os.path.join(MODEL, "config.yml"), "--out", out]
        not_spm = os.path.join(MODEL, "heldout.txt")
        res = kiln("export", *base, "--tokenizer", not_spm)
        self.assertEqual(res.rc, 1, res.describe())
        self.assertIn(not_spm + ": not a SentencePiece model", res.stderr_lines[0])
        self.assertFalse(os.path.exists(out))
        res = kiln("tokenize", self.notok, "--text-file", not_spm)
        self.assertEqual(res.rc, 1, res.describe())
        self.assertIn("has no tokenizer", res.stderr_lines[0])
        bad_ids = os.path.join(self.tmpdir, "bad.tokens")
        with open(bad_ids, "w") as f:
            f.write("5,6\n7,99999\n")
        res = kiln("tokenize", self.art, "--decode", "--tokens-file", bad_ids)
        self.assertEqual(res.rc, 1, res.describe())
        self.assertIn(bad_ids + ":2: token 99999 is outside", res.stderr_lines[0])

    def test_tokenizer_with_more_pieces_than_the_vocabulary_is_a_one_line_error(self):
        # A real checkpoint of the wrong vocabulary fails the embedding's shape check first; this
        # fixture's embedding matches its own small vocab_size, so only the tokenizer is wrong.
        fx = common.mf.write_fixture(common.mf.BASE.replace(name="small-vocab", vocab_size=512),
                                     os.path.join(self.tmp, "fixture"))
        outparent = os.path.join(self.tmp, "out")
        os.makedirs(outparent)
        out = os.path.join(outparent, "small.kiln")
        spm = os.path.join(MODEL, "tokenizer.model")
        res = kiln("export", *fx.export_args(), "--tokenizer", spm, "--out", out)
        self.assertEqual(res.rc, 1, res.describe())
        self.assertEqual(len(res.stderr_lines), 1, res.describe())
        self.assertIn(spm + ": the tokenizer has 4096 pieces", res.stderr_lines[0])
        self.assertIn("vocab_size is 512", res.stderr_lines[0])
        self.assertFalse(os.path.exists(out))
        self.assertEqual(os.listdir(outparent), [])


if __name__ == "__main__":
    unittest.main()
