#!/usr/bin/python3
"""Shared helpers for kiln's end-to-end tests (stdlib unittest + numpy)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
REF_DIR = os.path.join(REPO, "tests", "reference")
if REF_DIR not in sys.path:
    sys.path.insert(0, REF_DIR)

import llama_ref as lr  # noqa: E402
import make_fixture as mf  # noqa: E402
import safetensors_io as st  # noqa: E402

__all__ = ["lr", "mf", "st", "REPO", "KILN", "kiln", "KilnResult", "tokens_arg",
           "parse_json_stdout", "TempDirCase", "require_kiln", "SANITIZED", "PACKAGE_LOADABLE",
           "child_env", "kiln_package", "engine_logits"]


def kiln_path():
    p = os.environ.get("KILN", os.path.join("build", "kiln"))
    if not os.path.isabs(p):
        p = os.path.join(REPO, p)
    return p


KILN = kiln_path()
TIMEOUT = float(os.environ.get("KILN_TEST_TIMEOUT", "120"))
# tools/test --sanitize: the instrumented Python package loads only into an interpreter with
# ASan's runtime preloaded, which tools/test does for test_python and test_c_api alone (with
# LeakSanitizer off in the interpreter, whose own allocations at exit are not kiln's, and on again
# in every command they run: KILN_CHILD_ASAN_OPTIONS). Elsewhere the package is not used there.
SANITIZED = os.path.basename(os.path.dirname(KILN)) == "build-sanitize"
PACKAGE_LOADABLE = not SANITIZED or "libasan" in os.environ.get("LD_PRELOAD", "")


def child_env(**extra):
    """The environment for a program a test runs: os.environ plus `extra`, with the ASan options
    of KILN_CHILD_ASAN_OPTIONS when tools/test set them (see PACKAGE_LOADABLE)."""
    env = dict(os.environ, **extra)
    if "KILN_CHILD_ASAN_OPTIONS" in env:
        env["ASAN_OPTIONS"] = env["KILN_CHILD_ASAN_OPTIONS"]
    return env


def kiln_package():
    """The Python package `kiln` of the build that KILN belongs to (BUILD/python)."""
    directory = os.path.join(os.path.dirname(KILN), "python")
    if directory not in sys.path:
        sys.path.insert(0, directory)
    import kiln as package  # noqa: E402
    return package


def file_ubsan_report(args, stderr):
    """Under `tools/test --sanitize`: GCC's UBSan runtime, loaded beside ASan's, prints its reports
    to stderr whatever log_path says, so a process's stderr holding one is filed where the ASan
    reports go (KILN_UBSAN_REPORT_DIR) and counted there, even when the test expected a failure."""
    directory = os.environ.get("KILN_UBSAN_REPORT_DIR")
    if not directory or "runtime error:" not in stderr:
        return
    fd, _ = tempfile.mkstemp(prefix="ubsan-stderr.", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write("$ %s\n%s" % (" ".join(args), stderr))


class KilnResult:
    def __init__(self, args, rc, stdout, stderr):
        self.args, self.rc, self.stdout, self.stderr = args, rc, stdout, stderr
        file_ubsan_report(args, stderr)

    def describe(self):
        cmd = " ".join(self.args)
        return "$ %s\n  exit %s\n  stdout: %s\n  stderr: %s" % (
            cmd, self.rc, self.stdout.strip()[:2000] or "(empty)",
            self.stderr.strip()[:2000] or "(empty)")

    @property
    def stderr_lines(self):
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def kiln(*args, timeout=None):
    """Run the kiln binary; never raises on a non-zero exit (returns KilnResult)."""
    argv = [KILN] + [str(a) for a in args]
    if not os.path.exists(KILN):
        return KilnResult(argv, 127, "", "kiln binary not found at %s (set KILN=...)" % KILN)
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout or TIMEOUT, stdin=subprocess.DEVNULL, env=child_env())
        return KilnResult(argv, p.returncode, p.stdout.decode("utf-8", "replace"),
                          p.stderr.decode("utf-8", "replace"))
    except subprocess.TimeoutExpired as e:
        return KilnResult(argv, "timeout", (e.stdout or b"").decode("utf-8", "replace"),
                          (e.stderr or b"").decode("utf-8", "replace"))
    except OSError as e:
        return KilnResult(argv, 126, "", "cannot execute %s: %s" % (KILN, e))


def flip_byte(path, pos, mask):
    """XORs the byte at offset pos of the file with mask, in place."""
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ mask]))


def tokens_arg(tokens):
    return ",".join(str(int(t)) for t in tokens)


def parse_json_stdout(res):
    text = res.stdout.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    # tolerate log lines before the object, but report it
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    raise AssertionError("stdout is not one JSON object:\n" + res.describe())


class TempDirCase(unittest.TestCase):
    """TestCase with a per-test temporary directory self.tmp (removed afterwards)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kiln-e2e-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def assertKilnOk(self, res, what=""):
        if res.rc != 0:
            self.fail("%s failed:\n%s" % (what or "kiln", res.describe()))


