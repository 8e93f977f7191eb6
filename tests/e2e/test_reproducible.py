#!/usr/bin/python3
"""Reproducible artifacts (issue 12): with SOURCE_DATE_EPOCH set, two exports of the same inputs
and options -- to different output directories, by different processes -- are byte-identical,
file by file; so are two `kiln adapter add` of the same adapter. The recorded creation time is
SOURCE_DATE_EPOCH's; a malformed value is one error line naming the variable."""

import os
import unittest

import common
from common import kiln, mf

DEFAULT = os.path.join(common.REPO, "models", "default")
EPOCH = "1700000000"
EPOCH_UTC = "2023-11-14T22:13:20Z"


def tree(path):
    """{relative path: bytes} of every file below `path` (and the directories, as None)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path) + "/"] = None
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


class ReproducibleTest(common.TempDirCase):
    def setUp(self):
        super().setUp()
        common.require_kiln(self)
        self.set_epoch(EPOCH)

    def set_epoch(self, value):
        old = os.environ.get("SOURCE_DATE_EPOCH")
        if value is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = value

        def restore():
            if old is None:
                os.environ.pop("SOURCE_DATE_EPOCH", None)
            else:
                os.environ["SOURCE_DATE_EPOCH"] = old
        self.addCleanup(restore)

    def export(self, name, *args):
        out = os.path.join(self.tmp, name)
        res = kiln("export", *args, "--out", out)
        self.assertKilnOk(res, "export " + name)
        return out

    def assertSameTree(self, a, b):
        ta, tb = tree(a), tree(b)
        self.assertEqual(sorted(ta), sorted(tb), "the two artifacts hold different files")
        differ = [f for f in sorted(ta) if ta[f] != tb[f]]
        self.assertEqual(differ, [], "files differ between two exports of the same inputs")
        common.log("    %-44s %d files, %d bytes identical" % (
            self._testMethodName, len(ta), sum(len(v) for v in ta.values() if v)))

    def provenance(self, art):
        res = kiln("inspect", art, "--json")
        self.assertKilnOk(res, "inspect --json")
        return common.parse_json_stdout(res)

    def test_deepseek_default_model_with_adapter_tokenizer_and_qk_clip(self):
        args = ["--checkpoint", os.path.join(DEFAULT, "model.safetensors"),
                "--config", os.path.join(DEFAULT, "config.yml"),
                "--tokenizer", os.path.join(DEFAULT, "tokenizer.model"),
                "--lora", os.path.join(DEFAULT, "adapter"), "--lora-name", "style",
                "--max-logits", os.path.join(DEFAULT, "max_logits.safetensors"),
                "--qk-clip-threshold", "10"]
        a = self.export("a.kiln", *args)
        b = self.export("b.kiln", *args)
        self.assertSameTree(a, b)
        info = self.provenance(a)
        self.assertEqual(info["provenance"]["created_utc"], EPOCH_UTC, info["provenance"])
        res = kiln("adapter", "list", a, "--json")
        self.assertKilnOk(res, "adapter list")
        self.assertEqual([x["created_utc"] for x in common.parse_json_stdout(res)["adapters"]],
                         [EPOCH_UTC])

    def test_sequential_qk_clip_calibration(self):
        # the scratch exports and the engine's measurements are deterministic too (two prompts
        # of the default model's calibration set keep it quick)
        prompts = os.path.join(self.tmp, "prompts.txt")
        with open(os.path.join(DEFAULT, "calibration.txt")) as f, open(prompts, "w") as g:
            g.writelines(f.readlines()[:2])
        args = ["--checkpoint", os.path.join(DEFAULT, "model.safetensors"),
                "--config", os.path.join(DEFAULT, "config.yml"),
                "--qk-clip-threshold", "10",
                "--qk-clip-calibrate", prompts]
        a = self.export("a.kiln", *args)
        b = self.export("b.kiln", *args)
        self.assertSameTree(a, b)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["a.kiln", "b.kiln", "prompts.txt"])

    def test_llama_sharded_fixture(self):
        fx = mf.write_fixture(mf.BASE.replace(name="repro", shards=2, dtype="bf16"),
                              os.path.join(self.tmp, "fixture"))
        a = self.export("a.kiln", *fx.export_args())
        b = self.export("b.kiln", *fx.export_args())
        self.assertSameTree(a, b)

    def test_adapter_add(self):
        base = ["--checkpoint", os.path.join(DEFAULT, "model.safetensors"),
                "--config", os.path.join(DEFAULT, "config.yml")]
        arts = [self.export(n, *base) for n in ("a.kiln", "b.kiln")]
        for art in arts:
            self.assertKilnOk(kiln("adapter", "add", art, os.path.join(DEFAULT, "adapter"),
                                   "--name", "style"), "adapter add")
        self.assertSameTree(*arts)
        # replacing it (--force) and removing another one stay reproducible too
        for art in arts:
            self.assertKilnOk(kiln("adapter", "add", art, os.path.join(DEFAULT, "adapter"),
                                   "--name", "x", "--lora-scale", "0.5"), "adapter add x")
            self.assertKilnOk(kiln("adapter", "add", art, os.path.join(DEFAULT, "adapter"),
                                   "--name", "style", "--lora-scale", "2", "--force"),
                              "adapter add --force")
            self.assertKilnOk(kiln("adapter", "remove", art, "x"), "adapter remove")
        self.assertSameTree(*arts)
        self.assertEqual(sorted(os.listdir(os.path.join(arts[0], "adapters"))), ["style"])

    def test_malformed_source_date_epoch_is_one_line(self):
        fx = mf.write_fixture(mf.BASE.replace(name="epoch"), os.path.join(self.tmp, "fixture"))
        parent = os.path.join(self.tmp, "out")
        os.makedirs(parent)
        for bad in ("yesterday", "-5", "1.5e9", ""):
            self.set_epoch(bad)
            res = kiln("export", *fx.export_args(), "--out", os.path.join(parent, "m.kiln"))
            self.assertEqual(res.rc, 1, res.describe())
            self.assertEqual(len(res.stderr_lines), 1, res.describe())
            self.assertTrue(res.stderr_lines[0].startswith(
                "kiln: error: SOURCE_DATE_EPOCH: '%s' is not a time" % bad), res.describe())
            self.assertEqual(os.listdir(parent), [])
        self.set_epoch(None)
        art = self.export("now.kiln", *fx.export_args())
        self.assertNotEqual(self.provenance(art)["provenance"]["created_utc"], EPOCH_UTC)


if __name__ == "__main__":
    unittest.main()
