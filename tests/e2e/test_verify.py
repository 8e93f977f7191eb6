#!/usr/bin/python3
"""Damaged artifacts must be refused with exit 1 and one clear `kiln: error: ` line naming the file
(and, for a checksum mismatch, the tensor).

VerifyTest: truncated, missing and structurally damaged files, refused by `inspect` and `run`.
IntegrityTest (integrity by default): a flipped data bit in a layer blob, an edited manifest and a
manifest without its checksum are refused by run, golden dump, bench, eval, calibrate, inspect and
the C API (KILN_ERROR_IO), and accepted only with `--no-verify` / verify_checksums = 0; with
`--no-verify`, a NaN weight makes `golden dump` and `run` fail naming the position (no .npy is
written) and the C API return KILN_ERROR_IO."""

import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest

import common
from common import kiln, mf

VARIANT = mf.BASE.replace(name="verify-base", seed=77)
# The default model's tokenizer has 4096 pieces: a vocabulary that size lets `eval` read text.
TOKENIZER = os.path.join(common.REPO, "models", "default", "tokenizer.model")
TEXT_VARIANT = mf.BASE.replace(name="integrity", seed=78, vocab_size=4096)
CHECKER = os.path.join(os.path.dirname(common.KILN), "kiln_c_api_check")


# ------------------------------------------------------------------------------------------------
# a tiny FlatBuffers reader, enough to find the tensors of a .kblob header (schema/kiln.fbs:
# BlobHeader{format_major, format_minor, layer, kind, tensors: [Tensor{name, dtype, shape, offset,
# length, crc32c}]}). The preamble size is not assumed: candidate start offsets are tried and the
# parse is accepted only if it is fully consistent with the file.

def _u16(b, o):
    return struct.unpack_from("<H", b, o)[0]


def _u32(b, o):
    return struct.unpack_from("<I", b, o)[0]


def _i32(b, o):
    return struct.unpack_from("<i", b, o)[0]


def _field(b, table, i):
    vt = table - _i32(b, table)
    vt_size = _u16(b, vt)
    if 4 + 2 * i >= vt_size:
        return 0
    off = _u16(b, vt + 4 + 2 * i)
    return table + off if off else 0


def _deref(b, pos):
    return pos + _u32(b, pos)


def _parse_blob_header(b, start, file_size):
    root = start + _u32(b, start)
    tpos = _field(b, root, 4)
    if not tpos:
        raise ValueError("no tensors field")
    vec = _deref(b, tpos)
    n = _u32(b, vec)
    if not 0 < n < 1000:
        raise ValueError("implausible tensor count")
    tensors = []
    for i in range(n):
        el = vec + 4 + 4 * i
        t = _deref(b, el)
        npos = _field(b, t, 0)
        s = _deref(b, npos)
        name = b[s + 4:s + 4 + _u32(b, s)].decode("ascii")
        if not name or not name.isprintable():
            raise ValueError("bad name")
        opos, lpos = _field(b, t, 3), _field(b, t, 4)
        offset = struct.unpack_from("<Q", b, opos)[0] if opos else 0
        length = struct.unpack_from("<Q", b, lpos)[0] if lpos else 0
        if offset % 64 or offset + length > file_size or length == 0:
            raise ValueError("bad extent")
        tensors.append((name, offset, length))
    return tensors


def blob_tensors(path):
    """[(name, offset, length)] of a .kblob, or None if it cannot be parsed."""
    with open(path, "rb") as f:
        b = f.read(1 << 20)
    size = os.path.getsize(path)
    for start in range(8, 257, 4):
        for prefixed in (False, True):
            try:
                return _parse_blob_header(b, start + (4 if prefixed else 0), size)
            except (ValueError, struct.error, UnicodeDecodeError, IndexError):
                continue
    return None


