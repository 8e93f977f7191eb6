#!/usr/bin/python3
"""Train kiln's shipped default model: a small DeepSeek-style (MLA + MoE) model on the King James
Bible, written in MaxText's scanned checkpoint layout, plus a rank-8 LoRA style adapter.

A development tool only: the build, the tests and the demo never run it; its outputs are committed
under models/default/. Run with Debian's Python (python3-torch 1.13, python3-sentencepiece, numpy):

    /usr/bin/python3 tools/train_default.py [--out models/default] [--seed 20240611]

Everything is reproducible from the seed on the same machine class (2 threads, bf16 matmuls through
torch's oneDNN path). Steps are fixed counts, not time budgets.

What it does
  1. corpus: `bible -f "Gen1:1-Rev22:21"` (Debian bible-kjv, public domain text), one verse per
     line with its `Ge1:1 ` reference stripped. Split by book (SPLIT below): held-out books (never
     trained on), a validation set (monitoring only), a style slice (Psalms + Proverbs) for the
     adapter, excluded from base training, and the base training text (everything else).
  2. tokenizer: SentencePiece unigram, 4096 pieces, identity normalisation, byte fallback,
     whitespace kept; decode(encode(s)) == s is checked for every line (fatal for held-out lines).
  3. model (MaxText decoder_block deepseek, docs/maxtext.md §1.7/§2.5/§2.7): MLA with q_lora_rank, YaRN RoPE
     (original 64 -> 256 positions, factor 4), 1 dense layer + 3 MoE layers (16 routed experts,
     top-8, sigmoid scores, routing bias updated aux-loss-free, DeepSeek-V3 pre-bias weighting since
     model_name starts with "deepseek3", 1 shared expert), untied output head.
     Training: f32 master weights, bf16 matmuls (as MaxText's dtype bf16), AdamW, packed verses
     (each verse its own segment: positions restart at 0, attention stays inside the segment).
     The last step's per-head max attention logits (docs/maxtext.md §3) go to max_logits.safetensors.
  4. LoRA: rank 8 on wq_a, wq_b, wkv_a, wkv_b, out (every layer) and the dense MLP, base frozen
     (bf16-rounded), trained on the style slice; MaxText adapter layout (docs/maxtext.md §4.1), scanned.
  5. evaluation in torch with the weights rounded to bf16 and f32 compute: held-out perplexity of
     the base, base + merged adapter, base + run-time adapter -> reference.json; greedy samples.

Perplexity: per held-out line ids = [bos] + encode(line) + [eos], one sequence per line with
positions from 0, every next token ids[1:] scored; ppl = exp(sum NLL / number of predicted tokens).
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "reference"))
import safetensors_io as st  # noqa: E402  (numpy-only safetensors reader/writer of the project)

DEFAULT_SEED = 20240611

# ------------------------------------------------------------------------------------------------
# configuration

MODEL = {
    "model_name": "deepseek3-kjv-6m",   # deepseek3*: pre-bias routing weights (docs/maxtext.md §2.7)
    "decoder_block": "deepseek",
    "base_emb_dim": 256,
    "base_num_query_heads": 8,
    "base_num_kv_heads": 8,
    "base_mlp_dim": 512,
    "base_moe_mlp_dim": 64,
    "base_num_decoder_layers": 4,
    "first_num_dense_layers": 1,
    "vocab_size": 4096,
    "normalization_layer_epsilon": 1e-6,
    "mlp_activations": ["silu", "linear"],
    "logits_via_embedding": False,
    "num_experts": 16,
    "num_experts_per_tok": 8,
    "shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "routed_score_func": "sigmoid",
    "routed_bias": True,
    "n_routing_groups": -1,
    "topk_routing_group": -1,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "rope_type": "yarn",
    "rope_max_timescale": 10000,
    "max_position_embeddings": 256,
    "original_max_position_embeddings": 64,
    "rope_factor": 4,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "rope_interleave": True,
    "rope_truncate": True,
    "rope_attention_scaling": False,
    "max_target_length": 256,
    "scan_layers": True,
    "param_scan_axis": 1,
    "attention_type": "mla",
    "enable_dropout": False,
}

# Book abbreviations as `bible` prints them.
SPLIT = {
    "heldout": ["Ruth", "Jonah", "Titus", "Jas", "Jude"],     # 312 verses, never trained on
    "valid": ["Obad", "Hag", "Phmn", "Col"],                  # 179 verses, loss monitoring only
    "style": ["Psa", "Prv"],                                   # adapter text (not base training)
    "style_heldout_chapters": [("Prv", 30), ("Prv", 31)],      # 64 verses, adapter check only
}

TRAIN = {
    "seq_len": 128,                # every verse fits (longest: 121 input tokens)
    "batch_rows": 32,
    # ~3.4 epochs of the base text. Longer over-fits: a 1700-step run (7.2 epochs) reached its
    # best validation loss (3.63) near epoch 4 and ended at 3.80 (held-out perplexity 62.8).
    "steps": 800,
    "warmup": 200,
    "lr": 3e-3,
    "lr_final_frac": 0.1,
    "betas": (0.9, 0.95),
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "bias_update_rate": 1e-3,      # aux-loss-free routing bias step (DeepSeek-V3's gamma)
    "log_every": 50,
    "valid_every": 200,
}

LORA = {
    "r": 8,
    "lora_alpha": 16.0,
    "steps": 200,                  # ~10 epochs of the style text
    "lr": 2e-3,
    "warmup": 50,
    "batch_rows": 32,
    "targets": ["self_attention/wq_a", "self_attention/wq_b", "self_attention/wkv_a",
                "self_attention/wkv_b", "self_attention/out", "mlp/wi_0", "mlp/wi_1", "mlp/wo"],
}

TOKENIZER = {"vocab_size": 4096, "model_type": "unigram"}

PROMPTS = ["And the LORD said unto", "In the beginning", "Blessed is the man", "My son,"]
CALIBRATION_VERSES = [("Ge", 1, 1), ("Exo", 20, 2), ("Isa", 40, 1), ("Mat", 5, 3),
                      ("John", 1, 1), ("Rom", 8, 28), ("Rev", 21, 4), ("Job", 38, 4)]

MOE = "DeepSeekMoeBlock_0/MoeBlock_0/"
SHARED = "DeepSeekMoeBlock_0/shared_experts/"


def dims():
    c = MODEL
    return dict(E=c["base_emb_dim"], H=c["base_num_query_heads"], F=c["base_mlp_dim"],
                Fm=c["base_moe_mlp_dim"], L=c["base_num_decoder_layers"],
                Ld=c["first_num_dense_layers"], V=c["vocab_size"], X=c["num_experts"],
                K=c["num_experts_per_tok"], S=c["shared_experts"], Rq=c["q_lora_rank"],
                Rkv=c["kv_lora_rank"], Dn=c["qk_nope_head_dim"], Dr=c["qk_rope_head_dim"],
                Dv=c["v_head_dim"], eps=c["normalization_layer_epsilon"])


def log(msg):
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# corpus

VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def load_bible():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    try:
        out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, env=env,
                             stdout=subprocess.PIPE).stdout.decode("utf-8")
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit("error: cannot run `bible` (Debian package bible-kjv): %s" % e)
    verses = []
    for n, line in enumerate(out.split("\n")[:-1], 1):
        m = VERSE_RE.match(line)
        if not m:
            sys.exit("error: bible output line %d has no verse reference: %r" % (n, line[:80]))
        verses.append((m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)))
    if len(verses) != 31102:
        sys.exit("error: expected 31102 verses from `bible`, got %d" % len(verses))
    return verses


def split_corpus(verses):
    held, valid, style = set(SPLIT["heldout"]), set(SPLIT["valid"]), set(SPLIT["style"])
    style_held = set(SPLIT["style_heldout_chapters"])
    out = {"base": [], "heldout": [], "valid": [], "style": [], "style_heldout": []}
    for b, c, v, text in verses:
        if b in held:
            out["heldout"].append(text)
        elif b in valid:
            out["valid"].append(text)
        elif b in style:
            out["style_heldout" if (b, c) in style_held else "style"].append(text)
        else:
            out["base"].append(text)
    by_ref = {(b, c, v): t for b, c, v, t in verses}
    out["calibration"] = [by_ref[r] for r in CALIBRATION_VERSES]
    return out


# ------------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(lines, path, check):
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf,
        vocab_size=TOKENIZER["vocab_size"], model_type=TOKENIZER["model_type"],
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=8192,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.get_piece_size() == TOKENIZER["vocab_size"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    for name, ls in check.items():
        bad = [s for s in ls if sp.decode(sp.encode(s)) != s]
        if bad and name == "heldout":
            sys.exit("error: tokenizer does not round-trip %d held-out line(s), e.g. %r"
                     % (len(bad), bad[0]))
        if bad:
            log("warning: tokenizer does not round-trip %d %s line(s), e.g. %r"
                % (len(bad), name, bad[0]))
    return sp


# ------------------------------------------------------------------------------------------------
# YaRN (docs/maxtext.md §2.3c), computed in numpy exactly as MaxText / the project's numpy reference


def yarn_tables(d, cfg, n_pos):
    theta, factor = float(cfg["rope_max_timescale"]), float(cfg["rope_factor"])
    orig = float(cfg["original_max_position_embeddings"])
    half = d // 2

    def corr(n):
        return d * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(corr(cfg["beta_fast"])), math.ceil(corr(cfg["beta_slow"]))
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ar = np.arange(half, dtype=np.float32)
    b = (np.float32(1.0) / np.power(np.float32(theta), (np.float32(2.0) * ar) / np.float32(d)))
    ramp = np.clip((ar - np.float32(low)) / np.float32(high - low), 0, 1).astype(np.float32)
    smooth = (np.float32(1.0) - ramp).astype(np.float32)
    f = ((b / np.float32(factor)) * (np.float32(1.0) - smooth) + b * smooth).astype(np.float32)
    ang = (np.arange(n_pos, dtype=np.float32)[:, None] * f[None, :]).astype(np.float32)
    return (np.cos(ang.astype(np.float64)).astype(np.float32),
            np.sin(ang.astype(np.float64)).astype(np.float32), (low, high), f)


def softmax_scale(cfg):
    s = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    if cfg["max_position_embeddings"] > cfg["original_max_position_embeddings"]:
        m = 0.1 * cfg["mscale"] * math.log(cfg["rope_factor"]) + 1.0
        s = s * m * m
    return s


def bf16_value(x):
    return float(st.bf16_round(np.float32(x)))


# ------------------------------------------------------------------------------------------------
# the model (torch)

import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

BF16 = torch.bfloat16
NEG = float(np.float32(-0.7 * np.finfo(np.float32).max))


def layer_shapes(kind):
    d = dims()
    E, H, Rq, Rkv, Dn, Dr, Dv = d["E"], d["H"], d["Rq"], d["Rkv"], d["Dn"], d["Dr"], d["Dv"]
    s = {
        "pre_self_attention_layer_norm/scale": (E,),
        "self_attention/wq_a/kernel": (E, Rq),
        "self_attention/q_norm/scale": (Rq,),
        "self_attention/wq_b/kernel": (Rq, H, Dn + Dr),
        "self_attention/wkv_a/kernel": (E, Rkv + Dr),
        "self_attention/kv_norm/scale": (Rkv,),
        "self_attention/wkv_b/kernel": (Rkv, H, Dn + Dv),
        "self_attention/out/kernel": (H, Dv, E),
        "post_self_attention_layer_norm/scale": (E,),
    }
    if kind == "dense":
        s["mlp/wi_0/kernel"] = (E, d["F"])
        s["mlp/wi_1/kernel"] = (E, d["F"])
        s["mlp/wo/kernel"] = (d["F"], E)
    else:
        X, Fm, S = d["X"], d["Fm"], d["S"]
        s[MOE + "gate/kernel"] = (E, X)
        s[MOE + "gate/bias"] = (X,)
        s[MOE + "wi_0"] = (X, E, Fm)
        s[MOE + "wi_1"] = (X, E, Fm)
        s[MOE + "wo"] = (X, Fm, E)
        s[SHARED + "wi_0/kernel"] = (E, S * Fm)
        s[SHARED + "wi_1/kernel"] = (E, S * Fm)
        s[SHARED + "wo/kernel"] = (S * Fm, E)
    return s


def layer_kind(i):
    return "dense" if i < dims()["Ld"] else "moe"


def fan_in(name, shape):
    if name.endswith("out/kernel"):
        return shape[0] * shape[1]
    if name.endswith(MOE + "wi_0") or name.endswith(MOE + "wi_1") or name.endswith(MOE + "wo"):
        return shape[1]
    return shape[0]


def init_params(gen):
    """f32 master weights in MaxText's unscanned kernel layouts ([in..., out...])."""
    d = dims()
    L = d["L"]
    resid = 1.0 / math.sqrt(2 * L)
    g = {
        "token_embedder/embedding": torch.randn(d["V"], d["E"], generator=gen),
        "decoder/decoder_norm/scale": torch.ones(d["E"]),
        "decoder/logits_dense/kernel": torch.randn(d["E"], d["V"], generator=gen)
        / math.sqrt(d["E"]),
    }
    layers = []
    for i in range(L):
        t = {}
        for name, shape in layer_shapes(layer_kind(i)).items():
            if name.endswith("/scale"):
                t[name] = torch.ones(shape)
            elif name.endswith("gate/bias"):
                t[name] = torch.zeros(shape)
            else:
                std = 1.0 / math.sqrt(fan_in(name, shape))
                if name.endswith(("out/kernel", "wo/kernel", MOE + "wo")):
                    std *= resid
                t[name] = torch.randn(shape, generator=gen) * std
        layers.append(t)
    return g, layers


