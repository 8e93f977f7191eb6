#!/usr/bin/python3
"""End-to-end C API (issue 5, item 2): include/kiln/kiln.h driven from C.

Programs (built by meson next to the kiln binary):
  kiln_example ART PROMPTS_FILE SLOTS MAX_TOKENS [STOP_IDS]   (tools/examples/kiln_example.c)
      runs every line of PROMPTS_FILE ('[@ADAPTER ]id,id,...') with continuous batching over
      SLOTS slots, greedy, exactly as `kiln run --prompts-file` does, and prints per request in
      input order `tokens: t1,t2,... | logprobs: l1,l2,... | finish: REASON` (logprobs %.6f);
      on an error: exit 1 and one stderr line `kiln_example: error: MESSAGE`; bad usage: exit 2.
  kiln_c_api_check ART [ADAPTER]                               (tests/c_api/c_api_check.c)
      the API's contract: status codes and messages for NULL / out-of-range arguments and
      busy / free slots, prefix ownership, accessors, stop and length finishes, multisampling
      and bulk insert, packed prefill, adapters, caller sizes bounded before anything runs
      (threads above KILN_MAX_THREADS, a prompt length of 2^63, 10^12 samples: INVALID_ARGUMENT
      at once, no read past the caller's array); prints `N checks, M failed`, exit 0 iff M = 0.

Acceptance checked here: on a Llama fixture (with a run-time LoRA adapter used by some requests)
and a DeepSeek fixture, the example's tokens, finish reasons and log-probs (within 1e-5) equal
`kiln run ART --prompts-file F --slots 3 --max-tokens 12 --json` request by request -- without
stop ids (one request reaching the end of the context) and with stop ids that end requests at
different steps (so slots free and refill mid-flight); the contract checks pass on both
artifacts; a missing artifact, a token outside the vocabulary, an adapter the artifact does not
have and a missing prompts file each give exit 1 and one stderr line naming the culprit.
"""

import os
import random
import re
import shutil
import subprocess
import tempfile
import unittest

import common
from common import kiln, mf

import lora_ref as L  # noqa: E402  (common puts tests/reference on sys.path)
import make_deepseek_fixture as mdf  # noqa: E402

BIN_DIR = os.path.dirname(common.KILN)
EXAMPLE = os.path.join(BIN_DIR, "kiln_example")
CHECKER = os.path.join(BIN_DIR, "kiln_c_api_check")
SLOTS = 3
MAX_TOKENS = 12
LP_TOL = 1e-5
ADAPTER = "ad1"
LINE_RE = re.compile(r"^tokens: ([0-9,]*) \| logprobs: ([-0-9.,e]*) \| finish: (\w*)$")


def run(argv, timeout=60, env=None):
    p = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    return common.KilnResult([str(a) for a in argv], p.returncode,
                             p.stdout.decode("utf-8", "replace"),
                             p.stderr.decode("utf-8", "replace"))


def parse_example(res):
    out = []
    for line in res.stdout.splitlines():
        m = LINE_RE.match(line)
        if not m:
            raise AssertionError("kiln_example printed an unexpected line %r:\n%s"
                                 % (line, res.describe()))
        out.append({"tokens": [int(t) for t in m.group(1).split(",") if t],
                    "logprobs": [float(x) for x in m.group(2).split(",") if x],
                    "finish_reason": m.group(3)})
    return out