class DamagedCopyCase(common.TempDirCase):
    """Exports VARIANT once per class; every test gets its own copy of the artifact in self.art."""
    VARIANT = None
    EXPORT_ARGS = ()

    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix="kiln-e2e-verify-")
        cls.export_error = None
        if not os.path.exists(common.KILN):
            cls.export_error = "kiln binary not found at %s" % common.KILN
            return
        fx = mf.write_fixture(cls.VARIANT, os.path.join(cls.base, "fixture"))
        cls.good = os.path.join(cls.base, "good.kiln")
        res = kiln("export", *fx.export_args(), *cls.EXPORT_ARGS, "--out", cls.good)
        if res.rc != 0:
            cls.export_error = "export failed:\n" + res.describe()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, True)

    def setUp(self):
        super().setUp()
        if self.export_error:
            self.fail(self.export_error)
        self.art = os.path.join(self.tmp, "copy.kiln")
        shutil.copytree(self.good, self.art)


class VerifyTest(DamagedCopyCase):
    VARIANT = VARIANT

    def setUp(self):
        super().setUp()
        self.blob = os.path.join(self.art, "layer-000.kblob")

    def assertRefused(self, res, file_name, also=()):
        self.assertEqual(res.rc, 1, "expected exit 1:\n" + res.describe())
        lines = res.stderr_lines
        self.assertEqual(len(lines), 1, "expected exactly one stderr line:\n" + res.describe())
        self.assertTrue(lines[0].startswith("kiln: error: "), res.describe())
        self.assertIn(file_name, lines[0], "message must name %s:\n%s" % (file_name,
                                                                          res.describe()))
        for word in also:
            self.assertIn(word, lines[0], "message must name %r:\n%s" % (word, res.describe()))
        print("    %-40s %s" % (self._testMethodName, lines[0]))

    def flip(self, path, pos):
        common.flip_byte(path, pos, 0x5A)

    def test_good_artifact_verifies(self):
        self.assertKilnOk(kiln("inspect", self.art, "--verify"), "inspect --verify")
        self.assertKilnOk(kiln("run", self.art, "--tokens", "1,2", "--max-tokens", 2), "run")

    def test_truncated_blob(self):
        size = os.path.getsize(self.blob)
        with open(self.blob, "r+b") as f:
            f.truncate(size - 100)
        self.assertRefused(kiln("inspect", self.art, "--verify"), "layer-000.kblob")
        self.assertRefused(kiln("run", self.art, "--tokens", "1,2"), "layer-000.kblob")

    def test_truncated_to_preamble(self):
        with open(self.blob, "r+b") as f:
            f.truncate(10)
        self.assertRefused(kiln("inspect", self.art, "--verify"), "layer-000.kblob")
        self.assertRefused(kiln("run", self.art, "--tokens", "1,2"), "layer-000.kblob")

    def test_flipped_header_byte(self):
        self.flip(self.blob, 40)
        self.assertRefused(kiln("inspect", self.art, "--verify"), "layer-000.kblob")
        self.assertRefused(kiln("run", self.art, "--tokens", "1,2"), "layer-000.kblob")

    def test_flipped_header_bytes_sweep(self):
        """Every single-byte flip in bytes 16..64 is refused by inspect --verify and run."""
        orig = open(self.blob, "rb").read()
        missed = []
        for pos in range(16, 64, 3):
            with open(self.blob, "wb") as f:
                f.write(orig[:pos] + bytes([orig[pos] ^ 0x01]) + orig[pos + 1:])
            for args in (("inspect", self.art, "--verify"), ("run", self.art, "--tokens", "1,2",
                                                              "--max-tokens", "1")):
                res = kiln(*args)
                if res.rc != 1 or not res.stderr_lines or \
                        "layer-000.kblob" not in res.stderr_lines[0]:
                    missed.append("byte %d: %s -> exit %s %s" % (pos, args[0], res.rc,
                                                                 res.stderr.strip()[:200]))
        self.assertEqual(missed, [], "flips not refused:\n" + "\n".join(missed))

    def test_flipped_tensor_data_byte_refused_by_default(self):
        tensors = blob_tensors(self.blob)
        if tensors is None:
            # fall back to inspect --json, looking for {name, offset, length} records
            tensors = []
            res = kiln("inspect", self.art, "--json")
            try:
                tree = json.loads(res.stdout)
            except ValueError:
                tree = None

            def walk(node, in_layer0):
                if isinstance(node, dict):
                    here = in_layer0 or any(str(v) == "layer-000.kblob" for v in node.values())
                    if {"name", "offset", "length"} <= set(node) and here:
                        tensors.append((node["name"], int(node["offset"]), int(node["length"])))
                    for v in node.values():
                        walk(v, here)
                elif isinstance(node, list):
                    for v in node:
                        walk(v, in_layer0)
            walk(tree, False)
        self.assertTrue(tensors, "could not locate the tensors of layer-000.kblob")
        name, offset, length = max(tensors, key=lambda t: t[1])   # the last tensor in the file
        self.flip(self.blob, offset + length - 7)                 # near the end of the file
        self.assertRefused(kiln("inspect", self.art, "--verify"), "layer-000.kblob", also=[name])
        self.assertRefused(kiln("inspect", self.art), "layer-000.kblob", also=[name])
        res = kiln("inspect", self.art, "--no-verify")
        self.assertKilnOk(res, "inspect --no-verify")
        self.assertIn("checksums not verified", res.stdout)

    def test_missing_blob(self):
        os.remove(os.path.join(self.art, "layer-001.kblob"))
        self.assertRefused(kiln("inspect", self.art, "--verify"), "layer-001.kblob")
        self.assertRefused(kiln("run", self.art, "--tokens", "1,2"), "layer-001.kblob")

    def test_truncated_manifest(self):
        m = os.path.join(self.art, "manifest.kfb")
        with open(m, "r+b") as f:
            f.truncate(os.path.getsize(m) // 2)
        self.assertRefused(kiln("inspect", self.art, "--verify"), "manifest.kfb")
        self.assertRefused(kiln("run", self.art, "--tokens", "1,2"), "manifest.kfb")

    def test_not_an_artifact(self):
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        self.assertRefused(kiln("inspect", empty), "manifest.kfb")
        self.assertRefused(kiln("run", os.path.join(self.tmp, "nope"), "--tokens", "1"), "nope")



# ------------------------------------------------------------------------------------------------
# integrity by default

def put_u16(path, pos, value):
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack("<H", value))