def is_trainable(name):
    return not name.endswith("gate/bias")   # the routing bias is updated by the balance rule


def round_bf16(t):
    return t.detach().to(BF16).float()


class Net:
    """Forward pass of MaxText's deepseek decoder on a weight set.

    lowp=True: bf16 matmul inputs (f32 accumulate), elementwise math in f32 (training).
    lowp=False: everything f32 (evaluation on bf16-rounded weights).
    lora: {(layer, module): (A2 [in, r], B2 [r, out])} applied at run time, y = xW + s(xA)B."""

    def __init__(self, g, layers, lowp, lora=None, lora_scale=0.0):
        self.g, self.layers, self.lowp = g, layers, lowp
        self.lora, self.lora_scale = lora or {}, lora_scale
        self.d = dims()
        cos, sin, _, _ = yarn_tables(self.d["Dr"], MODEL, MODEL["max_position_embeddings"])
        self.cos, self.sin = torch.from_numpy(cos), torch.from_numpy(sin)
        self.scale = bf16_value(softmax_scale(MODEL))   # MaxText: bf16 query * bf16 constant

    def mm(self, x, w):
        """Training: bf16 inputs and output (f32 accumulation), like MaxText's dtype bf16."""
        if self.lowp:
            return torch.matmul(x.to(BF16), w.to(BF16))
        return torch.matmul(x, w)

    def proj(self, x, w2d, li, module):
        y = self.mm(x, w2d)
        ab = self.lora.get((li, module))
        if ab is not None:
            y = y + self.lora_scale * self.mm(self.mm(x, ab[0]), ab[1])
        return y

    def rmsnorm(self, x, scale):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.d["eps"]) * scale

    def rope(self, x, cos, sin):
        re_, im = x[..., 0::2], x[..., 1::2]                 # rope_interleave: input pairs
        out = torch.cat([re_ * cos - im * sin, re_ * sin + im * cos], dim=-1)   # [Re | Im]
        return out.to(x.dtype)

    def mla(self, h, w, li, cs, mask, rec):
        d = self.d
        B, T, _ = h.shape
        H, Dn, Dr, Dv, Rq, Rkv = d["H"], d["Dn"], d["Dr"], d["Dv"], d["Rq"], d["Rkv"]
        cq = self.proj(h, w["self_attention/wq_a/kernel"], li, "self_attention/wq_a")
        cq = self.rmsnorm(cq, w["self_attention/q_norm/scale"])
        q = self.proj(cq, w["self_attention/wq_b/kernel"].reshape(Rq, -1), li,
                      "self_attention/wq_b").view(B, T, H, Dn + Dr)
        cos, sin = cs
        q_pe = self.rope(q[..., Dn:], cos, sin)
        query = torch.cat([q[..., :Dn], q_pe], dim=-1) * self.scale
        ckv = self.proj(h, w["self_attention/wkv_a/kernel"], li, "self_attention/wkv_a")
        latent = self.rmsnorm(ckv[..., :Rkv], w["self_attention/kv_norm/scale"])
        k_pe = self.rope(ckv[..., None, Rkv:], cos, sin)                       # [B,T,1,Dr]
        kv = self.proj(latent, w["self_attention/wkv_b/kernel"].reshape(Rkv, -1), li,
                       "self_attention/wkv_b").view(B, T, H, Dn + Dv)
        key = torch.cat([kv[..., :Dn], k_pe.expand(B, T, H, Dr)], dim=-1)
        qh, kh, vh = (query.transpose(1, 2), key.transpose(1, 2),
                      kv[..., Dn:].transpose(1, 2))
        logits = self.mm(qh, kh.transpose(-1, -2))                           # [B,H,T,T]
        logits = logits.masked_fill(~mask, NEG)
        if rec is not None:
            rec.setdefault("max_logits", []).append(logits.detach().amax(dim=(-1, -2)))
        p = torch.softmax(logits, dim=-1)
        o = self.mm(p, vh).transpose(1, 2).reshape(B, T, H * Dv)
        return self.proj(o, w["self_attention/out/kernel"].reshape(H * Dv, -1), li,
                         "self_attention/out")

    def dense_mlp(self, h, w, li, prefix, lora_ok):
        lk = (lambda m: m) if lora_ok else (lambda m: None)
        g = self.proj(h, w[prefix + "wi_0/kernel"], li, lk("mlp/wi_0"))
        u = self.proj(h, w[prefix + "wi_1/kernel"], li, lk("mlp/wi_1"))
        return self.proj(Fn.silu(g) * u, w[prefix + "wo/kernel"], li, lk("mlp/wo"))

    def moe(self, h, w, rec):
        d = self.d
        B, T, E = h.shape
        X, K, Fm = d["X"], d["K"], d["Fm"]
        x = h.reshape(B * T, E)
        scores = torch.sigmoid(self.mm(x, w[MOE + "gate/kernel"])).float()
        sel = scores.detach() + w[MOE + "gate/bias"]
        idx = torch.topk(sel, K, dim=-1).indices
        wts = scores.gather(-1, idx)                          # pre-bias weights (deepseek3*)
        wts = wts / (wts.sum(-1, keepdim=True) + 1e-20) * MODEL["routed_scaling_factor"]
        comb = torch.zeros(B * T, X, dtype=wts.dtype).scatter(-1, idx, wts)
        wi0 = w[MOE + "wi_0"].permute(1, 0, 2).reshape(E, X * Fm)
        wi1 = w[MOE + "wi_1"].permute(1, 0, 2).reshape(E, X * Fm)
        a = Fn.silu(self.mm(x, wi0)) * self.mm(x, wi1)
        # the weighted sum over the selected experts, folded in before wo (linear, same result)
        a = (a.view(-1, X, Fm) * comb.to(a.dtype)[:, :, None]).reshape(-1, X * Fm)
        routed = self.mm(a, w[MOE + "wo"].reshape(X * Fm, E)).view(B, T, E)
        if rec is not None:
            rec.setdefault("routing", []).append(idx.view(B, T, K))
        return routed + self.dense_mlp(h, w, None, SHARED, False)

    def __call__(self, tok, pos, mask, rec=None, select=None):
        """tok, pos [B, T] long; mask [B, 1, T, T] bool (True = may attend). -> logits [B,T,V]."""
        cs = (self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :])
        x = self.g["token_embedder/embedding"][tok]
        for li, w in enumerate(self.layers):
            h = self.rmsnorm(x, w["pre_self_attention_layer_norm/scale"])
            x = x + self.mla(h, w, li, cs, mask, rec)
            h = self.rmsnorm(x, w["post_self_attention_layer_norm/scale"])
            if layer_kind(li) == "dense":
                x = x + self.dense_mlp(h, w, li, "mlp/", True)
            else:
                x = x + self.moe(h, w, rec)
        y = self.rmsnorm(x, self.g["decoder/decoder_norm/scale"])
        if select is not None:                # training: only the positions with a target
            y = y.reshape(-1, y.shape[-1])[select]
        return self.mm(y, self.g["decoder/logits_dense/kernel"]).float()