class CApiChecks:
    """The tests; mixed into one TestCase per fixture family."""

    VARIANT = None
    LORA = False  # export a run-time adapter and name it on some prompts
    _shared = None  # per class: (artifact, vocab, context, tmp) or a failure message

    def shared(self):
        cls = type(self)
        if isinstance(cls._shared, str):
            self.fail(cls._shared)
        if cls._shared is not None:
            return cls._shared
        common.require_kiln(self)
        for prog in (EXAMPLE, CHECKER):
            if not os.path.exists(prog):
                self.fail("%s not found (build it with `ninja -C build`)" % prog)
        tmp = tempfile.mkdtemp(prefix="kiln-capi-")
        cls.addClassCleanup(shutil.rmtree, tmp, True)
        try:
            v, mod = mdf.variant_by_name(cls.VARIANT), mdf
        except KeyError:
            v, mod = mf.variant_by_name(cls.VARIANT), mf
        fx = mod.write_fixture(v, os.path.join(tmp, "fixture"))
        art = os.path.join(tmp, "model.kiln")
        extra = []
        if cls.LORA:
            ad = L.write_adapter(fx, L.AdapterSpec(targets=("q", "v", "wo"), seed=7),
                                 os.path.join(tmp, "adapter"))
            extra = ["--lora", ad.directory, "--lora-name", ADAPTER]
        res = kiln("export", *fx.export_args(), "--out", art, *extra)
        if res.rc != 0:
            cls._shared = "%s: kiln export failed:\n%s" % (cls.VARIANT, res.describe())
            self.fail(cls._shared)
        cls._shared = (art, v.vocab_size, v.max_target_length, tmp)
        return cls._shared

    def prompts_file(self, name, lines):
        _, _, _, tmp = self.shared()
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def prompt_lines(self):
        _, vocab, ctx, _ = self.shared()
        rng = random.Random(5)
        lengths = (5, 17, 1, 30, 9, ctx - 4)  # the last one reaches the end of the context
        lines = []
        for i, n in enumerate(lengths):
            ids = ",".join(str(rng.randrange(vocab)) for _ in range(n))
            lines.append(("@%s " % ADAPTER if self.LORA and i % 2 == 1 else "") + ids)
        lines.insert(2, "")  # blank lines are skipped by both
        return lines

    def compare(self, prompts, stop=None):
        art = self.shared()[0]
        stop_args = ["--stop", ",".join(map(str, stop))] if stop else []
        cli = kiln("run", art, "--prompts-file", prompts, "--slots", SLOTS, "--max-tokens",
                   MAX_TOKENS, "--json", *stop_args)
        self.assertEqual(cli.rc, 0, cli.describe())
        want = common.parse_json_stdout(cli)["requests"]
        res = run([self.example(), art, prompts, SLOTS, MAX_TOKENS] + stop_args[1:],
                  env=self.example_env())
        self.assertEqual(res.rc, 0, res.describe())
        got = parse_example(res)
        self.assertEqual(len(got), len(want), res.describe())
        for i, (g, w) in enumerate(zip(got, want)):
            self.assertEqual(g["tokens"], w["tokens"], "request %d tokens" % i)
            self.assertEqual(g["finish_reason"], w["finish_reason"], "request %d finish" % i)
            self.assertEqual(len(g["logprobs"]), len(w["logprobs"]))
            for k, (a, b) in enumerate(zip(g["logprobs"], w["logprobs"])):
                self.assertLessEqual(abs(a - b), LP_TOL, "request %d logprob %d: %r vs %r"
                                     % (i, k, a, b))
        return want

    def example(self):
        return EXAMPLE

    def example_env(self):
        return common.child_env()

    # -- tests -----------------------------------------------------------------------------------

    def test_matches_kiln_run(self):
        prompts = self.prompts_file("prompts.txt", self.prompt_lines())
        want = self.compare(prompts)
        reasons = [r["finish_reason"] for r in want]
        self.assertEqual(reasons[:-1], ["length"] * (len(reasons) - 1))
        self.assertEqual(reasons[-1], "context")
        if self.LORA:
            self.assertEqual([r["adapter"] for r in want],
                             [None, ADAPTER, None, ADAPTER, None, ADAPTER])
        # stop ids that end requests 0 and 2 early (at different steps), so slots free and the
        # waiting requests enter while others are still decoding
        stop = [want[0]["tokens"][3], want[2]["tokens"][6]]
        want = self.compare(prompts, stop)
        reasons = [r["finish_reason"] for r in want]
        self.assertIn("stop", reasons)
        self.assertIn("length", reasons)
        self.assertGreater(len(set(len(r["tokens"]) for r in want)), 2)

    def test_api_contract(self):
        art = self.shared()[0]
        res = run([CHECKER, art] + ([ADAPTER] if self.LORA else []))
        self.assertEqual(res.rc, 0, res.describe())
        self.assertRegex(res.stdout, r"\d+ checks, 0 failed")

    def assertOneLineError(self, res, *needles):
        self.assertEqual(res.rc, 1, res.describe())
        self.assertEqual(len(res.stderr_lines), 1, res.describe())
        self.assertTrue(res.stderr_lines[0].startswith("kiln_example: error: "), res.describe())
        for n in needles:
            self.assertIn(n, res.stderr_lines[0], res.describe())
        self.assertEqual(res.stdout, "", res.describe())

    def test_errors(self):
        art, vocab, _, tmp = self.shared()
        good = self.prompts_file("good.txt", ["1,2,3"])
        missing = os.path.join(tmp, "no-such-artifact")
        self.assertOneLineError(run([EXAMPLE, missing, good, SLOTS, MAX_TOKENS]), missing)
        oov = self.prompts_file("oov.txt", ["1,2,3", "4,%d,5" % vocab])
        self.assertOneLineError(run([EXAMPLE, art, oov, SLOTS, MAX_TOKENS]), str(vocab),
                                "outside the vocabulary")
        unknown = self.prompts_file("unknown.txt", ["@nosuch 1,2,3"])
        self.assertOneLineError(run([EXAMPLE, art, unknown, SLOTS, MAX_TOKENS]), "nosuch")
        no_file = os.path.join(tmp, "no-such-prompts.txt")
        self.assertOneLineError(run([EXAMPLE, art, no_file, SLOTS, MAX_TOKENS]), no_file)
        res = run([EXAMPLE, art, good, 0, MAX_TOKENS])
        self.assertEqual(res.rc, 2, res.describe())
        res = run([EXAMPLE, art])
        self.assertEqual(res.rc, 2, res.describe())