def get_u16(path, pos):
    with open(path, "rb") as f:
        f.seek(pos)
        return struct.unpack("<H", f.read(2))[0]


def tensor_extent(blob, name):
    for n, offset, length in blob_tensors(blob) or []:
        if n == name:
            return offset, length
    raise AssertionError("tensor %s not found in %s" % (name, blob))


class IntegrityTest(DamagedCopyCase):
    VARIANT = TEXT_VARIANT
    EXPORT_ARGS = ("--tokenizer", TOKENIZER)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.text = os.path.join(cls.base, "text.txt")
        with open(cls.text, "w") as f:
            f.write("In the beginning was the word\n")
        cls.prompts = os.path.join(cls.base, "prompts.txt")
        with open(cls.prompts, "w") as f:
            f.write("1,3,4,5\n6,7\n")

    def setUp(self):
        super().setUp()
        self.npy = os.path.join(self.tmp, "logits.npy")

    def test_nan_reached_while_decoding_names_request_and_slot(self):
        """A NaN fed back by a decode step: the step fails naming the request and its slot."""
        def first_token(prompt):
            res = kiln("run", self.art, "--tokens", prompt, "--max-tokens", "1", "--json")
            self.assertKilnOk(res, "run " + prompt)
            return common.parse_json_stdout(res)["tokens"][0]
        x, y = first_token("1,3"), first_token("5,6")
        self.assertNotIn(x, (1, 3, 5, 6, y), "pick other prompts for this fixture")
        g = os.path.join(self.art, "globals.kblob")
        offset, _ = tensor_extent(g, "token_embedding")
        put_u16(g, offset + 2 * x * TEXT_VARIANT.emb_dim, 0x7FC0)
        prompts = os.path.join(self.tmp, "decode.txt")
        with open(prompts, "w") as f:
            f.write("5,6\n1,3\n")
        self.assertRefusedEverywhere(
            [("run --prompts-file", ["run", self.art, "--prompts-file", prompts, "--slots", "2",
                                     "--max-tokens", "2", "--no-verify"])],
            ["request 2 (slot 1), position 2: non-finite logit"])

    def prompts_with(self, token):
        """A prompts file whose second prompt has `token` at position 1."""
        path = os.path.join(self.tmp, "prompts-%d.txt" % token)
        with open(path, "w") as f:
            f.write("1,3,4\n5,%d,6\n" % token)
        return path

    def engine_commands(self):
        """Every command that runs the model: (name, argv)."""
        a = self.art
        return [("run", ["run", a, "--tokens", "1,3,4", "--max-tokens", "2"]),
                ("golden dump", ["golden", "dump", a, "--tokens", "1,3,4", "--out", self.npy]),
                ("bench", ["bench", a, "--prompt-tokens", "4", "--gen-tokens", "2", "--repeat",
                           "1"]),
                ("eval", ["eval", a, "--text-file", self.text]),
                ("calibrate", ["calibrate", a, "--tokens-file", self.prompts, "--out",
                               os.path.join(self.tmp, "stats.safetensors")]),
                ("inspect", ["inspect", a])]

    def manifest_commands(self):
        """Commands that read only the manifest."""
        return [("tokenize", ["tokenize", self.art, "--text-file", self.text]),
                ("adapter list", ["adapter", "list", self.art])]

    def assertRefusedEverywhere(self, commands, needles):
        for what, argv in commands:
            res = kiln(*argv)
            self.assertEqual(res.rc, 1, "%s: expected exit 1:\n%s" % (what, res.describe()))
            self.assertEqual(len(res.stderr_lines), 1, "%s: one line:\n%s" % (what,
                                                                              res.describe()))
            self.assertTrue(res.stderr_lines[0].startswith("kiln: error: "), res.describe())
            for n in needles:
                self.assertIn(n, res.stderr_lines[0], "%s must name %r:\n%s"
                              % (what, n, res.describe()))
            self.assertFalse(os.path.exists(self.npy), "%s left %s" % (what, self.npy))
        print("    %-40s %s" % (self._testMethodName, res.stderr_lines[0]))

    def assertAcceptedWithNoVerify(self, commands):
        for what, argv in commands:
            self.assertKilnOk(kiln(*argv, "--no-verify"), what + " --no-verify")

    def assertCApi(self, *args):
        if not os.path.exists(CHECKER):
            self.fail("%s not found (build it with `ninja -C build`)" % CHECKER)
        p = subprocess.run([CHECKER] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        out = p.stdout.decode("utf-8", "replace")
        self.assertEqual(p.returncode, 0, "kiln_c_api_check %s:\n%s%s"
                         % (" ".join(args), out, p.stderr.decode("utf-8", "replace")))
        self.assertRegex(out, r"\d+ checks, 0 failed")

    def test_good_artifact_runs_everywhere(self):
        for what, argv in self.engine_commands() + self.manifest_commands():
            self.assertKilnOk(kiln(*argv), what)

    def test_flipped_data_bit_in_a_layer_blob(self):
        blob = os.path.join(self.art, "layer-001.kblob")
        offset, _ = tensor_extent(blob, "mlp.wi_0")
        at = offset + 2 * 123
        put_u16(blob, at, get_u16(blob, at) ^ 0x0001)  # lowest mantissa bit: still finite
        needles = ["layer-001.kblob: tensor 'mlp.wi_0' fails its CRC-32C check"]
        self.assertRefusedEverywhere(self.engine_commands(), needles)
        self.assertAcceptedWithNoVerify(self.engine_commands())
        self.assertCApi("--damaged", self.art, needles[0])

    def test_edited_manifest(self):
        m = os.path.join(self.art, "manifest.kfb")
        data = open(m, "rb").read()
        eps = struct.pack("<d", TEXT_VARIANT.normalization_layer_epsilon)
        self.assertEqual(data.count(eps), 1, "normalization_layer_epsilon not found once")
        with open(m, "wb") as f:
            f.write(data.replace(eps, struct.pack("<d", 2e-5)))
        needles = ["manifest.kfb: checksum mismatch (the manifest was edited or is corrupt)"]
        commands = self.engine_commands() + self.manifest_commands()
        self.assertRefusedEverywhere(commands, needles)
        self.assertAcceptedWithNoVerify(commands)
        res = kiln("inspect", self.art, "--no-verify", "--json")
        self.assertKilnOk(res, "inspect --no-verify --json")
        cfg = common.parse_json_stdout(res)["config"]
        self.assertEqual(cfg["normalization_layer_epsilon"], 2e-5)
        self.assertCApi("--damaged", self.art, needles[0])

    def test_manifest_without_checksum(self):
        """A manifest written before format 1.3 (no trailer): re-export, or --no-verify."""
        m = os.path.join(self.art, "manifest.kfb")
        data = open(m, "rb").read()
        self.assertEqual(data[-16:-8], b"KILNMCRC")
        with open(m, "wb") as f:
            f.write(data[:-16])
        commands = [c for c in self.engine_commands() if c[0] in ("run", "inspect")]
        self.assertRefusedEverywhere(commands, ["manifest.kfb: has no checksum (written by a kiln "
                                                "before format 1.3); re-export it, or pass "
                                                "--no-verify"])
        self.assertAcceptedWithNoVerify(commands)

    def test_nan_weight_is_an_error_naming_the_position(self):
        g = os.path.join(self.art, "globals.kblob")
        offset, _ = tensor_extent(g, "token_embedding")
        put_u16(g, offset + 2 * 2 * TEXT_VARIANT.emb_dim, 0x7FC0)  # token 2's first value: NaN
        self.assertRefusedEverywhere(
            [("run", ["run", self.art, "--tokens", "1,2,3"])],
            ["globals.kblob: tensor 'token_embedding' fails its CRC-32C check"])
        nv = "--no-verify"
        # golden dump computes the logits of every position; the first bad one is token 2's.
        self.assertRefusedEverywhere(
            [("golden dump", ["golden", "dump", self.art, "--tokens", "1,2,3", "--out", self.npy,
                              nv])],
            ["position 1: non-finite logit"])
        # eval scores [bos] + text + [eos]: eos is token 2, the last position.
        n_tokens = len(kiln("tokenize", self.art, "--text-file", self.text, nv)
                       .stdout.strip().split(","))
        self.assertRefusedEverywhere(
            [("eval", ["eval", self.art, "--text-file", self.text, nv])],
            ["%s:1: position %d: non-finite logit" % (self.text, n_tokens + 1)])
        self.assertRefusedEverywhere(
            [("calibrate", ["calibrate", self.art, "--tokens-file", self.prompts_with(2), "--out",
                            os.path.join(self.tmp, "stats.safetensors"), nv])],
            ["calibration prompt 2, position 2: non-finite logit"])
        # run's prefill computes the last position's logits only.
        self.assertRefusedEverywhere(
            [("run", ["run", self.art, "--tokens", "1,2,3", nv]),
             ("run --json", ["run", self.art, "--tokens", "1,2,3", "--json", nv])],
            ["position 2: non-finite logit"])
        # With several requests, the one at fault is named too (here the second, decoding from
        # its slot once it is fed token 2 -- or in its prefill, depending on the batch).
        prompts = os.path.join(self.tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("1,3\n4,2,5\n6,7\n")
        for packed in ([], ["--packed-prefill"]):
            self.assertRefusedEverywhere(
                [("run --prompts-file", ["run", self.art, "--prompts-file", prompts, "--slots",
                                         "3", nv] + packed)],
                ["request 2, position 2: non-finite logit"])
        self.assertCApi("--damaged", self.art, "token_embedding", "position 2: non-finite logit")


if __name__ == "__main__":
    unittest.main()