def causal_mask(T):
    return torch.ones(T, T, dtype=torch.bool).tril()[None, None]


# ------------------------------------------------------------------------------------------------
# data: verses packed into rows, each verse its own segment


def pack_epoch(seqs, rng, T, open_rows=8):
    """Shuffled verses into rows of T input tokens: first fit over a few open rows (the
    fullest row is closed when nothing fits), so little is padding."""
    order = rng.permutation(len(seqs))
    rows, opened = [], []          # opened: [used, [seq indices]]
    for i in order:
        n = len(seqs[i]) - 1
        for r in opened:
            if r[0] + n <= T:
                r[0] += n
                r[1].append(int(i))
                break
        else:
            if len(opened) == open_rows:
                full = max(range(len(opened)), key=lambda j: opened[j][0])
                rows.append(opened.pop(full)[1])
            opened.append([n, [int(i)]])
    rows.extend(r[1] for r in opened)
    return rows


def make_batch(seqs, rows, T):
    B = len(rows)
    tok = np.zeros((B, T), np.int64)
    tgt = np.full((B, T), -100, np.int64)
    seg = np.zeros((B, T), np.int64)
    pos = np.zeros((B, T), np.int64)
    for b, row in enumerate(rows):
        o = 0
        for j, i in enumerate(row):
            s = seqs[i]
            n = len(s) - 1
            tok[b, o:o + n], tgt[b, o:o + n] = s[:-1], s[1:]
            seg[b, o:o + n], pos[b, o:o + n] = j + 1, np.arange(n)
            o += n
        pos[b, o:] = np.arange(T - o)     # padding: token 0, segment 0 (attends to itself)
    tok, tgt, seg, pos = (torch.from_numpy(a) for a in (tok, tgt, seg, pos))
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    return tok, tgt, pos, mask[:, None]


def batches(seqs, rows_per_batch, T, seed):
    rng = np.random.RandomState(seed)
    epoch = 0
    while True:
        rows = pack_epoch(seqs, rng, T)
        for k in range(0, len(rows) - rows_per_batch + 1, rows_per_batch):
            yield epoch, make_batch(seqs, rows[k:k + rows_per_batch], T)
        epoch += 1


def lr_at(step, total, warmup, peak, final_frac):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def eval_loss_packed(net, seqs, T, rows_per_batch=16):
    """Mean NLL per predicted token over `seqs` (packed, fast path used during training)."""
    rows = pack_epoch(seqs, np.random.RandomState(0), T)
    tot, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(rows), rows_per_batch):
            tok, tgt, pos, mask = make_batch(seqs, rows[k:k + rows_per_batch], T)
            valid = (tgt != -100).view(-1)
            logits = net(tok, pos, mask, select=valid)
            tot += float(Fn.cross_entropy(logits, tgt.view(-1)[valid], reduction="sum"))
            n += int(valid.sum())
    return tot / n


# ------------------------------------------------------------------------------------------------
# training


