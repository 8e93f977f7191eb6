#!/usr/bin/python3
"""`kiln export` on bad input: exit code 1, exactly one stderr line `kiln: error: ...` naming the
offending file and (where one applies) the key, and nothing left behind in the output's parent
directory. Plus --out/--force semantics and bad usage (exit 2)."""

import json
import os
import struct
import unittest

import numpy as np

import common
from common import kiln, mf, st

BASE = mf.BASE.replace(name="bad-inputs-base", seed=42)
P = "params.params."


def norm_msg(s):
    return s.replace("/", ".")


class BadInputTest(common.TempDirCase):
    def setUp(self):
        super().setUp()
        common.require_kiln(self)
        self.fx = mf.write_fixture(BASE, os.path.join(self.tmp, "fixture"))
        self.ckpt = self.fx.checkpoint_files[0]
        self.outparent = os.path.join(self.tmp, "out")
        os.makedirs(self.outparent)
        self.out = os.path.join(self.outparent, "model.kiln")

    # -- helpers ---------------------------------------------------------------------------------

    def read(self, path=None):
        path = path or self.ckpt
        header, start = st.read_header(path)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read()
        return header, body

    def tensors(self):
        """name -> (float32 array, dtype) of the base checkpoint (all F32)."""
        arrays = st.read_safetensors(self.ckpt)
        return {k: (v, "F32") for k, v in arrays.items()}

    def export(self, *extra, config=None):
        args = ["export", "--checkpoint", self.ckpt, "--config", config or self.fx.config_path,
                "--out", self.out] + list(extra)
        return kiln(*args)

    def assertBadInput(self, res, file_name, keys=(), also=()):
        """exit 1, one line `kiln: error: ` naming the file and one of `keys`, nothing left."""
        self.assertEqual(res.rc, 1, "expected exit 1:\n" + res.describe())
        lines = res.stderr_lines
        self.assertEqual(len(lines), 1, "expected exactly one stderr line:\n" + res.describe())
        msg = lines[0]
        self.assertTrue(msg.startswith("kiln: error: "), "message must start with "
                        "'kiln: error: ':\n" + res.describe())
        if file_name:
            self.assertIn(file_name, msg, "message must name the file %r:\n%s"
                          % (file_name, res.describe()))
        if keys:
            self.assertTrue(any(norm_msg(k) in norm_msg(msg) for k in keys),
                            "message must name the key (one of %s):\n%s" % (list(keys),
                                                                             res.describe()))
        for word in also:
            self.assertIn(word.lower(), msg.lower(), "message should mention %r:\n%s"
                          % (word, res.describe()))
        self.assertFalse(os.path.exists(self.out), "output directory left behind after a "
                         "failed export: %s" % self.out)
        self.assertEqual(os.listdir(self.outparent), [], "leftovers next to the output: %s"
                         % os.listdir(self.outparent))
        print("    %-40s %s" % (self._testMethodName, msg))

    # -- checkpoint problems ---------------------------------------------------------------------

    def test_missing_tensor(self):
        t = self.tensors()
        del t[P + "decoder.layers.mlp.wo.kernel"]
        st.write_safetensors(self.ckpt, t)
        self.assertBadInput(self.export(), "model.safetensors", ["mlp.wo"])

    def test_missing_global_tensor(self):
        t = self.tensors()
        del t[P + "decoder.decoder_norm.scale"]
        st.write_safetensors(self.ckpt, t)
        self.assertBadInput(self.export(), "model.safetensors", ["decoder_norm"])

    def test_extra_unknown_tensor(self):
        t = self.tensors()
        t[P + "decoder.layers.mlp.surprise.kernel"] = (np.zeros((64, 2, 8), np.float32), "F32")
        st.write_safetensors(self.ckpt, t)
        self.assertBadInput(self.export(), "model.safetensors", ["surprise"])

    def test_shape_disagrees_with_config(self):
        t = self.tensors()
        k = P + "decoder.layers.mlp.wi_0.kernel"
        t[k] = (np.zeros((64, 2, 136), np.float32), "F32")
        st.write_safetensors(self.ckpt, t)
        self.assertBadInput(self.export(), "model.safetensors", ["wi_0"])

    def test_config_disagrees_with_shapes(self):
        cfg = dict(self.fx.config)
        cfg["mlp_dim"] = 160
        path = os.path.join(self.tmp, "config160.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        res = self.export(config=path)
        self.assertBadInput(res, "", ["wi_0", "wi_1", "mlp.wo", "mlp_dim"])

    def _unsupported_dtype(self, dtype):
        t = self.tensors()
        k = P + "decoder.decoder_norm.scale"
        t[k] = (t[k][0], dtype)
        st.write_safetensors(self.ckpt, t)
        self.assertBadInput(self.export(), "model.safetensors", ["decoder_norm"], also=[dtype])

    def test_unsupported_dtype_f64(self):
        self._unsupported_dtype("F64")

    def test_unsupported_dtype_i64(self):
        self._unsupported_dtype("I64")

    def test_truncated_file(self):
        size = os.path.getsize(self.ckpt)
        with open(self.ckpt, "r+b") as f:
            f.truncate(size - 100)
        self.assertBadInput(self.export(), "model.safetensors")

    def test_header_length_larger_than_file(self):
        size = os.path.getsize(self.ckpt)
        with open(self.ckpt, "r+b") as f:
            f.write(struct.pack("<Q", size + 1000))
        self.assertBadInput(self.export(), "model.safetensors")

    def test_malformed_header_json(self):
        header, body = self.read()
        text = json.dumps(header, separators=(",", ":"))
        broken = text[:len(text) // 2] + '"' + text[len(text) // 2 + 1:]   # unbalanced quote
        broken = broken[:-1] + " "                                         # and no closing brace
        st.write_safetensors_raw(self.ckpt, broken, body)
        self.assertBadInput(self.export(), "model.safetensors")

    def test_overlapping_data_offsets(self):
        header, body = self.read()
        items = sorted(((v["data_offsets"], k) for k, v in header.items()
                        if k != "__metadata__"))
        (a_begin, _), a_key = items[0]
        b_key = P + "decoder.layers.post_self_attention_layer_norm.scale"
        b0, b1 = header[b_key]["data_offsets"]
        header[b_key]["data_offsets"] = [a_begin + 8, a_begin + 8 + (b1 - b0)]
        st.write_safetensors_raw(self.ckpt, header, body)
        self.assertBadInput(self.export(), "model.safetensors",
                            [a_key[len(P):], b_key[len(P):], "post_self_attention_layer_norm",
                             a_key.split(".")[-2]])

    def test_data_offsets_beyond_end(self):
        header, body = self.read()
        k = P + "decoder.decoder_norm.scale"
        b0, b1 = header[k]["data_offsets"]
        header[k]["data_offsets"] = [len(body) - 4, len(body) - 4 + (b1 - b0)]
        st.write_safetensors_raw(self.ckpt, header, body)
        self.assertBadInput(self.export(), "model.safetensors", ["decoder_norm"])

    def test_checkpoint_file_missing(self):
        os.remove(self.ckpt)
        self.assertBadInput(self.export(), "model.safetensors")

    def test_sharded_index_names_missing_shard(self):
        v = BASE.replace(shards=2)
        fx = mf.write_fixture(v, os.path.join(self.tmp, "sharded"))
        os.remove(fx.checkpoint_files[1])
        res = kiln("export", *fx.export_args(), "--out", self.out)
        self.assertBadInput(res, os.path.basename(fx.checkpoint_files[1]))

    # -- config problems -------------------------------------------------------------------------

    def test_config_missing_required_field(self):
        cfg = dict(self.fx.config)
        del cfg["emb_dim"]
        path = os.path.join(self.tmp, "noemb.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.assertBadInput(self.export(config=path), "noemb.json", ["emb_dim"])

    def test_config_malformed_json(self):
        path = os.path.join(self.tmp, "broken.json")
        with open(path, "w") as f:
            f.write('{"decoder_block": "llama2", "emb_dim": 64,,}')
        self.assertBadInput(self.export(config=path), "broken.json")

    def test_config_unsupported_decoder_block(self):
        cfg = dict(self.fx.config)
        cfg["decoder_block"] = "gemma7"
        path = os.path.join(self.tmp, "gemma.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.assertBadInput(self.export(config=path), "gemma.json", ["decoder_block"])

    def test_scan_axis_out_of_range(self):
        self.assertBadInput(self.export("--scan-axis", "7"), "", ["scan"], also=["7"])

    def test_scan_axis_wrong_for_checkpoint(self):
        # the checkpoint is stacked on axis 1; axis 0 has size E=64, not L=2
        self.assertBadInput(self.export("--scan-axis", "0"), "model.safetensors")

    # -- --out / --force -------------------------------------------------------------------------

    def test_existing_out_without_force_is_untouched(self):
        os.makedirs(self.out)
        marker = os.path.join(self.out, "keep-me.txt")
        with open(marker, "w") as f:
            f.write("precious")
        res = self.export()
        self.assertEqual(res.rc, 1, res.describe())
        self.assertEqual(len(res.stderr_lines), 1, res.describe())
        self.assertTrue(res.stderr_lines[0].startswith("kiln: error: "), res.describe())
        self.assertEqual(os.listdir(self.out), ["keep-me.txt"])
        with open(marker) as f:
            self.assertEqual(f.read(), "precious")
        self.assertEqual(os.listdir(self.outparent), ["model.kiln"])
        res = self.export("--force")
        self.assertKilnOk(res, "export --force")
        self.assertFalse(os.path.exists(marker), "--force must replace the directory")
        self.assertTrue(os.path.exists(os.path.join(self.out, "manifest.kfb")))
        self.assertTrue(os.path.exists(os.path.join(self.out, "globals.kblob")))
        self.assertTrue(os.path.exists(os.path.join(self.out, "layer-000.kblob")))
        self.assertTrue(os.path.exists(os.path.join(self.out, "layer-001.kblob")))
        self.assertEqual(os.listdir(self.outparent), ["model.kiln"])

    # -- usage -----------------------------------------------------------------------------------

    def test_unknown_flag_is_usage_error(self):
        res = self.export("--no-such-flag")
        self.assertEqual(res.rc, 2, res.describe())
        self.assertFalse(os.path.exists(self.out))

    def test_unknown_subcommand_is_usage_error(self):
        res = kiln("frobnicate")
        self.assertEqual(res.rc, 2, res.describe())

    def test_missing_required_option_is_usage_error(self):
        res = kiln("export", "--checkpoint", self.ckpt, "--config", self.fx.config_path)
        self.assertEqual(res.rc, 2, "export without --out:\n" + res.describe())
        res = kiln("run", self.tmp)
        self.assertEqual(res.rc, 2, "run without --tokens:\n" + res.describe())

    def test_bad_set_syntax_is_an_error(self):
        res = self.export("--set", "emb_dim")
        self.assertIn(res.rc, (1, 2), res.describe())
        self.assertFalse(os.path.exists(self.out))

    # -- calibration prompts ---------------------------------------------------------------------

    def calibrate(self, prompts_text):
        self.assertKilnOk(self.export(), "export")
        prompts = os.path.join(self.tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write(prompts_text)
        stats = os.path.join(self.tmp, "stats.safetensors")
        res = kiln("calibrate", self.out, "--tokens-file", prompts, "--out", stats)
        self.assertEqual(res.rc, 1, "expected exit 1:\n" + res.describe())
        self.assertEqual(len(res.stderr_lines), 1, res.describe())
        self.assertIn("prompts.txt", res.stderr_lines[0], res.describe())
        self.assertFalse(os.path.exists(stats), "statistics written despite the error")
        print("    %-40s %s" % (self._testMethodName, res.stderr_lines[0]))
        return res.stderr_lines[0]

    def test_calibrate_malformed_prompt_line(self):
        msg = self.calibrate("1,2,3\n4,x,6\n")
        self.assertIn("line 2", msg)

    def test_calibrate_token_outside_vocabulary(self):
        msg = self.calibrate("1,2,3\n1,99999\n")
        self.assertIn("prompt 2", msg)
        self.assertIn("vocabulary", msg)

    def test_calibrate_empty_prompts_file(self):
        self.assertIn("no prompts", self.calibrate("\n\n"))

    # -- line files (one reader for prompts, requests and text) -----------------------------------

    def test_missing_line_files_name_the_file(self):
        self.assertKilnOk(self.export(), "export")
        missing = os.path.join(self.tmp, "no-such-prompts.txt")
        stats = os.path.join(self.tmp, "stats.safetensors")
        for args in (("run", self.out, "--prompts-file", missing),
                     ("calibrate", self.out, "--tokens-file", missing, "--out", stats)):
            res = kiln(*args)
            self.assertNotEqual(res.rc, 0, res.describe())
            self.assertEqual(len(res.stderr_lines), 1, res.describe())
            self.assertIn(missing + ": cannot open", res.stderr_lines[0], res.describe())
            print("    %-40s %s" % (args[0], res.stderr_lines[0]))
        self.assertFalse(os.path.exists(stats), "statistics written despite the error")

    def test_crlf_prompts_file_runs(self):
        self.assertKilnOk(self.export(), "export")
        lf = os.path.join(self.tmp, "lf.txt")
        crlf = os.path.join(self.tmp, "crlf.txt")
        with open(lf, "w", newline="") as f:
            f.write("1,2,3\n\n4,5\n")
        with open(crlf, "w", newline="") as f:
            f.write("1,2,3\r\n\r\n4,5\r\n")
        outs = []
        for path in (lf, crlf):
            res = kiln("run", self.out, "--prompts-file", path, "--max-tokens", "3")
            self.assertKilnOk(res, "run " + os.path.basename(path))
            outs.append(res.stdout)
        self.assertEqual(outs[0].splitlines()[:2], outs[1].splitlines()[:2])


if __name__ == "__main__":
    unittest.main()