class CApiLlama(CApiChecks, unittest.TestCase):
    VARIANT = "linen-scan1-f32"
    LORA = True


class CApiDeepSeek(CApiChecks, unittest.TestCase):
    VARIANT = "ds3-linen-scan1-f32"


class CApiInstalled(CApiChecks, unittest.TestCase):
    """`meson install` into a temporary folder, then the C example compiled from that folder with
    nothing but `pkg-config --cflags --libs kiln`, run against the installed libkiln.so and
    compared with `kiln run` as above; the library exports the C API's kiln_* functions only; the
    installed Python package imports in a fresh interpreter."""

    VARIANT = "linen-scan1-f32"
    LORA = True
    test_api_contract = None  # the same library; checked by the classes above
    test_errors = None
    _installed = None

    def installed(self):
        cls = type(self)
        if cls._installed is not None:
            return cls._installed
        build = os.path.dirname(os.path.abspath(common.KILN))
        dest = tempfile.mkdtemp(prefix="kiln-install-")
        cls.addClassCleanup(shutil.rmtree, dest, True)
        res = run(["meson", "install", "-C", build, "--no-rebuild", "--destdir", dest],
                  timeout=300)
        self.assertEqual(res.rc, 0, res.describe())
        found = {}
        for d, _, files in os.walk(dest):
            for f in files:
                found.setdefault(f, os.path.join(d, f))
        for name in ("kiln", "kiln.pc", "kiln.h", "libkiln.so"):
            self.assertIn(name, found, "meson install did not install %s (installed: %s)"
                          % (name, sorted(found)))
        self.assertTrue(found["kiln.h"].endswith(os.path.join("include", "kiln", "kiln.h")))
        pc_dir = os.path.dirname(found["kiln.pc"])
        env = dict(os.environ, PKG_CONFIG_SYSROOT_DIR=dest, PKG_CONFIG_PATH=pc_dir,
                   PKG_CONFIG_LIBDIR=pc_dir)
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "kiln"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.assertEqual(flags.returncode, 0, flags.stderr)
        exe = os.path.join(dest, "kiln_example")
        cc = subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror",
                             os.path.join(common.REPO, "tools", "examples", "kiln_example.c"),
                             "-o", exe] + flags.stdout.split(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        self.assertEqual(cc.returncode, 0, "cc %s:\n%s" % (flags.stdout, cc.stderr))
        lib_dir = os.path.dirname(found["libkiln.so"])
        run_env = common.child_env(LD_LIBRARY_PATH=lib_dir)
        cls._installed = (exe, found, run_env)
        return cls._installed

    def example(self):
        return self.installed()[0]

    def example_env(self):
        return self.installed()[2]

    def test_exports_only_the_c_api(self):
        lib = os.path.realpath(self.installed()[1]["libkiln.so"])
        nm = subprocess.run(["nm", "-D", "--defined-only", lib], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        self.assertEqual(nm.returncode, 0, nm.stderr)
        names = [line.split()[-1] for line in nm.stdout.splitlines() if line.strip()]
        self.assertIn("kiln_open", names)
        self.assertEqual([n for n in names if not n.startswith("kiln_")], [],
                         "libkiln.so exports more than the C API")

    def test_imports_the_installed_python_package(self):
        found = self.installed()[1]
        module = [f for f in found if f.startswith("kiln.cpython") and f.endswith(".so")]
        self.assertEqual(len(module), 1, "the Python package kiln was not installed: %s"
                         % sorted(found))
        site = os.path.dirname(found[module[0]])
        env = dict(os.environ, PYTHONPATH=site)
        res = subprocess.run(["/usr/bin/python3", "-c",
                              "import kiln, sys; print(kiln.__file__); "
                              "print(kiln.Engine, kiln.export, kiln.inspect, kiln.Error)"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=site)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertTrue(res.stdout.splitlines()[0].startswith(site), res.stdout)

    def test_links_the_installed_library(self):
        exe = self.example()
        ldd = subprocess.run(["ldd", exe], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=self.example_env())
        line = [x for x in ldd.stdout.splitlines() if "libkiln.so" in x]
        self.assertEqual(len(line), 1, ldd.stdout)
        self.assertIn(os.path.dirname(self.installed()[1]["libkiln.so"]), line[0])


if __name__ == "__main__":
    unittest.main()
