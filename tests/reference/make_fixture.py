#!/usr/bin/python3
"""Write small MaxText-layout Llama-family checkpoints (seeded random weights) for kiln's tests.

Importable API:
    v = Variant(name="linen-scan1-bf16", layout="linen", dtype="bf16", ...)
    fx = write_fixture(v, "/tmp/dir")      # -> Fixture(checkpoint_args, config_path, config, ...)

CLI:
    make_fixture.py --out DIR [--variant NAME | --list] [--set field=value ...]

Parameter keys and shapes follow docs/maxtext.md §1.3/§1.4/§1.6 (kernels are [in..., out...]):
    token_embedder/embedding                               [V, E]
    decoder/decoder_norm/scale                             [E]
    decoder/logits_dense/kernel                            [E, V]   (untied only)
    decoder/layers/pre_self_attention_layer_norm/scale     [E]
    decoder/layers/self_attention/query/kernel             [E, H, D]
    decoder/layers/self_attention/key/kernel               [E, K, D]
    decoder/layers/self_attention/value/kernel             [E, K, D]
    decoder/layers/self_attention/out/kernel               [H, D, E]
    decoder/layers/self_attention/query_norm/scale         [D]      (qwen3 only)
    decoder/layers/self_attention/key_norm/scale           [D]      (qwen3 only)
    decoder/layers/post_self_attention_layer_norm/scale    [E]
    decoder/layers/mlp/wi_0/kernel                         [E, F]
    decoder/layers/mlp/wi_1/kernel                         [E, F]
    decoder/layers/mlp/wo/kernel                           [F, E]
Scanned checkpoints stack the L layers on axis `scan_axis` of each layer tensor (np.stack(axis=...)):
axis 1 (MaxText default) gives query [E, L, H, D] and norms [E, L]; axis 0 gives [L, ...].
Unrolled checkpoints use decoder/layers_0 ... decoder/layers_{L-1}.

Key layouts ("/"-joined canonical path P, then the separator is applied):
    linen            params/params/P                       (training / Linen decode checkpoints)
    nnx              model/P                               (in-memory NNX state, no .value)
    nnx-decode       P/value                               (NNX param-only decode checkpoint)
    nnx-model-value  model/P/value
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as st  # noqa: E402

LAYOUT_PREFIX = {
    "linen": ("params/params/", ""),
    "nnx": ("model/", ""),
    "nnx-decode": ("", "/value"),
    "nnx-model-value": ("model/", "/value"),
}


@dataclasses.dataclass
class Variant:
    name: str = "default"
    decoder_block: str = "llama2"        # llama2 | mistral | qwen3
    model_name: str = ""                 # e.g. "llama3.1-tiny" selects the llama3.1 RoPE
    emb_dim: int = 64
    num_query_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    num_decoder_layers: int = 2
    vocab_size: int = 256
    normalization_layer_epsilon: float = 1e-5
    rope_max_timescale: float = 10000.0
    max_target_length: int = 128
    logits_via_embedding: bool = False
    normalize_embedding_logits: bool = True
    layout: str = "linen"                # see LAYOUT_PREFIX
    sep: str = "."                       # "." or "/"
    scanned: bool = True
    scan_axis: int = 1                   # where the layer axis is inserted (scanned only)
    config_scan_axis: object = "same"    # value written to param_scan_axis: "same", None (omit), int
    dtype: str = "f32"                   # f32 | bf16 | f16 (storage dtype of every tensor)
    shards: int = 0                      # 0 = single model.safetensors; n >= 2 = sharded + index
    checkpoint_mode: str = "index"       # sharded only: "index" (pass the index json) | "files"
    config_format: str = "json"          # json | yaml
    seed: int = 0
    # weight-scale knobs (see make_weights)
    attn_temp: float = 2.0               # typical |attention logit|
    layer_gain: float = 0.9              # residual contribution of each sub-block vs embedding
    logit_std: float = 1.0               # std of the random part of the output logits (untied)
    bigram: float = 32.0                 # strength of the built-in next-token map (untied)
    context_sensitive: bool = True       # greedy output depends on the decode path (see
    #                                      llama_ref.choose_prompt); False for tied heads, where
    #                                      the current token dominates the logits
    set_overrides: tuple = ()            # --set k=v passed to kiln export (and to the reference)
    extra_export_args: tuple = ()        # e.g. ("--scan-axis", "0")

    @property
    def is_qwen3(self):
        return self.decoder_block == "qwen3"

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass
class Fixture:
    variant: Variant
    directory: str
    checkpoint_args: list        # paths to pass as --checkpoint (in order)
    checkpoint_files: list       # every .safetensors file written
    config_path: str
    config: dict                 # resolved MaxText config (JSON field names)
    keys: list                   # every tensor key written

    def export_args(self):
        args = []
        for p in self.checkpoint_args:
            args += ["--checkpoint", p]
        args += ["--config", self.config_path]
        for kv in self.variant.set_overrides:
            args += ["--set", kv]
        args += list(self.variant.extra_export_args)
        return args


# ------------------------------------------------------------------------------------------------
# weights


def layer_shapes(v):
    E, H, K, D, F = v.emb_dim, v.num_query_heads, v.num_kv_heads, v.head_dim, v.mlp_dim
    shapes = {
        "pre_self_attention_layer_norm/scale": (E,),
        "self_attention/query/kernel": (E, H, D),
        "self_attention/key/kernel": (E, K, D),
        "self_attention/value/kernel": (E, K, D),
        "self_attention/out/kernel": (H, D, E),
        "post_self_attention_layer_norm/scale": (E,),
        "mlp/wi_0/kernel": (E, F),
        "mlp/wi_1/kernel": (E, F),
        "mlp/wo/kernel": (F, E),
    }
    if v.is_qwen3:
        shapes["self_attention/query_norm/scale"] = (D,)
        shapes["self_attention/key_norm/scale"] = (D,)
    return shapes


def global_shapes(v):
    shapes = {"token_embedder/embedding": (v.vocab_size, v.emb_dim),
              "decoder/decoder_norm/scale": (v.emb_dim,)}
    if not v.logits_via_embedding:
        shapes["decoder/logits_dense/kernel"] = (v.emb_dim, v.vocab_size)
    return shapes


def make_weights(v):
    """Seeded random f32 weights, canonical unscanned names.

    Returns (globals: {name: array}, layers: [ {name: array} per layer ]).

    Scales: embedding ~ N(0, 1); norm scales ~ 1 + 0.15 N(0,1); q/k/v ~ N(0, 1/E) with the llama
    query pre-scaled by sqrt(attn_temp)/sqrt(D) (the MaxText 1/sqrt(D) fold) and k by
    sqrt(attn_temp), so attention logits have std ~attn_temp and the softmax is far from
    uniform (qwen3: the q/k norm scales carry sqrt(attn_temp) instead); out ~ N(0,
    layer_gain^2/(H D)); wi ~ N(0, 1/E); wo ~ N(0, (2 layer_gain)^2/F).
    Untied output: logits_dense = N(0, logit_std^2/E) + (bigram/E) * embedding[perm]^T, i.e. a
    built-in next-token map t -> perm^-1(t) that attention/MLP outputs perturb. This keeps the
    top-1/top-2 logit gap far above bf16 noise (so greedy decoding is a meaningful exact test)
    while every sub-block still moves the logits by much more than the 2% tolerance."""
    rng = np.random.default_rng(v.seed)
    E, H, K, D, F, V = (v.emb_dim, v.num_query_heads, v.num_kv_heads, v.head_dim, v.mlp_dim,
                        v.vocab_size)
    g = {}
    g["token_embedder/embedding"] = rng.standard_normal((V, E))
    g["decoder/decoder_norm/scale"] = 1.0 + 0.15 * rng.standard_normal(E)
    if not v.logits_via_embedding:
        # random readout + a "bigram" map: column v is aligned with the embedding of token
        # perm[v], so a hidden state that still carries the current token t favours
        # v = perm^-1(t) by a clear margin; attention/MLP outputs shift it (context dependence).
        perm = rng.permutation(V)
        emb = g["token_embedder/embedding"]
        w = rng.standard_normal((E, V)) * (v.logit_std / np.sqrt(E))
        w += emb[perm].T * (v.bigram / E)
        g["decoder/logits_dense/kernel"] = w
    layers = []
    for _ in range(v.num_decoder_layers):
        t = {}
        t["pre_self_attention_layer_norm/scale"] = 1.0 + 0.15 * rng.standard_normal(E)
        q = rng.standard_normal((E, H, D)) / np.sqrt(E)
        if not v.is_qwen3:
            q = q * (np.sqrt(v.attn_temp) / np.sqrt(D))
        t["self_attention/query/kernel"] = q
        k = rng.standard_normal((E, K, D)) / np.sqrt(E)
        if not v.is_qwen3:
            k = k * np.sqrt(v.attn_temp)
        t["self_attention/key/kernel"] = k
        t["self_attention/value/kernel"] = rng.standard_normal((E, K, D)) / np.sqrt(E)
        t["self_attention/out/kernel"] = rng.standard_normal((H, D, E)) * (v.layer_gain /
                                                                            np.sqrt(H * D))
        if v.is_qwen3:
            t["self_attention/query_norm/scale"] = np.sqrt(v.attn_temp) * (
                1.0 + 0.15 * rng.standard_normal(D))
            t["self_attention/key_norm/scale"] = np.sqrt(v.attn_temp) * (
                1.0 + 0.15 * rng.standard_normal(D))
        t["post_self_attention_layer_norm/scale"] = 1.0 + 0.15 * rng.standard_normal(E)
        t["mlp/wi_0/kernel"] = rng.standard_normal((E, F)) / np.sqrt(E)
        t["mlp/wi_1/kernel"] = rng.standard_normal((E, F)) / np.sqrt(E)
        t["mlp/wo/kernel"] = rng.standard_normal((F, E)) * (2.0 * v.layer_gain / np.sqrt(F))
        layers.append(t)
    cast = lambda d: {k: np.asarray(a, dtype=np.float32) for k, a in d.items()}  # noqa: E731
    return cast(g), [cast(t) for t in layers]


def stack_layers(layers, axis):
    """{name: [L tensors]} -> {name: stacked}; layer axis inserted at `axis` (docs/maxtext.md §1.2)."""
    out = {}
    for name in layers[0]:
        out[name] = np.stack([t[name] for t in layers], axis=axis)
    return out


def canonical_tensors(v):
    """The (pre-storage, f32) tensors of the checkpoint under canonical '/'-joined paths."""
    g, layers = make_weights(v)
    out = dict(g)
    if v.scanned:
        for name, arr in stack_layers(layers, v.scan_axis).items():
            out["decoder/layers/" + name] = arr
    else:
        for i, t in enumerate(layers):
            for name, arr in t.items():
                out["decoder/layers_%d/%s" % (i, name)] = arr
    return out


def storage_key(v, canonical):
    prefix, suffix = LAYOUT_PREFIX[v.layout]
    path = prefix + canonical + suffix
    return path.replace("/", v.sep)


def storage_dtype(v):
    return {"f32": "F32", "bf16": "BF16", "f16": "F16"}[v.dtype]


# ------------------------------------------------------------------------------------------------
# config files


def config_dict(v):
    """MaxText-named config fields (JSON form)."""
    c = {
        "decoder_block": v.decoder_block,
        "emb_dim": v.emb_dim,
        "num_query_heads": v.num_query_heads,
        "num_kv_heads": v.num_kv_heads,
        "head_dim": v.head_dim,
        "mlp_dim": v.mlp_dim,
        "num_decoder_layers": v.num_decoder_layers,
        "vocab_size": v.vocab_size,
        "mlp_activations": ["silu", "linear"],
        "normalization_layer_epsilon": v.normalization_layer_epsilon,
        "rope_max_timescale": v.rope_max_timescale,
        "logits_via_embedding": v.logits_via_embedding,
        "normalize_embedding_logits": v.normalize_embedding_logits,
        "scan_layers": v.scanned,
        "max_target_length": v.max_target_length,
    }
    if v.model_name:
        c["model_name"] = v.model_name
    if v.is_qwen3:
        c["use_qk_norm"] = True
    if v.config_scan_axis == "same":
        c["param_scan_axis"] = v.scan_axis
    elif v.config_scan_axis is not None:
        c["param_scan_axis"] = int(v.config_scan_axis)
    return c


def _yaml_value(x):
    if isinstance(x, bool):
        return "True" if x else "False"
    if isinstance(x, str):
        return '"%s"' % x
    if isinstance(x, list):
        return "[" + ",".join(_yaml_value(e) for e in x) + "]"
    if isinstance(x, float):
        if x == int(x) and abs(x) >= 1000:
            # MaxText style: 500_000
            return "{:_}".format(int(x))
        return repr(x) if "e" not in repr(x) else "%.1e" % x
    return str(x)


def config_yaml(v):
    """A MaxText model .yml (base_* dims, comments, 500_000-style numbers)."""
    c = config_dict(v)
    lines = [
        "# Copyright notice would go here (MaxText model yml style).",
        "",
        "# model config for %s (tiny kiln test fixture)" % v.name,
        "",
        "base_emb_dim: %d" % v.emb_dim,
        "base_num_query_heads: %d" % v.num_query_heads,
        "base_num_kv_heads: %d" % v.num_kv_heads,
        "base_mlp_dim: %d" % v.mlp_dim,
        "base_num_decoder_layers: %d" % v.num_decoder_layers,
        "head_dim: %d" % v.head_dim,
        'mlp_activations: ["silu","linear"]',
        "vocab_size: %d" % v.vocab_size,
        "enable_dropout: False",
        "logits_via_embedding: %s" % _yaml_value(v.logits_via_embedding),
        "normalization_layer_epsilon: %s" % _yaml_value(v.normalization_layer_epsilon),
        "rope_max_timescale: %s" % _yaml_value(float(v.rope_max_timescale)),
        'decoder_block: "%s" # Uses the same decoder block as llama2' % v.decoder_block
        if v.decoder_block == "llama2" else 'decoder_block: "%s"' % v.decoder_block,
    ]
    for key in ("model_name", "use_qk_norm", "normalize_embedding_logits", "param_scan_axis",
                "scan_layers", "max_target_length"):
        if key in c:
            lines.append("%s: %s  # test fixture" % (key, _yaml_value(c[key])))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def write_fixture(v, directory):
    """Write the checkpoint and config of variant `v` into `directory` (created)."""
    os.makedirs(directory, exist_ok=True)
    tensors = canonical_tensors(v)
    dt = storage_dtype(v)
    stored = {}
    for canon in sorted(tensors):
        stored[storage_key(v, canon)] = (tensors[canon], dt)
    meta = {"format": "pt", "kiln_fixture": v.name}
    ckpt_dir = os.path.join(directory, "ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    if v.shards and v.shards >= 2:
        index = st.write_sharded(ckpt_dir, stored, v.shards, metadata=meta)
        files = [os.path.join(ckpt_dir, st.shard_filename(i, v.shards)) for i in range(v.shards)]
        args = [index] if v.checkpoint_mode == "index" else list(files)
    else:
        path = os.path.join(ckpt_dir, "model.safetensors")
        st.write_safetensors(path, stored, metadata=meta)
        files = [path]
        args = [path]
    if v.config_format == "yaml":
        cfg_path = os.path.join(directory, "%s.yml" % v.name)
        with open(cfg_path, "w") as f:
            f.write(config_yaml(v))
    else:
        cfg_path = os.path.join(directory, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(config_dict(v), f, indent=2)
    with open(os.path.join(directory, "fixture.json"), "w") as f:
        json.dump(dataclasses.asdict(v), f, indent=2)
    return Fixture(variant=v, directory=directory, checkpoint_args=args, checkpoint_files=files,
                   config_path=cfg_path, config=config_dict(v), keys=list(stored))


# ------------------------------------------------------------------------------------------------
# the named variant matrix used by tests/e2e (each option appears at least once)

BASE = Variant()


def variants():
    V = BASE.replace
    return [
        # the full Linen/NNX x scan axis 1/0 x f32/bf16 cross product; separators and the NNX
        # key forms (model. prefix, .value leaf, both) alternate across it
        V(name="linen-scan1-f32", layout="linen", scan_axis=1, dtype="f32", seed=101),
        V(name="linen-scan1-bf16-slash", layout="linen", scan_axis=1, dtype="bf16", sep="/",
          seed=131),
        V(name="linen-scan0-f32", layout="linen", scan_axis=0, dtype="f32", seed=132),
        V(name="linen-scan0-bf16", layout="linen", scan_axis=0, dtype="bf16", seed=102),
        V(name="nnx-scan1-f32", layout="nnx", scan_axis=1, dtype="f32", seed=133),
        V(name="nnx-scan1-bf16-slash", layout="nnx", scan_axis=1, dtype="bf16", sep="/",
          seed=103),
        V(name="nnx-scan0-f32", layout="nnx", scan_axis=0, dtype="f32", seed=104),
        V(name="nnx-scan0-bf16-value", layout="nnx-model-value", scan_axis=0, dtype="bf16",
          seed=134),
        V(name="nnxdecode-scan1-f32-slash", layout="nnx-decode", sep="/", seed=107),
        # f16 input
        V(name="linen-scan1-f16", layout="linen", dtype="f16", seed=105),
        # unrolled inputs (layers_0 ... layers_{L-1}), incl. the NNX decode checkpoint form
        V(name="nnxdecode-unrolled-bf16", layout="nnx-decode", scanned=False, dtype="bf16",
          seed=106, num_decoder_layers=3, layer_gain=0.7),
        V(name="linen-unrolled-f32", layout="linen", scanned=False, seed=108),
        # heads: MHA and MQA (GQA is the default, K=2 of H=4)
        V(name="mha-linen-scan1", num_kv_heads=4, seed=109),
        V(name="mqa-linen-scan1", num_kv_heads=1, seed=110),
        # output head
        V(name="tied-normalized", logits_via_embedding=True, normalize_embedding_logits=True,
          context_sensitive=False, seed=111),
        V(name="tied-unnormalized-nnx", layout="nnx", logits_via_embedding=True,
          normalize_embedding_logits=False, context_sensitive=False, seed=112),
        # RoPE: llama3.1 (interleaved + frequency scaling) selected by model_name
        V(name="llama3.1-rope", model_name="llama3.1-tiny", rope_max_timescale=500000.0,
          seed=113),
        V(name="llama3.1-rope-nnx-scan0-bf16-mha", model_name="llama3.1-8b-tiny", layout="nnx",
          scan_axis=0, dtype="bf16", rope_max_timescale=500000.0, num_kv_heads=4, seed=114),
        V(name="mistral", decoder_block="mistral", rope_max_timescale=1000000.0, seed=115),
        # Qwen3 (q/k norm, runtime query scale)
        V(name="qwen3-tied", decoder_block="qwen3", rope_max_timescale=1000000.0,
          normalization_layer_epsilon=1e-6, logits_via_embedding=True,
          normalize_embedding_logits=False, context_sensitive=False, seed=116),
        V(name="qwen3-untied-nnx-scan0-bf16", decoder_block="qwen3", layout="nnx", scan_axis=0,
          dtype="bf16", rope_max_timescale=1000000.0, normalization_layer_epsilon=1e-6,
          seed=117),
        # sharded input: via the index json, and as several --checkpoint files
        V(name="sharded-index", shards=3, seed=118),
        V(name="sharded-files-unrolled", shards=2, checkpoint_mode="files", scanned=False,
          dtype="bf16", seed=119),
        # YAML config (MaxText model yml style, base_* dims, theta = 500_000)
        V(name="yaml-llama3", config_format="yaml", rope_max_timescale=500000.0, seed=120),
        # scan axis from --set / --scan-axis instead of the config
        V(name="scan0-via-set", scan_axis=0, config_scan_axis=1,
          set_overrides=("param_scan_axis=0",), seed=121),
        V(name="scan0-via-flag", scan_axis=0, config_scan_axis=None, layout="nnx",
          extra_export_args=("--scan-axis", "0"), seed=123),
        # bigger-ish shapes: 3 layers, 6 query heads in 2 groups of 3, vocab 512
        V(name="wide-gqa3", num_query_heads=6, num_kv_heads=2, emb_dim=96, mlp_dim=160,
          num_decoder_layers=3, vocab_size=512, seed=122),
    ]


def variant_by_name(name):
    for v in variants():
        if v.name == name:
            return v
    raise KeyError(name)


def _parse_value(s):
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def cli_main(description, variant_class, variants_fn, by_name, write, default_variant,
             argv=None):
    """The fixture generators' command line, shared by every family's module."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--variant", default=default_variant, help="named variant (see --list)")
    ap.add_argument("--list", action="store_true", help="list the named variants")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a %s field, e.g. --set num_decoder_layers=4"
                    % variant_class.__name__)
    a = ap.parse_args(argv)
    if a.list:
        for v in variants_fn():
            print(v.name)
        return 0
    if not a.out:
        ap.error("--out is required")
    v = by_name(a.variant)
    fields = {f.name for f in dataclasses.fields(variant_class)}
    for kv in a.set:
        k, _, val = kv.partition("=")
        if k not in fields:
            ap.error("unknown %s field %r" % (variant_class.__name__, k))
        v = v.replace(**{k: _parse_value(val)})
    fx = write(v, a.out)
    print(json.dumps({"checkpoint": fx.checkpoint_args, "config": fx.config_path,
                      "files": fx.checkpoint_files}, indent=2))
    return 0


def main(argv=None):
    return cli_main(__doc__.split("\n")[0], Variant, variants, variant_by_name, write_fixture,
                    "linen-scan1-f32", argv)


if __name__ == "__main__":
    sys.exit(main())
