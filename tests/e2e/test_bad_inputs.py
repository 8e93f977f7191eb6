#!/usr/bin/python3
"""`kiln export` on bad input: exit code 1, exactly one stderr line `kiln: error: ...` naming the
offending file and (where one applies) the key, and nothing left behind in the output's parent
directory. Plus --out/--force semantics and bad usage (exit 2)."""

import json
import os
import shutil
import struct
import subprocess
import unittest

import numpy as np

import common
from common import kiln, mf, st

BASE = mf.BASE.replace(name="bad-inputs-base", seed=42)
P = "params.params."


def norm_msg(s):
    return s.replace("/", ".")


class FixtureCase(common.TempDirCase):
    """A fresh Llama fixture per test, with helpers to break it and check the refusal."""

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


class BadInputTest(FixtureCase):
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

    def test_bench_outside_the_context_or_the_slots(self):
        self.assertKilnOk(self.export(), "export")
        for args, rc, want in (
                (("--prompt-tokens", "100000"), 1, "must be within the model's context of"),
                (("--slots", "0"), 2, "slot counts from 1 to")):
            res = kiln("bench", self.out, "--repeat", "1", *args)
            self.assertEqual(res.rc, rc, res.describe())
            self.assertEqual(len(res.stderr_lines), 1, res.describe())
            self.assertIn(want, res.stderr_lines[0], res.describe())

    def test_bad_contention_spec_is_a_usage_error(self):
        for spec, want in (("spin:2", "unknown kind 'spin'"),
                           ("busy:0", "the count must be an integer from 1 to 64"),
                           ("busy:nice=25", "nice must be an integer from 0 to 19"),
                           ("busy:threads=2", "threads= applies to omp only"),
                           ("", "empty")):
            for cmd in (("bench", "no-such-artifact", "--contend", spec), ("contend", spec)):
                res = kiln(*cmd)
                self.assertEqual(res.rc, 2, res.describe())
                self.assertEqual(len(res.stderr_lines), 1, res.describe())
                self.assertIn(want, res.stderr_lines[0], res.describe())

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


# -- strict inputs ---------------------------------------------------------------------------------

# A hang (a FIFO opened for reading waits for a writer) fails the test instead of the suite.
PROMPT = 10


def crc32c(data):
    """CRC-32C (Castagnoli), as the blob preamble stores it."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class FlatBuffers:
    """Edits kiln's FlatBuffers through flatc (a build dependency) and its JSON form."""
    SCHEMA = os.path.join(common.REPO, "schema", "kiln.fbs")

    def __init__(self, tmp):
        self.flatc = shutil.which("flatc")
        self.tmp = tmp
        if not self.flatc:
            raise AssertionError("flatc (flatbuffers-compiler, a build dependency) is not on PATH")

    def to_json(self, data, root_type=None):
        src = os.path.join(self.tmp, "fb-in.bin")
        with open(src, "wb") as f:
            f.write(data)
        args = [self.flatc, "--json", "--strict-json", "--raw-binary", "-o", self.tmp]
        args += ["--root-type", root_type] if root_type else []
        subprocess.run(args + [self.SCHEMA, "--", src], check=True, timeout=PROMPT)
        with open(os.path.join(self.tmp, "fb-in.json")) as f:
            return json.load(f)

    def from_json(self, obj, root_type=None):
        src = os.path.join(self.tmp, "fb-out.json")
        with open(src, "w") as f:
            json.dump(obj, f)
        args = [self.flatc, "-b", "-o", self.tmp]
        args += ["--root-type", root_type] if root_type else []
        subprocess.run(args + [self.SCHEMA, src], check=True, timeout=PROMPT)
        with open(os.path.join(self.tmp, "fb-out.kfb"), "rb") as f:  # the schema's extension
            return f.read()


