#!/usr/bin/python3
"""Seed corpora of kiln's fuzz targets (tests/fuzz/fuzz_*.cpp): small valid inputs of each kind,
made by the same tools as the tests' fixtures, never committed.

    make_seeds.py --kiln build/kiln --out DIR     # DIR/<target>/<seed>, DIR emptied first
    make_seeds.py unpack BUNDLE DIR                # a bundle input's files into DIR (to look at)

The checkpoints, configs and adapters come from tests/reference (make_fixture.py,
make_deepseek_fixture.py, lora_ref.py), shrunk to a few KB so that a fuzzer mutates headers
rather than weights; the artifacts, blobs and golden logits from `kiln export` and
`kiln golden dump`; the other .npy files from numpy itself. Targets that read a directory take a
bundle (fuzz_common.h): repeated {u8 name length, name, u32 LE data length, data}.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "reference"))

import lora_ref  # noqa: E402
import make_deepseek_fixture as mdf  # noqa: E402
import make_fixture as mf  # noqa: E402
import safetensors_io as st  # noqa: E402

# Small enough that a seed is a few KB, large enough for GQA (2 query heads per kv head).
TINY_LLAMA = dict(emb_dim=8, num_query_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=16,
                  num_decoder_layers=2, vocab_size=32, max_target_length=16)
TINY_DEEPSEEK = dict(emb_dim=16, num_query_heads=2, num_decoder_layers=2,
                     first_num_dense_layers=1, mlp_dim=16, moe_mlp_dim=8, num_experts=4,
                     num_experts_per_tok=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                     qk_rope_head_dim=4, v_head_dim=4, vocab_size=32, max_target_length=16)


def pack_bundle(files):
    """files: [(name, bytes)] in order -> one bundle input."""
    out = bytearray()
    for name, data in files:
        raw = name.encode()
        out += bytes([len(raw)]) + raw + struct.pack("<I", len(data)) + data
    return bytes(out)


def unpack_bundle(data):
    """The inverse of pack_bundle, as lenient as the C++ reader (a short file takes what is left)."""
    files, pos = [], 0
    while pos < len(data) and len(files) < 32:
        n = data[pos]
        pos += 1
        if len(data) - pos < n + 4:
            break
        name = data[pos:pos + n].decode("utf-8", "replace")
        (length,) = struct.unpack("<I", data[pos + n:pos + n + 4])
        pos += n + 4
        files.append((name, data[pos:pos + length]))
        pos += length
    return files


def read(path):
    with open(path, "rb") as f:
        return f.read()


class Seeds:
    def __init__(self, out, kiln):
        self.out, self.kiln = out, kiln
        self.work = tempfile.mkdtemp(prefix="kiln-seeds-")

    def add(self, target, name, data):
        d = os.path.join(self.out, target)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)

    def tmp(self, name):
        return os.path.join(self.work, name)

    def run_kiln(self, *args):
        p = subprocess.run([self.kiln] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0:
            raise RuntimeError("kiln %s: exit %d: %s" % (" ".join(map(str, args)), p.returncode,
                                                         p.stderr.decode(errors="replace").strip()))
        # Silent on success; anything else (a sanitizer report, say) is for the caller to see.
        sys.stderr.write(p.stderr.decode(errors="replace"))

    # ---- checkpoints and configs -------------------------------------------------------------
    def checkpoints_and_configs(self):
        llama = [
            mf.BASE.replace(name="tiny-f32", **TINY_LLAMA),
            mf.BASE.replace(name="tiny-bf16-nnx-slash", layout="nnx", sep="/", dtype="bf16",
                            scan_axis=0, **TINY_LLAMA),
            mf.BASE.replace(name="tiny-f16-unrolled", dtype="f16", scanned=False, **TINY_LLAMA),
            mf.BASE.replace(name="tiny-qwen3-tied", decoder_block="qwen3",
                            logits_via_embedding=True, context_sensitive=False, **TINY_LLAMA),
            mf.BASE.replace(name="tiny-llama31-yaml", model_name="llama3.1-tiny",
                            rope_max_timescale=500000.0, config_format="yaml", **TINY_LLAMA),
        ]
        fixtures = {}
        for v in llama:
            fx = mf.write_fixture(v, self.tmp(v.name))
            fixtures[v.name] = fx
            for path in fx.checkpoint_files:
                self.add("safetensors", v.name + ".safetensors", read(path))
            kind = "config_yaml" if v.config_format == "yaml" else "config_json"
            self.add(kind, v.name + os.path.splitext(fx.config_path)[1], read(fx.config_path))
            if v.config_format != "yaml":
                self.add("config_yaml", v.name + ".yml", mf.config_yaml(v).encode())

        ds = mdf.DSVariant(name="tiny-deepseek", **TINY_DEEPSEEK)
        fx = mdf.write_fixture(ds, self.tmp(ds.name))
        fixtures[ds.name] = fx
        self.add("safetensors", ds.name + ".safetensors", read(fx.checkpoint_files[0]))
        self.add("config_json", ds.name + ".json", read(fx.config_path))
        self.add("config_yaml", "default-model.yml",
                 read(os.path.join(REPO, "models", "default", "config.yml")))
        self.add("safetensors", "max-logits.safetensors",
                 read(os.path.join(REPO, "models", "default", "max_logits.safetensors")))
        # Edge cases the reader accepts: a zero-size tensor, a scalar, no tensors at all.
        path = self.tmp("edge.safetensors")
        st.write_safetensors(path, {"empty": np.zeros((0, 3), np.float32),
                                    "scalar": np.array(1.5, np.float32)}, metadata={"a": "b"})
        self.add("safetensors", "edge.safetensors", read(path))
        st.write_safetensors(path, {})
        self.add("safetensors", "no-tensors.safetensors", read(path))

        sharded = mf.BASE.replace(name="tiny-sharded", shards=3, **TINY_LLAMA)
        fx = mf.write_fixture(sharded, self.tmp(sharded.name))
        index = fx.checkpoint_args[0]
        files = [(os.path.basename(index), read(index))]
        files += [(os.path.basename(p), read(p)) for p in fx.checkpoint_files]
        self.add("index", "tiny-sharded", pack_bundle(files))
        return fixtures

    # ---- adapters ----------------------------------------------------------------------------
    def adapters(self, fixtures):
        specs = {
            "adapter_maxtext": [
                ("llama-qv", "tiny-f32", lora_ref.AdapterSpec(targets=("q", "v"), r=2, seed=1)),
                ("llama-all-nnx-unrolled", "tiny-f32",
                 lora_ref.AdapterSpec(targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo"), r=2,
                                      layout="nnx", scanned=False, names="path", seed=2)),
                ("deepseek-mla", "tiny-deepseek",
                 lora_ref.AdapterSpec(targets=("wq_a", "wq_b", "wkv_a", "wkv_b", "o"), r=2,
                                      dtype="bf16", seed=3)),
            ],
            "adapter_peft": [
                ("llama-patterns", "tiny-f32",
                 lora_ref.AdapterSpec(fmt="peft", targets=("q", "k", "wi_0"), r=2,
                                      rank_pattern={"q_proj": 3}, alpha_pattern={"k_proj": 4.0},
                                      seed=4)),
                ("llama31-rslora", "tiny-llama31-yaml",
                 lora_ref.AdapterSpec(fmt="peft", targets=("q", "o", "wo"), r=2,
                                      use_rslora=True, seed=5)),
                ("deepseek", "tiny-deepseek",
                 lora_ref.AdapterSpec(fmt="peft", targets=("wq_b", "wkv_b"), r=2, seed=6)),
            ],
        }
        for target, entries in specs.items():
            for name, base, spec in entries:
                fx = fixtures[base]
                ad = lora_ref.write_adapter(fx, spec, self.tmp("adapter-" + name))
                # The harness reads the base config as config.json: a YAML base is re-read as the
                # reference resolves it.
                cfg = read(fx.config_path) if fx.config_path.endswith(".json") else \
                    json.dumps(fx.config).encode()
                files = [("config.json", cfg)]
                for f in sorted(os.listdir(ad.directory)):
                    files.append(("adapter/" + f, read(os.path.join(ad.directory, f))))
                self.add(target, name, pack_bundle(files))

    # ---- artifacts, blobs, manifests, golden logits ------------------------------------------
    def artifacts(self, fixtures):
        prompts = self.tmp("prompts.txt")
        with open(prompts, "w") as f:
            f.write("1,2,3,4\n5,6,7\n")
        exports = [
            ("llama", fixtures["tiny-f32"], []),
            ("qwen3-tied", fixtures["tiny-qwen3-tied"], []),
            ("deepseek-qkclip", fixtures["tiny-deepseek"],
             ["--qk-clip-threshold", "1.0", "--qk-clip-calibrate", prompts]),
        ]
        lora = lora_ref.write_adapter(fixtures["tiny-f32"],
                                      lora_ref.AdapterSpec(targets=("q", "v"), r=2, seed=7),
                                      self.tmp("export-adapter"))
        exports.append(("llama-adapter", fixtures["tiny-f32"],
                        ["--lora", lora.directory, "--lora-name", "psalms"]))
        for name, fx, extra in exports:
            art = self.tmp("art-" + name)
            self.run_kiln("export", *fx.export_args(), "--out", art, *extra)
            manifest = read(os.path.join(art, "manifest.kfb"))
            self.add("manifest", name + ".kfb", manifest)
            # Every file of the artifact, whatever it holds besides the manifest and the blobs.
            files = [("manifest.kfb", manifest)]
            for root, _, names in sorted(os.walk(art)):
                for n in sorted(names):
                    path = os.path.join(root, n)
                    rel = os.path.relpath(path, art)
                    if rel == "manifest.kfb":
                        continue
                    files.append((rel, read(path)))
                    if n.endswith(".kblob"):
                        self.add("blob", "%s-%s" % (name, rel.replace("/", "-")), read(path))
            self.add("artifact", name, pack_bundle(files))
            if name == "llama":
                golden = self.tmp("golden.npy")
                self.run_kiln("golden", "dump", art, "--tokens", "1,2,3", "--out", golden)
                self.add("npy", "golden-dump.npy", read(golden))

    def numpy_files(self):
        arrays = {
            "f32-2d": np.arange(12, dtype="<f4").reshape(3, 4),
            "f64-3d": np.linspace(-1, 1, 24, dtype="<f8").reshape(2, 3, 4),
            "f32-scalar": np.array(3.5, dtype="<f4"),
            "f32-empty": np.zeros((0, 5), dtype="<f4"),
        }
        for name, a in arrays.items():
            path = self.tmp(name + ".npy")
            np.save(path, a)
            self.add("npy", name + ".npy", read(path))
        for version in ((2, 0), (3, 0)):
            path = self.tmp("v%d.npy" % version[0])
            with open(path, "wb") as f:
                np.lib.format.write_array(f, np.ones((2, 2), "<f4"), version=version)
            self.add("npy", "version-%d.npy" % version[0], read(path))


def make(out, kiln):
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    s = Seeds(out, kiln)
    try:
        fixtures = s.checkpoints_and_configs()
        s.adapters(fixtures)
        s.artifacts(fixtures)
        s.numpy_files()
    finally:
        shutil.rmtree(s.work, ignore_errors=True)
    counts = {t: len(os.listdir(os.path.join(out, t))) for t in sorted(os.listdir(out))}
    print("make_seeds: %s" % ", ".join("%s %d" % kv for kv in counts.items()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["unpack"]:
        ap = argparse.ArgumentParser(prog="make_seeds.py unpack",
                                     description="Write the files of a bundle input into DIR.")
        ap.add_argument("bundle")
        ap.add_argument("dir")
        a = ap.parse_args(argv[1:])
        for name, data in unpack_bundle(read(a.bundle)):
            path = os.path.join(a.dir, name.replace("..", "__").lstrip("/"))
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            print("%s (%d bytes)" % (path, len(data)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kiln", required=True, help="the kiln program that exports and dumps")
    ap.add_argument("--out", required=True, help="directory of the corpora (emptied first)")
    a = ap.parse_args(argv)
    make(a.out, os.path.abspath(a.kiln))
    return 0


if __name__ == "__main__":
    sys.exit(main())