def train_base(g, layers, seqs, valid_seqs, steps, seed):
    T, B = TRAIN["seq_len"], TRAIN["batch_rows"]
    params = [(k, v) for k, v in g.items()] + \
             [("%d/%s" % (i, k), v) for i, t in enumerate(layers) for k, v in t.items()
              if is_trainable(k)]
    for _, v in params:
        v.requires_grad_(True)
    decay = [v for k, v in params if v.dim() >= 2 and k != "token_embedder/embedding"]
    no_decay = [v for k, v in params if not (v.dim() >= 2 and k != "token_embedder/embedding")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=TRAIN["lr"], betas=TRAIN["betas"], eps=1e-8)
    net = Net(g, layers, lowp=True)
    d = dims()
    moe_layers = [i for i in range(d["L"]) if layer_kind(i) == "moe"]
    data = batches(seqs, B, T, seed)
    t0 = time.time()
    hist, win_loss, win_tok, win_t = [], [], 0, time.time()
    last_stats = None
    for step in range(steps):
        lr = lr_at(step, steps, TRAIN["warmup"], TRAIN["lr"], TRAIN["lr_final_frac"])
        for grp in opt.param_groups:
            grp["lr"] = lr
        epoch, (tok, tgt, pos, mask) = next(data)
        rec = {}
        valid = (tgt != -100).view(-1)
        logits = net(tok, pos, mask, rec, select=valid)
        loss = Fn.cross_entropy(logits, tgt.view(-1)[valid])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_([v for _, v in params], TRAIN["grad_clip"]))
        opt.step()
        # aux-loss-free balancing (DeepSeek-V3): bias += u * sign(mean load - load), real tokens
        loads = []
        with torch.no_grad():
            for li, idx in zip(moe_layers, rec["routing"]):
                cnt = torch.bincount(idx.view(-1, d["K"])[valid].reshape(-1),
                                     minlength=d["X"]).float()
                layers[li][MOE + "gate/bias"] += TRAIN["bias_update_rate"] * torch.sign(
                    cnt.mean() - cnt)
                loads.append(float(cnt.max() / cnt.mean()))
        ml = torch.stack(rec["max_logits"])                                   # [L, B, H]
        if step == steps - 1:
            last_stats = ml.clone()
        ntok = int(valid.sum())
        win_loss.append(float(loss))
        win_tok += ntok
        if (step + 1) % TRAIN["log_every"] == 0 or step == steps - 1:
            now = time.time()
            log("step %5d/%d  epoch %2d  loss %.4f  lr %.2e  gnorm %.2f  max_logit %.1f  "
                "max_load %.2f  tok/s %.0f  elapsed %.0fs"
                % (step + 1, steps, epoch, np.mean(win_loss), lr, gnorm, float(ml.max()),
                   max(loads), win_tok / (now - win_t), now - t0))
            hist.append({"step": step + 1, "loss": float(np.mean(win_loss)),
                         "elapsed_s": round(now - t0, 1)})
            win_loss, win_tok, win_t = [], 0, now
        if valid_seqs and ((step + 1) % TRAIN["valid_every"] == 0 or step == steps - 1):
            vl = eval_loss_packed(Net(g, layers, lowp=True), valid_seqs, T)
            log("           valid loss %.4f (ppl %.2f)" % (vl, math.exp(vl)))
            hist[-1]["valid_loss"] = vl
    for _, v in params:
        v.requires_grad_(False)
    return hist, last_stats, time.time() - t0


def lora_modules(li):
    return [m for m in LORA["targets"] if m + "/kernel" in layer_shapes(layer_kind(li))]


def lora_in_out(li, m):
    shp = layer_shapes(layer_kind(li))[m + "/kernel"]
    n_in = shp[0] * shp[1] if m == "self_attention/out" else shp[0]
    return n_in, int(np.prod(shp)) // n_in, shp