class StrictInputTest(FixtureCase):
    """Only regular files are opened; the safetensors format's own rules; numbers that do not fit
    and sizes that would wrap are refused with one line naming the file (exit 1), never a hang, a
    crash or an internal error (exit 3)."""

    def assertRefused(self, res, *needles):
        self.assertNotEqual(res.rc, "timeout", "kiln blocked:\n" + res.describe())
        self.assertEqual(res.rc, 1, "expected exit 1:\n" + res.describe())
        self.assertEqual(len(res.stderr_lines), 1, "expected one stderr line:\n" + res.describe())
        self.assertTrue(res.stderr_lines[0].startswith("kiln: error: "), res.describe())
        for n in needles:
            self.assertIn(n, res.stderr_lines[0], res.describe())
        print("    %-40s %s" % (self._testMethodName, res.stderr_lines[0]))

    def fifo(self, path):
        if os.path.lexists(path):
            os.remove(path)
        os.mkfifo(path)
        return path

    def exported(self):
        self.assertKilnOk(self.export(), "export")
        return self.out

    # -- not a regular file ----------------------------------------------------------------------

    def test_fifo_in_place_of_a_blob(self):
        blob = self.fifo(os.path.join(self.exported(), "layer-001.kblob"))
        for args in (("run", self.out, "--tokens", "1,2,3", "--max-tokens", "2"),
                     ("inspect", self.out, "--verify")):
            self.assertRefused(kiln(*args, timeout=PROMPT), blob + ": not a regular file (a FIFO)")

    def test_fifo_in_place_of_the_manifest(self):
        manifest = self.fifo(os.path.join(self.exported(), "manifest.kfb"))
        for args in (("run", self.out, "--tokens", "1,2,3"), ("inspect", self.out)):
            self.assertRefused(kiln(*args, timeout=PROMPT),
                               manifest + ": not a regular file (a FIFO)")

    def test_fifo_in_place_of_a_config(self):
        config = self.fifo(os.path.join(self.tmp, "config.yml"))
        self.assertRefused(kiln("export", "--checkpoint", self.ckpt, "--config", config, "--out",
                                self.out, timeout=PROMPT),
                           config + ": not a regular file (a FIFO)")
        self.assertFalse(os.path.exists(self.out))

    def test_fifo_in_place_of_a_checkpoint(self):
        self.fifo(self.ckpt)
        self.assertRefused(kiln("export", "--checkpoint", self.ckpt, "--config",
                                self.fx.config_path, "--out", self.out, timeout=PROMPT),
                           self.ckpt + ": not a regular file (a FIFO)")
        self.assertFalse(os.path.exists(self.out))

    def test_fifo_in_place_of_a_prompts_file(self):
        self.exported()
        prompts = self.fifo(os.path.join(self.tmp, "prompts.txt"))
        stats = os.path.join(self.tmp, "stats.safetensors")
        for args in (("run", self.out, "--prompts-file", prompts),
                     ("calibrate", self.out, "--tokens-file", prompts, "--out", stats)):
            self.assertRefused(kiln(*args, timeout=PROMPT),
                               prompts + ": not a regular file (a FIFO)")
        self.assertFalse(os.path.exists(stats))

    def test_directory_and_device_where_a_file_is_expected(self):
        art = self.exported()
        cases = [
            (("export", "--checkpoint", self.tmp, "--config", self.fx.config_path, "--out",
              os.path.join(self.tmp, "x.kiln")), self.tmp + ": not a regular file (a directory)"),
            (("export", "--checkpoint", self.ckpt, "--config", "/dev/zero", "--out",
              os.path.join(self.tmp, "x.kiln")), "/dev/zero: not a regular file (a character device)"),
            (("export", "--checkpoint", self.ckpt, "--config", self.fx.config_path, "--tokenizer",
              "/dev/zero", "--out", os.path.join(self.tmp, "x.kiln")),
             "/dev/zero: not a regular file (a character device)"),
            (("run", art, "--prompts-file", "/dev/zero"),
             "/dev/zero: not a regular file (a character device)"),
            (("run", art, "--prompts-file", self.tmp), self.tmp + ": not a regular file (a directory)"),
            (("golden", "check", art, "--tokens", "1,2", "--expect", "/dev/zero"),
             "/dev/zero: not a regular file (a character device)"),
        ]
        for args, needle in cases:
            self.assertRefused(kiln(*args, timeout=PROMPT), needle)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "x.kiln")))

    # -- the safetensors format's rules ----------------------------------------------------------

    def test_hole_between_tensors(self):
        header, body = self.read()
        items = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
        (b0, b1), last = items[-1]
        header[last]["data_offsets"] = [b0 + 8, b1 + 8]
        st.write_safetensors_raw(self.ckpt, header, body[:b0] + bytes(8) + body[b0:])
        self.assertBadInput(self.export(), "model.safetensors", [last],
                            also=["leave bytes [%d, %d)" % (b0, b0 + 8), "contiguous"])

    def test_bytes_after_the_last_tensor(self):
        header, body = self.read()
        st.write_safetensors_raw(self.ckpt, header, body + bytes(16))
        self.assertBadInput(self.export(), "model.safetensors",
                            also=["16 bytes follow the last tensor"])

    def test_metadata_values_must_be_strings(self):
        header, body = self.read()
        header["__metadata__"] = {"format": "pt", "step": 1000}
        st.write_safetensors_raw(self.ckpt, header, body)
        self.assertBadInput(self.export(), "model.safetensors", ["__metadata__"],
                            also=["'step' is 1000, expected a string"])

    def test_header_over_100_000_000_bytes(self):
        # Refused on the length alone: nothing that large is read (the file itself is small).
        header, body = self.read()
        st.write_safetensors_raw(self.ckpt, header, body, header_len=100_000_001)
        self.assertBadInput(self.export(), "model.safetensors",
                            also=["header length 100000001 is over the 100000000-byte limit"])

    # -- numbers that do not fit -----------------------------------------------------------------

    def test_number_overflow_in_a_config(self):
        with open(self.fx.config_path) as f:
            text = f.read()
        path = os.path.join(self.tmp, "huge.json")
        with open(path, "w") as f:
            f.write(text.replace("{", '{"rope_max_timescale": 1e999, ', 1))
        self.assertBadInput(self.export(config=path), "huge.json",
                            also=["number overflow parsing '1e999'"])

    def test_number_overflow_in_a_checkpoint_header(self):
        header, body = self.read()
        text = json.dumps(header, separators=(",", ":"))
        text = text.replace('"shape":[', '"shape":[1e999,', 1)
        st.write_safetensors_raw(self.ckpt, text, body)
        self.assertBadInput(self.export(), "model.safetensors",
                            also=["number overflow parsing '1e999'"])

    def test_number_overflow_in_a_sharded_index(self):
        fx = mf.write_fixture(BASE.replace(shards=2), os.path.join(self.tmp, "sharded"))
        index = [a for a in fx.checkpoint_args if a.endswith(".index.json")][0]
        with open(index) as f:
            text = f.read()
        with open(index, "w") as f:
            f.write(text.replace("{", '{"metadata": {"total_size": 1e999}, ', 1))
        res = kiln("export", *fx.export_args(), "--out", self.out)
        self.assertBadInput(res, os.path.basename(index), also=["number overflow parsing '1e999'"])

    def test_number_overflow_in_an_adapter_config(self):
        import lora_ref as L  # tests/reference is on sys.path (common)
        ad = L.write_adapter(self.fx, L.AdapterSpec(), os.path.join(self.tmp, "adapter"))
        cfg = os.path.join(ad.directory, "adapter_config.json")
        with open(cfg) as f:
            text = f.read()
        with open(cfg, "w") as f:
            f.write(text.replace("{", '{"lora_dropout": 1e999, ', 1))
        self.assertBadInput(self.export("--lora", ad.directory, "--merge-lora"),
                            "adapter_config.json", also=["number overflow parsing '1e999'"])

    def test_vocabulary_whose_sizes_wrap(self):
        """A crafted manifest and globals blob claiming a vocabulary of 2^58: token_embedding
        [2^58, E] of bf16 is 2^59·E bytes, 0 once wrapped to 64 bits -- which the blob header
        then declares, consistently, with valid checksums. `inspect --verify` used to pass it."""
        art = self.exported()
        fb = FlatBuffers(self.tmp)
        vocab = 2 ** 58
        mpath = os.path.join(art, "manifest.kfb")
        with open(mpath, "rb") as f:
            manifest = fb.to_json(f.read())
        manifest["config"]["vocab_size"] = vocab
        emb = manifest["config"]["emb_dim"]
        gpath = os.path.join(art, "globals.kblob")
        with open(gpath, "rb") as f:
            blob = bytearray(f.read())
        hlen = struct.unpack_from("<Q", blob, 16)[0]
        header = fb.to_json(bytes(blob[32:32 + hlen]), "kiln.fb.BlobHeader")
        for t in header["tensors"]:
            if t["name"] in ("token_embedding", "logits_dense"):
                t["shape"] = [vocab, emb] if t["name"] == "token_embedding" else [emb, vocab]
                t["length"] = vocab * emb * 2 % 2 ** 64
                t["crc32c"] = crc32c(b"")
        self.assertEqual(vocab * emb * 2 % 2 ** 64, 0)
        new_header = fb.from_json(header, "kiln.fb.BlobHeader")
        first = min(t["offset"] for t in header["tensors"])
        self.assertLessEqual(32 + len(new_header), first)
        blob[32:first] = new_header + bytes(first - 32 - len(new_header))
        struct.pack_into("<QI", blob, 16, len(new_header), crc32c(new_header))
        with open(gpath, "wb") as f:
            f.write(blob)
        for b in manifest["blobs"]:
            if b["file"] == "globals.kblob":
                b["header_crc32c"] = crc32c(new_header)
        def write_manifest():
            # With the checksum trailer kiln writes (format 1.3), so that the checks behind the
            # checksum are what refuse it.
            body = fb.from_json(manifest)
            with open(mpath, "wb") as f:
                f.write(body + b"KILNMCRC" + struct.pack("<II", crc32c(body), 0))

        write_manifest()
        for args in (("inspect", art, "--verify"), ("run", art, "--tokens", "1,2")):
            self.assertRefused(kiln(*args, timeout=PROMPT), "manifest.kfb", "vocab_size")
        # The blob alone, under a manifest with the real vocabulary: refused by its own reader.
        manifest["config"]["vocab_size"] = self.fx.config["vocab_size"]
        write_manifest()
        self.assertRefused(kiln("inspect", art, "--verify", timeout=PROMPT), "globals.kblob",
                           "too large to address")


if __name__ == "__main__":
    unittest.main()
