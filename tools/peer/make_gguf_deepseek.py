#!/usr/bin/python3
"""Convert kiln's synthetic DeepSeek-V2-Lite-shaped MaxText checkpoint (tools/make_synthetic_deepseek)
to a bf16 GGUF (deepseek2 architecture, MLA with split k_b/v_b, stacked experts).

    PYTHONPATH=$KILN_PEER/llama.cpp/gguf-py /usr/bin/python3 tools/peer/make_gguf_deepseek.py \
        --checkpoint out/synthetic-v2-lite/model.safetensors --config out/synthetic-v2-lite/config.json \
        --out ds.gguf

Weights copied bit-exactly; norm scales and the router (ffn_gate_inp) as f32. Dummy SPM vocabulary.
YaRN parameters are written as in convert_hf_to_gguf (factor, original context, log_mul 0.1*mscale).
"""
import sys

import numpy as np
import gguf

from gguf_common import BF16, F32, add_dummy_vocab, parse_args, open_checkpoint, write_plan
from gguf_common import bf16_to_f32 as f32


def main():
    a, c = parse_args(__doc__.splitlines()[0])
    E, H, Rkv = c["emb_dim"], c["num_query_heads"], c["kv_lora_rank"]
    Dn, Dr, Dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    F, Fm, X, S = c["mlp_dim"], c["moe_mlp_dim"], c["num_experts"], c["shared_experts"]
    L, Ld, V = c["num_decoder_layers"], c["first_num_dense_layers"], c["vocab_size"]

    T = open_checkpoint(a.checkpoint)
    C = np.ascontiguousarray
    plan = [
        ("token_embd.weight", (V, E), BF16, lambda: C(T("token_embedder.embedding"))),
        ("output_norm.weight", (E,), F32, lambda: f32(T("decoder.decoder_norm.scale"))),
        ("output.weight", (V, E), BF16, lambda: C(T("decoder.logits_dense.kernel").T)),
    ]
    for i in range(L):
        dense = i < Ld
        g = "decoder." + ("dense_layers." if dense else "moe_layers.")
        j = i if dense else i - Ld
        p = "blk.%d." % i
        A = g + "self_attention."
        plan += [
            (p + "attn_norm.weight", (E,), F32, lambda g=g, j=j: f32(T(g + "pre_self_attention_layer_norm.scale")[:, j])),
            (p + "attn_q.weight", (H * (Dn + Dr), E), BF16,
             lambda A=A, j=j: C(T(A + "query.kernel")[:, j].reshape(E, H * (Dn + Dr)).T)),
            (p + "attn_kv_a_mqa.weight", (Rkv + Dr, E), BF16, lambda A=A, j=j: C(T(A + "wkv_a.kernel")[:, j].T)),
            (p + "attn_kv_a_norm.weight", (Rkv,), F32, lambda A=A, j=j: f32(T(A + "kv_norm.scale")[:, j])),
            # wkv_b kernel [Rkv, H, Dn+Dv]: k_b numpy [H, Rkv, Dn], v_b numpy [H, Dv, Rkv]
            (p + "attn_k_b.weight", (H, Rkv, Dn), BF16,
             lambda A=A, j=j: C(T(A + "wkv_b.kernel")[:, j][:, :, :Dn].transpose(1, 0, 2))),
            (p + "attn_v_b.weight", (H, Dv, Rkv), BF16,
             lambda A=A, j=j: C(T(A + "wkv_b.kernel")[:, j][:, :, Dn:].transpose(1, 2, 0))),
            (p + "attn_output.weight", (E, H * Dv), BF16,
             lambda A=A, j=j: C(T(A + "out.kernel")[:, j].reshape(H * Dv, E).T)),
            (p + "ffn_norm.weight", (E,), F32, lambda g=g, j=j: f32(T(g + "post_self_attention_layer_norm.scale")[:, j])),
        ]
        if dense:
            plan += [
                (p + "ffn_gate.weight", (F, E), BF16, lambda g=g, j=j: C(T(g + "mlp.wi_0.kernel")[:, j].T)),
                (p + "ffn_up.weight", (F, E), BF16, lambda g=g, j=j: C(T(g + "mlp.wi_1.kernel")[:, j].T)),
                (p + "ffn_down.weight", (E, F), BF16, lambda g=g, j=j: C(T(g + "mlp.wo.kernel")[:, j].T)),
            ]
        else:
            m = g + "DeepSeekMoeBlock_0."
            plan += [
                (p + "ffn_gate_inp.weight", (X, E), F32, lambda m=m, j=j: f32(C(T(m + "MoeBlock_0.gate.kernel")[:, j].T))),
                (p + "ffn_gate_exps.weight", (X, Fm, E), BF16, lambda m=m, j=j: C(T(m + "MoeBlock_0.wi_0")[:, j].transpose(0, 2, 1))),
                (p + "ffn_up_exps.weight", (X, Fm, E), BF16, lambda m=m, j=j: C(T(m + "MoeBlock_0.wi_1")[:, j].transpose(0, 2, 1))),
                (p + "ffn_down_exps.weight", (X, E, Fm), BF16, lambda m=m, j=j: C(T(m + "MoeBlock_0.wo")[:, j].transpose(0, 2, 1))),
                (p + "ffn_gate_shexp.weight", (S * Fm, E), BF16, lambda m=m, j=j: C(T(m + "shared_experts.wi_0.kernel")[:, j].T)),
                (p + "ffn_up_shexp.weight", (S * Fm, E), BF16, lambda m=m, j=j: C(T(m + "shared_experts.wi_1.kernel")[:, j].T)),
                (p + "ffn_down_shexp.weight", (E, S * Fm), BF16, lambda m=m, j=j: C(T(m + "shared_experts.wo.kernel")[:, j].T)),
            ]

    w = gguf.GGUFWriter(a.out, "deepseek2")
    w.add_name("kiln synthetic DeepSeek-V2-Lite shape")
    w.add_context_length(c.get("max_position_embeddings", 163840))
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(c.get("normalization_layer_epsilon", 1e-6))
    w.add_leading_dense_block_count(Ld)
    w.add_vocab_size(V)
    w.add_q_lora_rank(0)
    w.add_kv_lora_rank(Rkv)
    w.add_key_length(Rkv + Dr)
    w.add_value_length(Rkv)
    w.add_key_length_mla(Dn + Dr)
    w.add_value_length_mla(Dv)
    w.add_expert_feed_forward_length(Fm)
    w.add_expert_count(X)
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_shared_count(S)
    w.add_expert_weights_scale(c.get("routed_scaling_factor", 1.0))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(Dr)
    w.add_rope_freq_base(float(c.get("rope_max_timescale", 10000)))
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(c.get("rope_factor", 40)))
    w.add_rope_scaling_orig_ctx_len(c.get("original_max_position_embeddings", 4096))
    w.add_rope_scaling_yarn_log_mul(0.1 * c.get("mscale", 0.707))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    add_dummy_vocab(w, V)

    write_plan(w, plan, a.out)

if __name__ == "__main__":
    sys.exit(main())
