#!/usr/bin/python3
"""The Python package `kiln` (python/kiln_module.cpp), imported from the build tree
(build/python) and checked against the `kiln` program on the same artifacts:

  * kiln.export returns the summary and writes the artifact `kiln export` writes (same blobs);
    kiln.inspect equals `kiln inspect --json`;
  * Engine.logits equals `kiln golden dump` bit for bit, on a Llama (with a run-time adapter) and a
    DeepSeek fixture;
  * prefill / insert / generate / release give `kiln run --tokens`'s greedy tokens and log-probs;
    prefill_multisampling + bulk_insert and prefill_concat agree with plain prefills;
    load_adapter / unload_adapter; generate_text and the tokenizer on the default model give
    `kiln run --prompt`'s text;
  * bad inputs (a missing artifact, a token outside the vocabulary, a busy slot, an unknown
    adapter) raise kiln.Error with the message the CLI prints after "kiln: error: ";
  * two engines on two Python threads (the GIL released in every pass), 200 generate steps each,
    give exactly the tokens and log-probs of each alone.
"""

import json
import re
import os
import shutil
import subprocess
import tempfile
import threading
import unittest

import numpy as np

import common
from common import kiln, mf

import lora_ref as L  # noqa: E402  (common puts tests/reference on sys.path)
import make_deepseek_fixture as mdf  # noqa: E402

PY_DIR = os.path.join(os.path.dirname(common.KILN), "python")
ADAPTER = "ad1"


def cli_error(res):
    """The CLI's one-line message without its "kiln: error: " prefix."""
    lines = res.stderr_lines
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), res.describe()
    return lines[0][len("kiln: error: "):]


class Shared:
    """Artifacts made once for the whole module."""
    tmp = None
    llama = None      # (fixture, artifact) with run-time adapter ADAPTER
    deepseek = None
    default = None    # the default model with its tokenizer


def setUpModule():
    if not common.PACKAGE_LOADABLE:
        return
    Shared.tmp = tempfile.mkdtemp(prefix="kiln-python-")
    fx = mf.write_fixture(mf.variant_by_name("linen-scan1-f32"), os.path.join(Shared.tmp, "fx"))
    ad = L.write_adapter(fx, L.AdapterSpec(targets=("q", "v", "wo"), seed=7),
                         os.path.join(Shared.tmp, "adapter"))
    art = os.path.join(Shared.tmp, "llama.kiln")
    res = kiln("export", *fx.export_args(), "--out", art, "--lora", ad.directory,
               "--lora-name", ADAPTER)
    assert res.rc == 0, res.describe()
    Shared.llama = (fx, art, ad)
    dfx = mdf.write_fixture(mdf.variant_by_name("ds3-linen-scan1-f32"),
                            os.path.join(Shared.tmp, "dfx"))
    dart = os.path.join(Shared.tmp, "deepseek.kiln")
    res = kiln("export", *dfx.export_args(), "--out", dart)
    assert res.rc == 0, res.describe()
    Shared.deepseek = (dfx, dart)
    m = os.path.join(common.REPO, "models", "default")
    part = os.path.join(Shared.tmp, "default.kiln")
    res = kiln("export", "--checkpoint", os.path.join(m, "model.safetensors"), "--config",
               os.path.join(m, "config.yml"), "--tokenizer", os.path.join(m, "tokenizer.model"),
               "--out", part)
    assert res.rc == 0, res.describe()
    Shared.default = part


def tearDownModule():
    if Shared.tmp:
        shutil.rmtree(Shared.tmp, True)


