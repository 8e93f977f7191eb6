#!/usr/bin/python3
"""Damaged artifacts: `kiln inspect DIR --verify` and `kiln run` must refuse them with exit 1 and
one clear `kiln: error: ` line naming the file (and, for a checksum mismatch, the tensor)."""

import json
import os
import shutil
import struct
import unittest

import common
from common import kiln, mf

VARIANT = mf.BASE.replace(name="verify-base", seed=77)


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


class VerifyTest(common.TempDirCase):
    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.base = tempfile.mkdtemp(prefix="kiln-e2e-verify-")
        cls.export_error = None
        if not os.path.exists(common.KILN):
            cls.export_error = "kiln binary not found at %s" % common.KILN
            return
        fx = mf.write_fixture(VARIANT, os.path.join(cls.base, "fixture"))
        cls.good = os.path.join(cls.base, "good.kiln")
        res = kiln("export", *fx.export_args(), "--out", cls.good)
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
        with open(path, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)
            f.seek(pos)
            f.write(bytes([byte[0] ^ 0x5A]))

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

    def test_flipped_tensor_data_byte(self):
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
        res = kiln("inspect", self.art, "--verify")
        self.assertRefused(res, "layer-000.kblob", also=[name])

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


if __name__ == "__main__":
    unittest.main()