def train_lora(g_b, layers_b, seqs, steps, seed):
    """Base frozen at its bf16 values; A ~ N(0, 1/in), B = 0; y = xW + (alpha/r)(xA)B."""
    gen = torch.Generator().manual_seed(seed + 1)
    r = LORA["r"]
    lora = {}
    for li in range(dims()["L"]):
        for m in lora_modules(li):
            n_in, n_out, _ = lora_in_out(li, m)
            a = (torch.randn(n_in, r, generator=gen) / math.sqrt(n_in)).requires_grad_(True)
            b = torch.zeros(r, n_out).requires_grad_(True)
            lora[(li, m)] = (a, b)
    params = [t for ab in lora.values() for t in ab]
    opt = torch.optim.AdamW(params, lr=LORA["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    s = LORA["lora_alpha"] / r
    T = TRAIN["seq_len"]
    net = Net(g_b, layers_b, lowp=True, lora=lora, lora_scale=s)
    data = batches(seqs, LORA["batch_rows"], T, seed + 2)
    t0, win, win_tok, win_t = time.time(), [], 0, time.time()
    hist = []
    for step in range(steps):
        lr = lr_at(step, steps, LORA["warmup"], LORA["lr"], 0.1)
        for grp in opt.param_groups:
            grp["lr"] = lr
        epoch, (tok, tgt, pos, mask) = next(data)
        valid = (tgt != -100).view(-1)
        loss = Fn.cross_entropy(net(tok, pos, mask, select=valid), tgt.view(-1)[valid])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        win.append(float(loss))
        win_tok += int((tgt != -100).sum())
        if (step + 1) % TRAIN["log_every"] == 0 or step == steps - 1:
            now = time.time()
            log("lora %5d/%d  epoch %2d  loss %.4f  lr %.2e  tok/s %.0f  elapsed %.0fs"
                % (step + 1, steps, epoch, np.mean(win), lr, win_tok / (now - win_t), now - t0))
            hist.append({"step": step + 1, "loss": float(np.mean(win)),
                         "elapsed_s": round(now - t0, 1)})
            win, win_tok, win_t = [], 0, now
    out = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in lora.items()}
    return out, hist, time.time() - t0


# ------------------------------------------------------------------------------------------------
# evaluation (bf16-rounded weights, f32 compute)


def line_nlls(net, seqs):
    """Per line (sum NLL, predicted tokens), one sequence per line, positions from 0."""
    out = []
    with torch.no_grad():
        for s in seqs:
            t = torch.tensor(s[:-1])[None]
            T = t.shape[1]
            logits = net(t, torch.arange(T)[None], causal_mask(T))[0]
            lp = torch.log_softmax(logits, dim=-1)
            out.append((-float(lp[torch.arange(T), torch.tensor(s[1:])].double().sum()), T))
    return out


def perplexity(net, seqs):
    r = line_nlls(net, seqs)
    nll, n = sum(a for a, _ in r), sum(b for _, b in r)
    return math.exp(nll / n), nll / n, n


def greedy(net, prompt_ids, n, eos):
    seq = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            T = len(seq)
            logits = net(torch.tensor(seq)[None], torch.arange(T)[None], causal_mask(T))[0, -1]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            if nxt == eos:
                break
            seq.append(nxt)
    return out


def rounded(g, layers):
    return ({k: round_bf16(v) for k, v in g.items()},
            [{k: round_bf16(v) for k, v in t.items()} for t in layers])


def rounded_lora(lora):
    return {k: (round_bf16(a), round_bf16(b)) for k, (a, b) in lora.items()}


def merge_lora(layers_b, lora_b, scale):
    """W' = bf16(W + s * A @ B) in f32 (what `kiln export --merge-lora` does)."""
    out = [dict(t) for t in layers_b]
    for (li, m), (a, b) in lora_b.items():
        k = m + "/kernel"
        w = out[li][k]
        out[li][k] = round_bf16(w + scale * (a @ b).view(w.shape))
    return out


# ------------------------------------------------------------------------------------------------
# writing MaxText-layout files


def to_np(t):
    return t.detach().float().contiguous().numpy()


def checkpoint_tensors(g, layers):
    """Linen keys params.params.decoder..., groups dense_layers/moe_layers stacked on axis 1."""
    d = dims()
    p = "params.params."
    out = {p + "token_embedder.embedding": to_np(g["token_embedder/embedding"]),
           p + "decoder.decoder_norm.scale": to_np(g["decoder/decoder_norm/scale"]),
           p + "decoder.logits_dense.kernel": to_np(g["decoder/logits_dense/kernel"])}
    for group, idxs in (("dense_layers", range(0, d["Ld"])), ("moe_layers", range(d["Ld"], d["L"]))):
        idxs = list(idxs)
        for name in layer_shapes(layer_kind(idxs[0])):
            out[p + "decoder.%s.%s" % (group, name.replace("/", "."))] = np.stack(
                [to_np(layers[i][name]) for i in idxs], axis=1)
    return out


def write_bf16(path, tensors, metadata):
    st.write_safetensors(path, {k: (v, "BF16") for k, v in tensors.items()}, metadata=metadata)


def write_max_logits(path, stats):
    """Last step's [L, batch, heads] statistics as MaxText intermediates, stacked per group."""
    d = dims()
    s = stats.float().numpy()
    pre = "intermediates.decoder.%s.self_attention.attention_op.max_logits"
    st.write_safetensors(path, {pre % "dense_layers": np.ascontiguousarray(s[:d["Ld"]]),
                                pre % "moe_layers": np.ascontiguousarray(s[d["Ld"]:])},
                         metadata={"format": "maxtext-intermediates",
                                   "layout": "[layers_in_group, batch, heads], scaled masked "
                                             "logits, last training step"})


def write_adapter(directory, lora_b):
    """MaxText adapter (docs/maxtext.md §4.1): adapter_config.json + one safetensors file, Linen keys,
    scanned groups with the layer axis at 1; A = in_dims + (r,), B = (r,) + out_dims."""
    d = dims()
    r = LORA["r"]
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for group, idxs in (("dense_layers", list(range(0, d["Ld"]))),
                        ("moe_layers", list(range(d["Ld"], d["L"])))):
        for m in lora_modules(idxs[0]):
            _, _, shp = lora_in_out(idxs[0], m)
            n_ax = 2 if m == "self_attention/out" else 1
            a_shape, b_shape = tuple(shp[:n_ax]) + (r,), (r,) + tuple(shp[n_ax:])
            key = "params.params.decoder.%s.%s." % (group, m.replace("/", "."))
            tensors[key + "lora_a.kernel"] = (np.stack(
                [to_np(lora_b[(i, m)][0]).reshape(a_shape) for i in idxs], axis=1), "BF16")
            tensors[key + "lora_b.kernel"] = (np.stack(
                [to_np(lora_b[(i, m)][1]).reshape(b_shape) for i in idxs], axis=1), "BF16")
    names = {"self_attention/out": "o_proj"}
    config = {"r": r, "lora_alpha": LORA["lora_alpha"],
              "target_modules": [names.get(m, m.replace("/", ".")) for m in LORA["targets"]]}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    st.write_safetensors(os.path.join(directory, "adapter.safetensors"), tensors,
                         metadata={"format": "maxtext-lora"})


def yaml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"%s"' % v
    if isinstance(v, list):
        return "[" + ", ".join(yaml_value(e) for e in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def write_config(path):
    lines = ["# kiln default model (tools/train_default.py): MaxText model config, decoder_block "
             "deepseek.", "# Trained on the King James Bible; see README.md.", ""]
    for k, v in MODEL.items():
        lines.append("%s: %s" % (k, yaml_value(v)))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_checkpoint(directory):
    """(g, layers) as f32 torch tensors from a written model.safetensors (values as stored)."""
    d = dims()
    raw = st.read_checkpoint([os.path.join(directory, "model.safetensors")])
    p = "params.params."
    g = {k: torch.from_numpy(raw[p + k.replace("/", ".")].copy())
         for k in ("token_embedder/embedding", "decoder/decoder_norm/scale",
                   "decoder/logits_dense/kernel")}
    layers = []
    for i in range(d["L"]):
        group, j = ("dense_layers", i) if i < d["Ld"] else ("moe_layers", i - d["Ld"])
        t = {}
        for name in layer_shapes(layer_kind(i)):
            arr = raw[p + "decoder.%s.%s" % (group, name.replace("/", "."))]
            t[name] = torch.from_numpy(np.ascontiguousarray(np.take(arr, j, axis=1)))
        layers.append(t)
    return g, layers


def load_adapter(directory):
    d = dims()
    raw = st.read_checkpoint([os.path.join(directory, "adapter.safetensors")])
    out = {}
    for i in range(d["L"]):
        group, j = ("dense_layers", i) if i < d["Ld"] else ("moe_layers", i - d["Ld"])
        for m in lora_modules(i):
            n_in, n_out, _ = lora_in_out(i, m)
            key = "params.params.decoder.%s.%s." % (group, m.replace("/", "."))
            a = np.take(raw[key + "lora_a.kernel"], j, axis=1).reshape(n_in, -1)
            b = np.take(raw[key + "lora_b.kernel"], j, axis=1).reshape(-1, n_out)
            out[(i, m)] = (torch.from_numpy(np.ascontiguousarray(a)),
                           torch.from_numpy(np.ascontiguousarray(b)))
    return out


def param_count(g, layers):
    return sum(v.numel() for v in g.values()) + sum(v.numel() for t in layers for v in t.values())


# ------------------------------------------------------------------------------------------------
# main


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Train kiln's default model (DeepSeek-style MLA+MoE on the KJV Bible) and "
                    "its LoRA style adapter; write them in MaxText's scanned layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs in --out: model.safetensors config.yml max_logits.safetensors "
               "tokenizer.model adapter/ heldout.txt heldout.tokens calibration.txt "
               "reference.json README.md")
    ap.add_argument("--out", default=os.path.join(REPO, "models", "default"),
                    help="output directory (default: models/default)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help="seed for initialisation and data order (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"],
                    help="base training steps (default: %(default)s)")
    ap.add_argument("--lora-steps", type=int, default=LORA["steps"],
                    help="adapter training steps (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--no-numpy-check", action="store_true",
                    help="skip running tests/reference/perplexity_ref.py on the result")
    ap.add_argument("--no-engine-check", action="store_true",
                    help="skip `kiln export` + `kiln eval` of the result (only run when "
                         "build/kiln exists)")
    ap.add_argument("--logits", metavar="IDS",
                    help="do not train: print/save the torch f32 logits (bf16 weights) of the "
                         "model in --out for these comma-separated ids and exit")
    ap.add_argument("--adapter-mode", choices=["none", "merged", "runtime"], default="none",
                    help="with --logits: the adapter to apply")
    ap.add_argument("--logits-out", metavar="FILE.npy", help="with --logits: write them here")
    return ap.parse_args(argv)


def logits_only(a):
    g, layers = rounded(*load_checkpoint(a.out))
    s = LORA["lora_alpha"] / LORA["r"]
    lora = None
    if a.adapter_mode != "none":
        lora = rounded_lora(load_adapter(os.path.join(a.out, "adapter")))
        if a.adapter_mode == "merged":
            layers, lora = merge_lora(layers, lora, s), None
    net = Net(g, layers, lowp=False, lora=lora, lora_scale=s)
    ids = [int(t) for t in a.logits.split(",")]
    with torch.no_grad():
        out = net(torch.tensor(ids)[None], torch.arange(len(ids))[None],
                  causal_mask(len(ids)))[0].numpy().astype(np.float32)
    if a.logits_out:
        np.save(a.logits_out, out)
    print("argmax per position:", ",".join(str(int(i)) for i in out.argmax(-1)))
    return 0


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.logits:
        return logits_only(a)
    if os.path.exists(a.out) and os.listdir(a.out) and not a.force:
        sys.exit("error: %s exists and is not empty (use --force to replace it)" % a.out)
    t_start = time.time()
    torch.manual_seed(a.seed)
    if hasattr(torch, "use_deterministic_algorithms"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    # 1. corpus and split
    verses = load_bible()
    sp_lines = split_corpus(verses)
    log("corpus: %d verses; base %d, held-out %d, valid %d, style %d (+%d style held-out)"
        % (len(verses), len(sp_lines["base"]), len(sp_lines["heldout"]), len(sp_lines["valid"]),
           len(sp_lines["style"]), len(sp_lines["style_heldout"])))

    # 2. tokenizer
    t0 = time.time()
    sp = train_tokenizer(sp_lines["base"], os.path.join(tmp, "tokenizer.model"),
                         {"heldout": sp_lines["heldout"], "base": sp_lines["base"],
                          "style": sp_lines["style"] + sp_lines["style_heldout"],
                          "valid": sp_lines["valid"]})
    bos, eos = sp.bos_id(), sp.eos_id()
    enc = {k: [[bos] + sp.encode(s) + [eos] for s in v] for k, v in sp_lines.items()}
    n_tok = {k: sum(len(s) - 1 for s in v) for k, v in enc.items()}
    longest = max(len(s) for v in enc.values() for s in v)
    if longest > MODEL["max_target_length"]:
        sys.exit("error: a verse has %d tokens with bos/eos > max_target_length" % longest)
    log("tokenizer: %d pieces in %.1fs, round trip ok; predicted tokens: base %d, held-out %d, "
        "style %d; longest verse %d tokens" % (sp.get_piece_size(), time.time() - t0,
                                               n_tok["base"], n_tok["heldout"], n_tok["style"],
                                               longest))

    # check our YaRN table against the project's numpy reference
    import deepseek_ref as dr
    cfg_ref = dr.load_config(dict(MODEL, emb_dim=MODEL["base_emb_dim"],
                                  num_query_heads=MODEL["base_num_query_heads"],
                                  mlp_dim=MODEL["base_mlp_dim"],
                                  moe_mlp_dim=MODEL["base_moe_mlp_dim"],
                                  num_decoder_layers=MODEL["base_num_decoder_layers"]))
    c_ref, s_ref = dr.yarn_cos_sin(np.arange(MODEL["max_position_embeddings"]),
                                   MODEL["qk_rope_head_dim"], cfg_ref)
    c_me, s_me, lowhigh, freqs = yarn_tables(MODEL["qk_rope_head_dim"], MODEL,
                                             MODEL["max_position_embeddings"])
    assert np.array_equal(c_ref, c_me) and np.array_equal(s_ref, s_me), "YaRN table mismatch"
    assert abs(dr.softmax_scale(cfg_ref) - softmax_scale(MODEL)) < 1e-15
    log("YaRN: correction range %s, inverse freqs %s; softmax scale %.6f (bf16 %.6f)"
        % (lowhigh, np.array2string(freqs, precision=4), softmax_scale(MODEL),
           bf16_value(softmax_scale(MODEL))))

    # 3. base model
    gen = torch.Generator().manual_seed(a.seed)
    g, layers = init_params(gen)
    n_params = param_count(g, layers)
    log("model: %s, %d parameters (%.2f MB bf16)" % (MODEL["model_name"], n_params,
                                                    n_params * 2 / 1e6))
    hist, last_stats, t_base = train_base(g, layers, enc["base"], enc["valid"], a.steps, a.seed)
    log("base training: %.0fs" % t_base)
    g_b, layers_b = rounded(g, layers)

    # 4. adapter
    lora, lora_hist, t_lora = train_lora(g_b, layers_b, enc["style"], a.lora_steps, a.seed)
    lora_b = rounded_lora(lora)
    s = LORA["lora_alpha"] / LORA["r"]
    log("adapter training: %.0fs" % t_lora)

    # 5. write
    meta = {"format": "maxtext-linen", "source": "tools/train_default.py", "seed": str(a.seed)}
    write_bf16(os.path.join(tmp, "model.safetensors"), checkpoint_tensors(g_b, layers_b), meta)
    write_config(os.path.join(tmp, "config.yml"))
    write_max_logits(os.path.join(tmp, "max_logits.safetensors"), last_stats)
    write_adapter(os.path.join(tmp, "adapter"), lora_b)
    with open(os.path.join(tmp, "heldout.txt"), "w") as f:
        f.write("".join(line + "\n" for line in sp_lines["heldout"]))
    with open(os.path.join(tmp, "heldout.tokens"), "w") as f:
        f.write("".join(",".join(str(t) for t in s_[1:-1]) + "\n" for s_ in enc["heldout"]))
    with open(os.path.join(tmp, "calibration.txt"), "w") as f:
        f.write("".join(",".join(str(t) for t in s_[:-1]) + "\n" for s_ in enc["calibration"]))

    # the files must give back exactly the weights evaluated below
    g_r, layers_r = load_checkpoint(tmp)
    assert all(torch.equal(g_r[k], g_b[k]) for k in g_b)
    assert all(torch.equal(layers_r[i][k], layers_b[i][k]) for i in range(len(layers_b))
               for k in layers_b[i])
    lr_ = load_adapter(os.path.join(tmp, "adapter"))
    assert all(torch.equal(lr_[k][0], lora_b[k][0]) and torch.equal(lr_[k][1], lora_b[k][1])
               for k in lora_b)

    # 6. evaluation: bf16 weights, f32 compute
    t0 = time.time()
    merged = merge_lora(layers_b, lora_b, s)
    nets = {"base": Net(g_b, layers_b, lowp=False),
            "lora_merged": Net(g_b, merged, lowp=False),
            "lora_runtime": Net(g_b, layers_b, lowp=False, lora=lora_b, lora_scale=s)}
    ppl = {}
    for name, net in nets.items():
        p, nll, n = perplexity(net, enc["heldout"])
        ppl[name] = {"perplexity": p, "mean_nll": nll}
        log("held-out perplexity %-13s %.4f  (mean NLL %.5f over %d tokens)" % (name, p, nll, n))
    style_ppl = {}
    for name in ("base", "lora_merged"):
        p, nll, n = perplexity(nets[name], enc["style_heldout"])
        style_ppl[name] = p
        log("style held-out (Proverbs 30-31) perplexity %-11s %.4f" % (name, p))
    samples = {}
    for prompt in PROMPTS:
        ids = [bos] + sp.encode(prompt)
        samples[prompt] = {"prompt_ids": ids}
        for name in ("base", "lora_merged"):
            out = greedy(nets[name], ids, 48, eos)
            text = sp.decode(ids[1:] + [t for t in out if t != eos])   # prompt + continuation
            samples[prompt][name] = {"ids": out, "text": text}
            log("greedy %-11s %s" % (name, text))
    t_eval = time.time() - t0

    ref = {
        "model": MODEL["model_name"],
        "seed": a.seed,
        "tokenizer": {"file": "tokenizer.model", "vocab_size": sp.get_piece_size(),
                      "bos_id": bos, "eos_id": eos, "unk_id": sp.unk_id()},
        "perplexity_definition": "per held-out line ids = [bos] + encode(line) + [eos], one "
                                 "sequence per line with positions from 0; every next token "
                                 "ids[1:] is scored; ppl = exp(sum NLL / predicted tokens)",
        "compute": "torch f32 on weights rounded to bf16; adapter A/B rounded to bf16; merged "
                   "W' = bf16(W + s*A@B) in f32; run-time y = xW + s*(xA)B",
        "heldout": {"file": "heldout.tokens", "lines": len(enc["heldout"]),
                    "predicted_tokens": n_tok["heldout"], "books": SPLIT["heldout"]},
        "perplexity": {k: v["perplexity"] for k, v in ppl.items()},
        "mean_nll": {k: v["mean_nll"] for k, v in ppl.items()},
        "adapter": {"dir": "adapter", "r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
                    "scale": s, "targets": LORA["targets"]},
        "style_heldout_perplexity": style_ppl,
        "max_logits": {"file": "max_logits.safetensors", "shape_per_group": "[layers, batch, "
                       "heads]", "max_per_layer": [float(v) for v in
                                                   last_stats.amax(dim=(1, 2))],
                       "max": float(last_stats.max())},
        "greedy": samples,
        "training": {"base_steps": a.steps, "lora_steps": a.lora_steps,
                     "base_seconds": round(t_base, 1), "lora_seconds": round(t_lora, 1),
                     "final_base_loss": hist[-1]["loss"],
                     "final_valid_loss": hist[-1].get("valid_loss"),
                     "final_lora_loss": lora_hist[-1]["loss"], "parameters": n_params,
                     "threads": a.threads, "torch": torch.__version__},
    }

    # 7. the numpy reference on the written files (tests/reference/perplexity_ref.py)
    numpy_ppl = {}
    pref = os.path.join(REPO, "tests", "reference", "perplexity_ref.py")
    if not a.no_numpy_check and os.path.exists(pref):
        for name, extra in (("base", []), ("lora_merged", ["--adapter", "adapter", "--mode",
                                                           "merged"]),
                            ("lora_runtime", ["--adapter", "adapter", "--mode", "runtime"])):
            extra = [os.path.join(tmp, e) if e == "adapter" else e for e in extra]
            r = subprocess.run([sys.executable, pref, tmp, "--json", "--bos", str(bos),
                                "--eos", str(eos)] + extra,
                               stdout=subprocess.PIPE, check=True)
            numpy_ppl[name] = json.loads(r.stdout)["perplexity"]
            log("numpy reference perplexity %-13s %.4f  (torch %.4f, rel. diff %+.3f%%)"
                % (name, numpy_ppl[name], ref["perplexity"][name],
                   100 * (numpy_ppl[name] / ref["perplexity"][name] - 1)))
        ref["numpy_reference_perplexity"] = numpy_ppl
    # 8. the C++ engine, if it is built (informational; the script never needs it)
    engine = engine_perplexities(tmp, bos, eos) if not a.no_engine_check else {}
    for name, v in engine.items():
        log("kiln eval perplexity %-13s %.4f  (torch %.4f, rel. diff %+.3f%%)"
            % (name, v, ref["perplexity"][name], 100 * (v / ref["perplexity"][name] - 1)))
    if engine:
        ref["kiln_eval_perplexity"] = engine
    ref["training"]["eval_seconds"] = round(t_eval, 1)
    ref["training"]["total_seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(tmp, "reference.json"), "w") as f:
        json.dump(ref, f, indent=2)
        f.write("\n")
    write_readme(os.path.join(tmp, "README.md"), ref, sp_lines, n_tok, hist, lora_hist,
                 n_params, lowhigh)

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.rename(tmp, a.out)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(a.out) for f in fs)
    log("wrote %s (%.2f MB) in %.0fs total" % (a.out, total / 1e6, time.time() - t_start))
    return 0


def engine_perplexities(directory, bos, eos):
    """`kiln export` (+ --tokenizer, the adapter merged / run-time) and `kiln eval` on the held-out
    text, if build/kiln exists. Any failure is reported and skipped."""
    kiln = os.path.join(REPO, "build", "kiln")
    if not os.access(kiln, os.X_OK):
        log("note: %s not built; skipping the engine check" % kiln)
        return {}
    import tempfile
    out = {}
    base = [kiln, "export", "--checkpoint", os.path.join(directory, "model.safetensors"),
            "--config", os.path.join(directory, "config.yml"), "--tokenizer",
            os.path.join(directory, "tokenizer.model"), "--force"]
    adapter = os.path.join(directory, "adapter")
    text = os.path.join(directory, "heldout.txt")
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-default-") as tdir:
            art, merged = os.path.join(tdir, "base.kiln"), os.path.join(tdir, "merged.kiln")
            subprocess.run(base + ["--out", art, "--lora", adapter, "--lora-name", "style"],
                           check=True, stdout=subprocess.DEVNULL)
            subprocess.run(base + ["--out", merged, "--lora", adapter, "--merge-lora"],
                           check=True, stdout=subprocess.DEVNULL)
            for name, d, extra in (("base", art, []), ("lora_merged", merged, []),
                                   ("lora_runtime", art, ["--adapter", "style"])):
                r = subprocess.run([kiln, "eval", d, "--text-file", text, "--json", "--threads",
                                    str(torch.get_num_threads())] + extra, check=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                out[name] = float(json.loads(r.stdout)["perplexity"])
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as e:
        log("note: engine check skipped (%s)" % e)
        return {}
    return out


def write_readme(path, ref, sp_lines, n_tok, hist, lora_hist, n_params, lowhigh):
    d = dims()
    tr = ref["training"]
    p = ref["perplexity"]
    npp = ref.get("numpy_reference_perplexity", {})
    L = []
    w = L.append
    w("# kiln default model: `%s`" % MODEL["model_name"])
    w("")
    w("A small DeepSeek-style language model (MLA attention with a low-rank query, YaRN RoPE, "
      "1 dense + 3 MoE layers with sigmoid routing, a routing bias and a shared expert) trained "
      "on the King James Bible, written exactly as a MaxText training run stores its "
      "parameters (safetensors, Linen keys `params.params.decoder...`, scanned groups "
      "`dense_layers` and `moe_layers` with the layer axis at 1), plus a rank-8 LoRA style "
      "adapter. Produced by `tools/train_default.py`; nothing in the build, the tests or the "
      "demo runs that script.")
    w("")
    w("## Files")
    w("")
    w("| file | what |")
    w("|---|---|")
    w("| `model.safetensors` | the parameters, bf16 (rounded once from the f32 master weights) |")
    w("| `config.yml` | MaxText model config (`kiln export --config`) |")
    w("| `max_logits.safetensors` | last training step's per-head max attention logits (spec "
      "§3), MaxText intermediates `…{dense,moe}_layers.self_attention.attention_op.max_logits`"
      " `[layers, batch, heads]`, for `kiln export --max-logits … --qk-clip-threshold τ` |")
    w("| `tokenizer.model` | SentencePiece (unigram, %d pieces, unk 0 / bos %d / eos %d, byte "
      "fallback, identity normalisation) |" % (ref["tokenizer"]["vocab_size"],
                                              ref["tokenizer"]["bos_id"],
                                              ref["tokenizer"]["eos_id"]))
    w("| `adapter/` | LoRA r=%d, alpha %g (scale %g), MaxText adapter layout (docs/maxtext.md §4.1): "
      "`adapter_config.json` + `adapter.safetensors` (bf16, scanned) |"
      % (LORA["r"], LORA["lora_alpha"], ref["adapter"]["scale"]))
    w("| `heldout.txt` / `heldout.tokens` | the %d held-out verses, text and token ids (no "
      "bos/eos) |" % ref["heldout"]["lines"])
    w("| `calibration.txt` | %d training verses as `[bos] + ids` for `kiln export "
      "--qk-clip-calibrate` |" % len(CALIBRATION_VERSES))
    w("| `reference.json` | bos/eos ids, held-out line and token counts, perplexities (torch and "
      "the numpy reference), greedy samples (prompt ids and continuation ids), training "
      "figures |")
    w("")
    w("## Source and licence")
    w("")
    w("Text: the King James Version as shipped by Debian's `bible-kjv` / `bible-kjv-text` "
      "(`bible -f \"Gen1:1-Rev22:21\"`, 31102 verses, the `Ge1:1 ` reference prefix stripped, "
      "one verse per line). The KJV text is in the public domain (see "
      "`/usr/share/doc/bible-kjv-text/copyright`: \"The copyright for the King James Version "
      "text of the Bible is expired\"). The weights, the tokenizer and the adapter are derived "
      "from that text alone (and the seeded initialisation) by `tools/train_default.py`: no "
      "third-party weights, tokenizers or data sets are involved.")
    w("")
    w("## Split (by book, as `bible` abbreviates them)")
    w("")
    w("| set | books | verses | predicted tokens |")
    w("|---|---|---|---|")
    w("| held-out (never trained on) | %s | %d | %d |" % (", ".join(SPLIT["heldout"]),
                                                         len(sp_lines["heldout"]),
                                                         n_tok["heldout"]))
    w("| validation (loss monitoring only) | %s | %d | %d |" % (", ".join(SPLIT["valid"]),
                                                               len(sp_lines["valid"]),
                                                               n_tok["valid"]))
    w("| adapter (style) | Psa, Prv except Prv 30–31 | %d | %d |" % (len(sp_lines["style"]),
                                                                   n_tok["style"]))
    w("| style held-out (adapter check) | Prv 30–31 | %d | %d |"
      % (len(sp_lines["style_heldout"]), n_tok["style_heldout"]))
    w("| base training (tokenizer too) | every other book | %d | %d |"
      % (len(sp_lines["base"]), n_tok["base"]))
    w("")
    w("## Model")
    w("")
    w("`decoder_block: deepseek`, model_name `%s` (a `deepseek3` name: experts are selected "
      "with the biased sigmoid scores and weighted with the pre-bias ones, docs/maxtext.md §2.7)."
      % MODEL["model_name"])
    w("")
    w("| | |")
    w("|---|---|")
    w("| parameters | %d (%.2f MB as bf16) |" % (n_params, n_params * 2 / 1e6))
    w("| layers | %d: %d dense (`dense_layers`) + %d MoE (`moe_layers`) |"
      % (d["L"], d["Ld"], d["L"] - d["Ld"]))
    w("| emb / vocab | %d / %d, untied output head (`logits_dense`) |" % (d["E"], d["V"]))
    w("| MLA | %d heads, q_lora_rank %d, kv_lora_rank %d, nope/rope/v head dims %d/%d/%d |"
      % (d["H"], d["Rq"], d["Rkv"], d["Dn"], d["Dr"], d["Dv"]))
    w("| YaRN | θ %g, original_max_position_embeddings %d → max_position_embeddings %d, factor "
      "%g, beta_fast/slow %g/%g, mscale %g (correction range %s); softmax scale %.6f |"
      % (MODEL["rope_max_timescale"], MODEL["original_max_position_embeddings"],
         MODEL["max_position_embeddings"], MODEL["rope_factor"], MODEL["beta_fast"],
         MODEL["beta_slow"], MODEL["mscale"], lowhigh, softmax_scale(MODEL)))
    w("| dense MLP | %d |" % d["F"])
    w("| MoE | %d routed experts of width %d, top-%d, sigmoid scores, routing bias "
      "(aux-loss-free updates, rate %g), routed_scaling_factor %g, %d shared expert |"
      % (d["X"], d["Fm"], d["K"], TRAIN["bias_update_rate"], MODEL["routed_scaling_factor"],
         d["S"]))
    w("| context | max_target_length %d (every verse fits with bos/eos) |"
      % MODEL["max_target_length"])
    w("")
    w("## Training")
    w("")
    w("Base: %d steps of %d rows × %d tokens (verses packed, each its own segment: positions "
      "restart at 0 and attention stays inside the verse; padding ignored), AdamW (β %s, weight "
      "decay %g on matrices), lr %g with %d warm-up steps and cosine decay to %g×, gradient "
      "clip %g; f32 master weights, bf16 matmuls. Adapter: %d steps, lr %g, base frozen at its "
      "bf16 values, A ~ N(0, 1/in), B = 0."
      % (tr["base_steps"], TRAIN["batch_rows"], TRAIN["seq_len"], TRAIN["betas"],
         TRAIN["weight_decay"], TRAIN["lr"], TRAIN["warmup"], TRAIN["lr_final_frac"],
         TRAIN["grad_clip"], tr["lora_steps"], LORA["lr"]))
    w("")
    w("The step count stops before over-fitting: the base text is under a million tokens, and "
      "a 1700-step run (7.2 epochs) reached its best validation loss (3.63) near epoch 4 and "
      "ended at 3.80, with held-out perplexity 62.8.")
    w("")
    w("| | |")
    w("|---|---|")
    w("| machine | 2 threads (`torch.set_num_threads(2)`), torch %s |" % tr["torch"])
    w("| base training time | %.0f s |" % tr["base_seconds"])
    w("| adapter training time | %.0f s |" % tr["lora_seconds"])
    w("| evaluation | %.0f s |" % tr["eval_seconds"])
    w("| whole script | %.0f s |" % tr["total_seconds"])
    w("| final base train loss (last %d steps) | %.4f |" % (TRAIN["log_every"],
                                                          tr["final_base_loss"]))
    if tr.get("final_valid_loss") is not None:
        w("| final validation loss | %.4f (ppl %.2f) |" % (tr["final_valid_loss"],
                                                         math.exp(tr["final_valid_loss"])))
    w("| final adapter train loss | %.4f |" % tr["final_lora_loss"])
    w("")
    w("## Held-out perplexity")
    w("")
    w("Definition (shared by this script, `tests/reference/perplexity_ref.py` and the engine): "
      "for each line of `heldout.txt`, ids = [bos] + encode(line) + [eos]; one sequence per "
      "line, positions from 0; every next token ids[1:] is scored; ppl = exp(Σ NLL / Σ "
      "predicted tokens). %d lines, %d predicted tokens."
      % (ref["heldout"]["lines"], ref["heldout"]["predicted_tokens"]))
    w("")
    eng = ref.get("kiln_eval_perplexity", {})
    w("| model | torch (f32 compute, bf16 weights) | numpy reference (MaxText bf16 rounding) "
      "| `kiln eval` at training time |")
    w("|---|---|---|---|")
    for k, label in (("base", "base"), ("lora_merged", "base + adapter, merged"),
                     ("lora_runtime", "base + adapter, run time")):
        w("| %s | %.4f | %s | %s |" % (label, p[k], "%.4f" % npp[k] if k in npp else "—",
                                      "%.4f" % eng[k] if k in eng else "—"))
    w("")
    w("Style held-out (Proverbs 30–31): base %.3f, with the adapter %.3f."
      % (ref["style_heldout_perplexity"]["base"], ref["style_heldout_perplexity"]["lora_merged"]))
    w("")
    w("Max attention logit of the last training step (the statistic QK-Clip reads), per "
      "layer: %s." % ", ".join("%.2f" % v for v in ref["max_logits"]["max_per_layer"]))
    w("")
    w("## Greedy samples (torch)")
    w("")
    for prompt, sm in ref["greedy"].items():
        w("- `%s`" % prompt)
        w("  - base: *%s*" % sm["base"]["text"])
        w("  - with the adapter: *%s*" % sm["lora_merged"]["text"])
    w("")
    w("## Reproduce and check")
    w("")
    w("```sh")
    w("/usr/bin/python3 tools/train_default.py --force        # about %.0f minutes on 2 cores"
      % (tr["total_seconds"] / 60))
    w("/usr/bin/python3 tests/reference/perplexity_ref.py models/default")
    w("/usr/bin/python3 tests/reference/perplexity_ref.py models/default --adapter "
      "models/default/adapter --mode merged")
    w("build/kiln export --checkpoint models/default/model.safetensors --config "
      "models/default/config.yml --out /tmp/default.kiln \\")
    w("    --tokenizer models/default/tokenizer.model")
    w("build/kiln eval /tmp/default.kiln --text-file models/default/heldout.txt")
    w("build/kiln run /tmp/default.kiln --prompt \"And the LORD said unto\" --max-tokens 48")
    w("build/kiln export --checkpoint models/default/model.safetensors --config "
      "models/default/config.yml --out /tmp/default-clip.kiln \\")
    w("    --max-logits models/default/max_logits.safetensors --qk-clip-threshold %d"
      % max(1, int(0.8 * ref["max_logits"]["max"])))
    w("build/kiln export --checkpoint models/default/model.safetensors --config "
      "models/default/config.yml --out /tmp/default-style.kiln \\")
    w("    --lora models/default/adapter --lora-name style")
    w("```")
    w("")
    w("Training history (every %d steps: mean train loss; validation loss where measured):"
      % TRAIN["log_every"])
    w("")
    w("```")
    every = max(1, len(hist) // 24)
    shown = [h for i, h in enumerate(hist) if i % every == 0 or i == len(hist) - 1]
    for h in shown:
        w("step %5d  loss %.4f%s  %6.0fs" % (h["step"], h["loss"],
                                            "  valid %.4f" % h["valid_loss"]
                                            if "valid_loss" in h else "", h["elapsed_s"]))
    w("```")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
