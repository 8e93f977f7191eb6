"""`kiln export --weights-layout blocked`: the matrices stored in the engine's BA16a64b2a layout.

The same checkpoint exported row-major and blocked must give bit-identical logits and greedy
tokens, with the weights re-laid or used in place, for Llama (untied head) and DeepSeek (stacked
experts, MLA's wkv_b left row-major); `inspect` shows the layout; the provenance records the
option; a bad value is a usage error; a damaged blocked tensor is refused at open.
"""
import os
import unittest

import numpy as np

import common
from common import kiln, tokens_arg

import make_deepseek_fixture as mdf  # noqa: E402  (common puts tests/reference on sys.path)
import make_fixture as mf  # noqa: E402


class WeightsLayoutTest(common.TempDirCase):

    def export_both(self, fx):
        arts = {}
        for layout in ("row-major", "blocked", None):
            name = layout or "default"
            art = os.path.join(self.tmp, name + ".kiln")
            extra = ("--weights-layout", layout) if layout else ()
            self.assertKilnOk(kiln("export", *fx.export_args(), "--out", art, *extra),
                              "export " + name)
            arts[name] = art
        # The default is the blocked layout: the same blobs as asking for it.
        for f in sorted(os.listdir(arts["blocked"])):
            if f.endswith(".kblob"):
                with open(os.path.join(arts["blocked"], f), "rb") as a, \
                        open(os.path.join(arts["default"], f), "rb") as b:
                    self.assertEqual(a.read(), b.read(), "default export differs from blocked: " + f)
        return arts

    def check_same_model(self, arts, vocab, blocked_names, row_major_names=()):
        info = common.parse_json_stdout(kiln("inspect", arts["blocked"], "--json"))
        layouts = {t["name"]: t["layout"] for b in info["blobs"] for t in b["tensors"]}
        for name in blocked_names:
            self.assertEqual(layouts[name], "BA16a64b2a", name)
        for name in row_major_names:
            self.assertEqual(layouts[name], "row-major", name)
        self.assertGreater(info["blocked_tensors"], 0)
        self.assertIn("--weights-layout blocked", info["provenance"]["options"])
        plain = common.parse_json_stdout(kiln("inspect", arts["row-major"], "--json"))
        self.assertEqual(plain["blocked_tensors"], 0)
        self.assertEqual(plain["parameters"], info["parameters"])
        self.assertIn("BA16a64b2a", kiln("inspect", arts["blocked"], "--tensors").stdout)

        prompt = [int(t) for t in np.random.default_rng(5).integers(0, vocab, 12)]
        want = common.engine_logits(self, arts["row-major"], prompt, what="row-major")
        got = common.engine_logits(self, arts["blocked"], prompt, what="blocked")
        self.assertTrue(np.array_equal(want, got), "blocked logits differ from row-major: "
                        "max |d| %g" % np.abs(want - got).max())
        runs = {}
        for layout, art in arts.items():
            for extra in ((), ("--no-relayout",)):
                res = kiln("run", art, "--tokens", tokens_arg(prompt), "--max-tokens", 6,
                           "--json", *extra)
                self.assertKilnOk(res, "run %s %s" % (layout, extra))
                runs[(layout, extra)] = common.parse_json_stdout(res)["tokens"]
        self.assertEqual(len(set(map(tuple, runs.values()))), 1, runs)

    def test_llama_untied(self):
        common.require_kiln(self)
        fx = mf.write_fixture(mf.variant_by_name("linen-scan1-f32"), os.path.join(self.tmp, "fx"))
        arts = self.export_both(fx)
        self.check_same_model(arts, 256, ["attn.q", "attn.o", "mlp.wo", "logits_dense"],
                              ["pre_attn_norm", "token_embedding"])

    def test_deepseek_experts_and_mla(self):
        common.require_kiln(self)
        fx = mdf.write_fixture(mdf.variant_by_name("ds3-linen-scan1-f32"),
                               os.path.join(self.tmp, "fx"))
        arts = self.export_both(fx)
        self.check_same_model(arts, 256, ["moe.experts.wi_0", "moe.experts.wo", "attn.wkv_a", "attn.o"],
                              ["attn.wkv_b"])

    def test_bad_value_is_a_usage_error(self):
        common.require_kiln(self)
        fx = mf.write_fixture(mf.variant_by_name("linen-scan1-f32"), os.path.join(self.tmp, "fx"))
        out = os.path.join(self.tmp, "bad.kiln")
        res = kiln("export", *fx.export_args(), "--out", out, "--weights-layout", "tiled")
        self.assertEqual(res.rc, 2, res.describe())
        self.assertEqual(len(res.stderr_lines), 1, res.describe())
        self.assertIn("row-major or blocked", res.stderr_lines[0])
        self.assertFalse(os.path.exists(out))

    def assert_run_refused(self, art, layout, tensor):
        """`kiln run` of the damaged artifact fails on the tensor's checksum, re-laid or not."""
        for extra in ((), ("--no-relayout",)):
            res = kiln("run", art, "--tokens", "1,2,3", "--max-tokens", 1, *extra)
            self.assertEqual(res.rc, 1, layout + "\n" + res.describe())
            self.assertIn("CRC-32C", res.stderr_lines[0], res.describe())
            self.assertIn(tensor, res.stderr_lines[0], res.describe())

    def test_damaged_matrix_is_refused_in_either_layout(self):
        # Blocked: checked in place; row-major: its CRC computed by the re-layout pass (or checked
        # on its own with --no-relayout). Either way a flipped byte stops the run.
        common.require_kiln(self)
        fx = mf.write_fixture(mf.variant_by_name("linen-scan1-f32"), os.path.join(self.tmp, "fx"))
        for layout, stored in (("blocked", "BA16a64b2a"), ("row-major", "row-major")):
            art = os.path.join(self.tmp, layout + ".kiln")
            self.assertKilnOk(kiln("export", *fx.export_args(), "--out", art,
                                   "--weights-layout", layout))
            info = common.parse_json_stdout(kiln("inspect", art, "--json"))
            blob = info["blobs"][1]
            t = next(t for t in blob["tensors"] if t["name"] == "mlp.wi_0")
            self.assertEqual(t["layout"], stored)
            # A byte in the middle of the tensor.
            common.flip_byte(os.path.join(art, blob["file"]), t["offset"] + t["bytes"] // 2, 0x10)
            self.assert_run_refused(art, layout, "mlp.wi_0")

    def test_damaged_expert_is_refused_in_either_layout(self):
        # The stacked experts are one tensor read as X Linears (Model::checked_stacked_linears):
        # a byte of the last expert's slice must still fail the tensor's check.
        common.require_kiln(self)
        fx = mdf.write_fixture(mdf.variant_by_name("ds3-linen-scan1-f32"),
                               os.path.join(self.tmp, "fx"))
        for layout in ("row-major", "blocked"):
            art = os.path.join(self.tmp, layout + ".kiln")
            self.assertKilnOk(kiln("export", *fx.export_args(), "--out", art,
                                   "--weights-layout", layout))
            info = common.parse_json_stdout(kiln("inspect", art, "--json"))
            blob = next(b for b in info["blobs"]
                        if any(t["name"] == "moe.experts.wo" for t in b["tensors"]))
            t = next(t for t in blob["tensors"] if t["name"] == "moe.experts.wo")
            at = t["offset"] + t["bytes"] - 2 * 64 * 32  # near the end: the last experts
            common.flip_byte(os.path.join(art, blob["file"]), at, 0x10)
            self.assert_run_refused(art, layout, "moe.experts.wo")


if __name__ == "__main__":
    unittest.main()
