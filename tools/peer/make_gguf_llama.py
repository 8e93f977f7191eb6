#!/usr/bin/python3
"""Convert kiln's synthetic Llama-3.2-1B-shaped MaxText checkpoint (tools/make_synthetic_1b) to a
bf16 GGUF (llama architecture) with the same weights, for llama.cpp side-by-side timings.

    PYTHONPATH=$KILN_PEER/llama.cpp/gguf-py /usr/bin/python3 tools/peer/make_gguf_llama.py \
        --checkpoint out/synthetic-1b/model.safetensors --config out/synthetic-1b/config.json \
        --out s1b.gguf

Weights are copied bit-exactly (bf16 -> bf16); MaxText kernels are [in, (L), out...] with the
scanned layer axis at index 1, GGUF numpy arrays are [out, in]. Norm scales are written as f32.
The tokenizer is a dummy SPM ("llama") vocabulary of vocab_size tokens (<unk>, <s>, </s>, 256 byte
tokens, then filler tokens): llama-bench uses random ids, so only its size matters.
Not reproduced: MaxText's folding of 1/sqrt(head_dim) into the query (llama.cpp scales again) and
Llama-3.1 RoPE frequency scaling (no rope_freqs tensor); neither changes shapes or work per token.
"""
import sys

import numpy as np
import gguf

from gguf_common import BF16, F32, add_dummy_vocab, parse_args, bf16_to_f32, open_checkpoint, write_plan


def main():
    a, cfg = parse_args(__doc__.splitlines()[0])
    E, H, K, D = cfg["emb_dim"], cfg["num_query_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    F, L, V = cfg["mlp_dim"], cfg["num_decoder_layers"], cfg["vocab_size"]
    eps = cfg.get("normalization_layer_epsilon", 1e-5)
    theta = cfg.get("rope_max_timescale", 500000)

    T = open_checkpoint(a.checkpoint)

    lay = "decoder.layers."
    # (gguf name, producer returning an array in GGUF numpy order [out, in], dtype)
    plan = [
        ("token_embd.weight", (V, E), BF16, lambda: np.ascontiguousarray(T("token_embedder.embedding"))),
        ("output_norm.weight", (E,), F32, lambda: bf16_to_f32(np.asarray(T("decoder.decoder_norm.scale")))),
        ("output.weight", (V, E), BF16, lambda: np.ascontiguousarray(T("decoder.logits_dense.kernel").T)),
    ]
    for i in range(L):
        p = "blk.%d." % i
        plan += [
            (p + "attn_norm.weight", (E,), F32,
             lambda i=i: bf16_to_f32(np.ascontiguousarray(T(lay + "pre_self_attention_layer_norm.scale")[:, i]))),
            (p + "attn_q.weight", (H * D, E), BF16,
             lambda i=i: np.ascontiguousarray(T(lay + "self_attention.query.kernel")[:, i].reshape(E, H * D).T)),
            (p + "attn_k.weight", (K * D, E), BF16,
             lambda i=i: np.ascontiguousarray(T(lay + "self_attention.key.kernel")[:, i].reshape(E, K * D).T)),
            (p + "attn_v.weight", (K * D, E), BF16,
             lambda i=i: np.ascontiguousarray(T(lay + "self_attention.value.kernel")[:, i].reshape(E, K * D).T)),
            (p + "attn_output.weight", (E, H * D), BF16,
             lambda i=i: np.ascontiguousarray(T(lay + "self_attention.out.kernel")[:, i].reshape(H * D, E).T)),
            (p + "ffn_norm.weight", (E,), F32,
             lambda i=i: bf16_to_f32(np.ascontiguousarray(T(lay + "post_self_attention_layer_norm.scale")[:, i]))),
            (p + "ffn_gate.weight", (F, E), BF16,
             lambda i=i: np.ascontiguousarray(T(lay + "mlp.wi_0.kernel")[:, i].T)),
            (p + "ffn_up.weight", (F, E), BF16,
             lambda i=i: np.ascontiguousarray(T(lay + "mlp.wi_1.kernel")[:, i].T)),
            (p + "ffn_down.weight", (E, F), BF16,
             lambda i=i: np.ascontiguousarray(T(lay + "mlp.wo.kernel")[:, i].T)),
        ]

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("kiln synthetic Llama-3.2-1B shape")
    w.add_context_length(131072)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(eps))
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    add_dummy_vocab(w, V)
    w.add_add_bos_token(True)

    write_plan(w, plan, a.out)

if __name__ == "__main__":
    sys.exit(main())