def engine_logits(tc, art, tokens, adapter=None, what="logits"):
    """kiln's prefill logits of `tokens` (float32 [T, vocab]) on artifact `art`, through
    Engine.logits, which equals `kiln golden dump` bit for bit (test_python checks it). Under
    tools/test --sanitize, where the package is not loaded, through `kiln golden dump` itself, so
    the instrumented engine computes them."""
    if not SANITIZED:  # the CLI there: the instrumented kiln leak-checks every computation
        package = kiln_package()
        try:
            return package.Engine(art).logits(list(tokens), adapter=adapter)
        except package.Error as e:
            tc.fail("%s: kiln.Error: %s" % (what, e))
    fd, npy = tempfile.mkstemp(prefix="kiln-golden-", suffix=".npy")
    os.close(fd)
    try:
        extra = ["--adapter", adapter] if adapter else []
        res = kiln("golden", "dump", art, "--tokens", tokens_arg(tokens), "--out", npy, *extra)
        if res.rc != 0:
            tc.fail("%s: kiln golden dump failed:\n%s" % (what, res.describe()))
        return np.load(npy)
    finally:
        os.unlink(npy)


def require_kiln(testcase):
    if not os.path.exists(KILN):
        testcase.fail("kiln binary not found at %s (build it with `ninja -C build kiln` or set "
                      "KILN=/path/to/kiln)" % KILN)


# Acceptance tolerances shared by the family suites: max |Δlogit| ≤ REL_TOL · max |reference logit|,
# and top-1 compared wherever the reference's top-1/top-2 gap is at least MIN_GAP of the row max.
REL_TOL = 0.02
MIN_GAP = 0.03


def log(msg):
    """Progress lines of the e2e suite (measured tolerances), flushed so they interleave with
    unittest's own output."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def describe_row(row, k=3):
    """The k largest logits of one row as 'id:value, ...' (for failure messages)."""
    import numpy as np
    idx = np.argsort(-row, kind="stable")[:k]
    return ", ".join("%d:%.4f" % (i, row[i]) for i in idx)


def check_long_logits(testcase, name, got, ref, length, log):
    """Long prompts: near-tie rows (gap < MIN_GAP) are exempt from the top-1 check; returns ratio."""
    import numpy as np
    testcase.assertEqual(got.shape, ref.shape)
    clear = lr.relative_gaps(ref) >= MIN_GAP
    bad = np.nonzero((got.argmax(-1) != ref.argmax(-1)) & clear)[0]
    delta = np.abs(got.astype(np.float64) - ref)
    ratio = float(delta.max() / np.abs(ref).max())
    log("    %-36s T=%d max|dlogit| = %.5f ratio = %.5f; %d near-tie rows not top-1 compared"
        % (name, length, delta.max(), ratio, int((~clear).sum())))
    testcase.assertEqual(len(bad), 0, "%s: top-1 differs at positions %s" % (name, bad[:10].tolist()))
    testcase.assertLessEqual(ratio, REL_TOL, "%s: max|dlogit| ratio %.4f at pos %d"
                             % (name, ratio, int(delta.max(-1).argmax())))
    return ratio


def add_variant_tests(cls, variants):
    """Adds one test method per fixture variant to `cls`, each calling cls.run_variant(v)."""
    def make(variant):
        def test(self):
            self.run_variant(variant)
        test.__doc__ = "variant %s" % variant.name
        return test
    for v in variants:
        setattr(cls, "test_" + v.name.replace("-", "_").replace(".", "_"), make(v))