class PythonPackage(unittest.TestCase):
    def setUp(self):
        if not common.PACKAGE_LOADABLE:
            self.skipTest("the instrumented package needs ASan's runtime preloaded into python3 "
                          "(tools/test --sanitize does it for this module)")
        common.require_kiln(self)
        self.k = common.kiln_package()

    # -- export and inspect ------------------------------------------------------------------------

    def test_export_and_inspect_match_the_cli(self):
        fx, art, _ = Shared.llama
        out = os.path.join(Shared.tmp, "from-python.kiln")
        v = fx.variant
        summary = self.k.export([p for p in fx.checkpoint_args], fx.config_path, out,
                                set=list(v.set_overrides), force=True)
        self.assertEqual(summary["layers"], fx.config["num_decoder_layers"])
        self.assertEqual(summary["out"], out)
        self.assertIsNone(summary["qk_clip"])
        for name in sorted(os.listdir(art)):
            if name.endswith(".kblob"):
                with open(os.path.join(art, name), "rb") as a, \
                        open(os.path.join(out, name), "rb") as b:
                    self.assertEqual(a.read(), b.read(), name)
        got = self.k.inspect(art)
        res = kiln("inspect", art, "--json")
        self.assertEqual(res.rc, 0, res.describe())
        self.assertEqual(got, json.loads(res.stdout))
        # the same error as `kiln export` for a missing checkpoint
        missing = os.path.join(Shared.tmp, "missing.safetensors")
        res = kiln("export", "--checkpoint", missing, "--config", fx.config_path, "--out",
                   os.path.join(Shared.tmp, "never.kiln"))
        with self.assertRaises(self.k.Error) as cm:
            self.k.export([missing], fx.config_path, os.path.join(Shared.tmp, "never.kiln"))
        self.assertEqual(str(cm.exception), cli_error(res))
        self.assertFalse(os.path.exists(os.path.join(Shared.tmp, "never.kiln")))

    def test_export_refuses_the_cli_combinations_and_records_the_cli_options(self):
        fx, _, ad = Shared.llama
        never = os.path.join(Shared.tmp, "never.kiln")
        base = dict(checkpoint=list(fx.checkpoint_args), config=fx.config_path, out=never)
        cli_base = ["export", *fx.export_args(), "--out", never]
        prompts = os.path.join(Shared.tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("1,2,3\n")
        cases = [  # (CLI arguments, Python keyword arguments)
            (["--set", "novalue"], dict(set=["novalue"])),
            (["--lora", ad.directory, "--merge-lora", "--lora-name", "x"],
             dict(lora=[ad.directory], merge_lora=True, lora_name=["x"])),
            (["--merge-lora"], dict(merge_lora=True)),
            (["--lora", ad.directory], dict(lora=[ad.directory])),
            (["--lora-scale", "2"], dict(lora_scale=2.0)),
            (["--qk-clip-calibrate", prompts, "--max-logits", "s.safetensors",
              "--qk-clip-threshold", "30"],
             dict(qk_clip_calibrate=prompts, max_logits=["s.safetensors"], qk_clip_threshold=30.0)),
            (["--qk-clip-calibrate", prompts], dict(qk_clip_calibrate=prompts)),
            (["--qk-clip-calibrate", prompts, "--qk-clip-threshold", "30", "--qk-clip-per-group"],
             dict(qk_clip_calibrate=prompts, qk_clip_threshold=30.0, qk_clip_per_group=True)),
        ]
        for cli_args, kwargs in cases:
            res = kiln(*cli_base, *cli_args)
            self.assertEqual(res.rc, 2, res.describe())
            cli_message = cli_error(res)
            prefix, suffix = "kiln export: ", " (see 'kiln export --help')"
            self.assertTrue(cli_message.startswith(prefix) and cli_message.endswith(suffix),
                            cli_message)
            # the same words, the options named as Python names them
            want = re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"),
                          cli_message[len(prefix):-len(suffix)])
            with self.assertRaises(self.k.Error) as cm:
                self.k.export(**base, **kwargs)
            self.assertEqual(str(cm.exception), want, cli_args)
            self.assertFalse(os.path.exists(never))

        # The manifest records the options in the CLI's spelling, whichever front end exported.
        via_cli = os.path.join(Shared.tmp, "prov-cli.kiln")
        via_py = os.path.join(Shared.tmp, "prov-py.kiln")
        res = kiln("export", *fx.export_args(), "--out", via_cli, "--lora", ad.directory,
                   "--lora-name", "a", "--lora-scale", "0.5", "--qk-clip-mode", "query",
                   "--force")
        self.assertEqual(res.rc, 0, res.describe())
        self.k.export(list(fx.checkpoint_args), fx.config_path, via_cli.replace("cli", "py"),
                      set=list(fx.variant.set_overrides), lora=[ad.directory], lora_name=["a"],
                      lora_scale=0.5, qk_clip_mode="query", force=True)
        options = [self.k.inspect(d)["provenance"]["options"] for d in (via_cli, via_py)]
        self.assertEqual(options[0], options[1])
        self.assertIn("--lora-scale 0.5", options[1])

    # -- golden logits -----------------------------------------------------------------------------

    def golden(self, art, tokens, adapter=None):
        path = os.path.join(Shared.tmp, "golden.npy")
        args = ["golden", "dump", art, "--tokens", ",".join(map(str, tokens)), "--out", path]
        if adapter:
            args += ["--adapter", adapter]
        res = kiln(*args)
        self.assertEqual(res.rc, 0, res.describe())
        return np.load(path)

    def test_logits_equal_golden_dump_bit_for_bit(self):
        tokens = [5, 9, 200, 31, 7, 100, 3, 3, 64, 17, 18, 19, 20, 21, 22, 23, 24, 25]
        for art, adapter in ((Shared.llama[1], None), (Shared.llama[1], ADAPTER),
                             (Shared.deepseek[1], None)):
            with self.subTest(art=os.path.basename(art), adapter=adapter):
                e = self.k.Engine(art)
                got = e.logits(tokens, adapter=adapter)
                want = self.golden(art, tokens, adapter)
                self.assertEqual(got.dtype, np.float32)
                self.assertEqual(got.shape, (len(tokens), e.vocab_size))
                self.assertTrue(np.array_equal(got.view(np.uint32), want.view(np.uint32)))

    # -- serving API -------------------------------------------------------------------------------

    def test_prefill_insert_generate_release_match_kiln_run(self):
        art = Shared.llama[1]
        tokens = [3, 14, 15, 92, 65, 35]
        res = kiln("run", art, "--tokens", ",".join(map(str, tokens)), "--max-tokens", 12,
                   "--json")
        self.assertEqual(res.rc, 0, res.describe())
        want = json.loads(res.stdout)
        e = self.k.Engine(art, slots=2)
        p = e.prefill(tokens, max_tokens=12)
        self.assertEqual(p.next_pos, len(tokens))
        self.assertEqual(p.logits.shape, (e.vocab_size,))
        first = e.insert(p, 1)
        self.assertEqual(first["slot"], 1)
        got, logps = [first["token"]], [first["logp"]]
        finish = first["finish"]
        while finish is None:
            (t,) = e.generate()
            got.append(t["token"])
            logps.append(t["logp"])
            finish = t["finish"]
        self.assertEqual(got, want["tokens"])
        self.assertEqual(finish, want["finish_reason"])
        for a, b in zip(logps, want["logprobs"]):
            self.assertAlmostEqual(a, b, delta=1e-5)
        e.release(1)
        self.assertEqual(e.generate(), [])
        with self.assertRaises(self.k.Error):
            e.insert(p, 0)  # a prefix is consumed by its insert

    def test_multisampling_and_concat(self):
        art = Shared.llama[1]
        e = self.k.Engine(art, slots=3)
        prompts = [[5, 9, 200, 31], [1, 2, 3, 4, 5, 6, 7], [250, 4]]
        singles = [e.prefill(t, sampling="weighted", seed=3) for t in prompts]
        packed = e.prefill_concat(prompts, sampling="weighted", seed=3)
        for s, c in zip(singles, packed):
            self.assertEqual(s.tokens, c.tokens)
            self.assertTrue(np.array_equal(s.logits, c.logits))
        m = e.prefill_multisampling(prompts[0], 3, sampling="weighted", seed=3)
        self.assertEqual(len(m.tokens), 3)
        self.assertEqual(m.tokens[0], singles[0].tokens[0])  # sample 0 is the plain prefill
        sampled = list(m.tokens)
        firsts = e.bulk_insert(m, [0, 1, 2])
        self.assertEqual([f["slot"] for f in firsts], [0, 1, 2])
        self.assertEqual([f["token"] for f in firsts], sampled)
        self.assertEqual(len(e.generate()), 3)

    def test_adapters(self):
        art = Shared.llama[1]
        e = self.k.Engine(art)
        self.assertEqual(e.loaded_adapters, [])
        e.load_adapter(ADAPTER)
        self.assertEqual(e.loaded_adapters, [ADAPTER])
        base = e.prefill([1, 2, 3]).logits.copy()
        tuned = e.prefill([1, 2, 3], adapter=ADAPTER).logits.copy()
        self.assertFalse(np.array_equal(base, tuned))
        e.unload_adapter(ADAPTER)
        self.assertEqual(e.loaded_adapters, [])
        with self.assertRaises(self.k.Error):
            e.prefill([1, 2, 3], adapter=ADAPTER)

    def test_generate_text_and_tokenizer(self):
        art = Shared.default
        prompt = "The quick brown fox"
        res = kiln("run", art, "--prompt", prompt, "--max-tokens", 16, "--json")
        self.assertEqual(res.rc, 0, res.describe())
        want = json.loads(res.stdout)
        e = self.k.Engine(art)
        tok = e.tokenizer
        self.assertIsNotNone(tok)
        ids = tok.encode(prompt)
        self.assertEqual([tok.bos_id] + ids if tok.bos_id >= 0 else ids, want["prompt_ids"])
        self.assertEqual(tok.decode(ids), prompt)
        text = "".join(e.generate_text(prompt, 16))
        self.assertEqual(text, want["text"])
        self.assertIsNone(self.k.Engine(Shared.llama[1]).tokenizer)

    # -- errors ------------------------------------------------------------------------------------

    def test_errors_carry_the_cli_message(self):
        art = Shared.llama[1]
        missing = os.path.join(Shared.tmp, "no-such.kiln")
        res = kiln("golden", "dump", missing, "--tokens", "1", "--out",
                   os.path.join(Shared.tmp, "x.npy"))
        with self.assertRaises(self.k.Error) as cm:
            self.k.Engine(missing)
        self.assertEqual(str(cm.exception), cli_error(res))

        e = self.k.Engine(art, slots=1)
        vocab = e.vocab_size
        res = kiln("golden", "dump", art, "--tokens", "1,%d" % vocab, "--out",
                   os.path.join(Shared.tmp, "x.npy"))
        with self.assertRaises(self.k.Error) as cm:
            e.logits([1, vocab])
        self.assertEqual(str(cm.exception), cli_error(res))

        res = kiln("golden", "dump", art, "--tokens", "1,2", "--adapter", "nosuch", "--out",
                   os.path.join(Shared.tmp, "x.npy"))
        with self.assertRaises(self.k.Error) as cm:
            e.logits([1, 2], adapter="nosuch")
        self.assertEqual(str(cm.exception), cli_error(res))

        e.insert(e.prefill([1, 2, 3], max_tokens=4), 0)
        with self.assertRaises(self.k.Error) as cm:
            e.insert(e.prefill([4, 5]), 0)
        self.assertIn("slot 0", str(cm.exception))
        self.assertIn("busy", str(cm.exception))

    def test_the_readme_snippet_runs(self):
        readme = open(os.path.join(common.REPO, "README.md"), encoding="utf-8").read()
        section = readme.split("## Use from Python", 1)[1]
        code = section.split("```python\n", 1)[1].split("```", 1)[0]
        work = tempfile.mkdtemp(dir=Shared.tmp)
        os.symlink(os.path.join(common.REPO, "models"), os.path.join(work, "models"))
        env = dict(os.environ, PYTHONPATH=PY_DIR)
        res = subprocess.run(["/usr/bin/python3", "-c", code], cwd=work, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             timeout=300)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertTrue(res.stdout.strip(), "the snippet printed nothing")

    def test_the_pytest_example_passes(self):
        env = dict(os.environ, PYTHONPATH=PY_DIR)
        res = subprocess.run(["/usr/bin/python3", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              os.path.join(common.REPO, "python", "tests")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=600)
        self.assertEqual(res.returncode, 0, res.stdout)
        self.assertIn("3 passed", res.stdout)

    # -- threads -----------------------------------------------------------------------------------

    def steps(self, art, seed, threads, n=200):
        """n generate steps on one slot, requests one after another; (token, logp) of each."""
        e = self.k.Engine(art, threads=threads)
        out = []
        r = 0
        while len(out) < n:
            prompt = [(seed * 31 + r * 7 + i) % 256 for i in range(10)]
            first = e.insert(e.prefill(prompt, sampling="composite", temperature=0.9, top_k=50,
                                       top_p=0.95, seed=seed + r, max_tokens=60), 0)
            finish = first["finish"]
            while finish is None and len(out) < n:
                (t,) = e.generate()
                out.append((t["token"], t["logp"]))
                finish = t["finish"]
            e.release(0)
            r += 1
        return out

    def test_two_engines_on_two_threads(self):
        a, b = Shared.llama[1], Shared.deepseek[1]
        # Different thread counts: one engine's OpenMP team must not change the other's results.
        alone = [self.steps(a, 1, 2), self.steps(b, 2, 1)]
        side = [None, None]

        def work(i, art, seed, threads):
            side[i] = self.steps(art, seed, threads)

        threads = [threading.Thread(target=work, args=(0, a, 1, 2)),
                   threading.Thread(target=work, args=(1, b, 2, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(side[0], alone[0])  # exact: tokens and float log-probs
        self.assertEqual(side[1], alone[1])


if __name__ == "__main__":
    unittest.main()
