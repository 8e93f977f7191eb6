// LoRA adapter reading (export/lora.h, docs/maxtext.md §4, §10.1): MaxText (Linen / NNX, scanned /
// unrolled, Llama and DeepSeek groups) and PEFT (transpose, llama3.1 permutation, query scale,
// rsLoRA, rank/alpha patterns) onto canonical tensors; the merge; and the refusals, each naming the
// key.
#include "export/lora.h"

#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "export/safetensors.h"

namespace fs = std::filesystem;
using namespace kiln;
using nlohmann::json;

namespace {

using Shape = std::vector<int64_t>;

// A fresh directory per test, removed afterwards.
struct TmpDir {
  fs::path path;
  explicit TmpDir(const std::string& name)
      : path(fs::temp_directory_path() / ("kiln_lora_" + name + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TmpDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
};

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// Values offset + i/8 (exact in f32), so every element is distinct and a slice is recognisable.
F32Tensor ramp(const std::string& key, const Shape& shape, float offset) {
  F32Tensor t{key, shape, std::vector<float>(size_t(numel(shape)))};
  for (size_t i = 0; i < t.data.size(); ++i) t.data[i] = offset + float(i) / 8.0f;
  return t;
}

void write_config(const TmpDir& d, const json& cfg) {
  std::ofstream(d.path / "adapter_config.json") << cfg.dump();
}

// The message of the kiln::Error `f` throws ("<no error>" if none), checked to be one line.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    std::string m = e.what();
    CHECK(m.find('\n') == std::string::npos);
    return m;
  }
  return "<no error>";
}

bool has(const std::string& msg, const std::string& part) {
  return msg.find(part) != std::string::npos;
}

// E 8, H 2, K 1, D 4, F 6, 3 layers.
ModelConfig llama_config(const std::string& block = "llama2",
                         RopeLayout rope = RopeLayout::HalfSplit) {
  ModelConfig c;
  c.decoder_block = block;
  c.emb_dim = 8;
  c.num_query_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 4;
  c.mlp_dim = 6;
  c.num_decoder_layers = 3;
  c.vocab_size = 16;
  c.rope_layout = rope;
  c.use_qk_norm = block == "qwen3";
  return c;
}

// E 8, H 2, Rkv 4, Dn 2, Dr 2, Dv 2, F 6; layer 0 dense, layers 1-2 MoE.
ModelConfig deepseek_config(int64_t q_lora_rank = 0) {
  ModelConfig c;
  c.decoder_block = "deepseek";
  c.emb_dim = 8;
  c.num_query_heads = 2;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.mlp_dim = 6;
  c.num_decoder_layers = 3;
  c.vocab_size = 16;
  c.rope_layout = RopeLayout::Yarn;
  c.first_num_dense_layers = 1;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 4;
  c.qk_nope_head_dim = 2;
  c.qk_rope_head_dim = 2;
  c.v_head_dim = 2;
  c.num_experts = 2;
  c.num_experts_per_tok = 1;
  c.moe_mlp_dim = 4;
  c.shared_experts = 1;
  return c;
}

using Targets = std::vector<std::pair<int, std::string>>;
Targets target_list(const AdapterSource& s) {
  Targets t;
  for (const LoraTargetInfo& i : s.targets()) t.emplace_back(i.layer, i.tensor);
  return t;
}

const std::string kPeft = "base_model.model.model.layers.";

json peft_config(json extra = json::object()) {
  json c = {{"peft_type", "LORA"},
            {"r", 4},
            {"lora_alpha", 8},
            {"target_modules", {"q_proj", "k_proj", "v_proj"}},
            {"bias", "none"},
            {"use_dora", false},
            {"modules_to_save", nullptr},
            {"fan_in_fan_out", false},
            {"layer_replication", nullptr},
            {"use_rslora", false},
            {"rank_pattern", json::object()},
            {"alpha_pattern", json::object()}};
  for (auto it = extra.begin(); it != extra.end(); ++it) c[it.key()] = it.value();
  return c;
}

// A valid PEFT q_proj pair for layer 0 of llama_config() (r 4, in 8, out H·D 8).
std::vector<F32Tensor> peft_q_pair(int layer = 0) {
  const std::string m = kPeft + std::to_string(layer) + ".self_attn.q_proj";
  return {ramp(m + ".lora_A.weight", {4, 8}, 1), ramp(m + ".lora_B.weight", {8, 4}, 2)};
}

}  // namespace

TEST_CASE("lora: targets and [in, out] per family") {
  const ModelConfig ll = llama_config();
  const std::vector<std::string> llama = {"attn.q",   "attn.k",   "attn.v", "attn.o",
                                          "mlp.wi_0", "mlp.wi_1", "mlp.wo"};
  CHECK(lora_target_tensors(ll, 0) == llama);
  CHECK(lora_target_tensors(llama_config("qwen3"), 2) == llama);  // no q_norm / k_norm
  CHECK(lora_in_out(ll, "attn.q") == std::pair<int64_t, int64_t>{8, 8});
  CHECK(lora_in_out(ll, "attn.k") == std::pair<int64_t, int64_t>{8, 4});
  CHECK(lora_in_out(ll, "attn.o") == std::pair<int64_t, int64_t>{8, 8});  // [H, D, E]
  CHECK(lora_in_out(ll, "mlp.wo") == std::pair<int64_t, int64_t>{6, 8});
  CHECK_THROWS_WITH_AS(lora_in_out(ll, "pre_attn_norm"), doctest::Contains("'pre_attn_norm'"),
                       Error);

  const ModelConfig ds = deepseek_config();
  CHECK(lora_target_tensors(ds, 0) == std::vector<std::string>{"attn.query", "attn.wkv_a",
                                                               "attn.wkv_b", "attn.o", "mlp.wi_0",
                                                               "mlp.wi_1", "mlp.wo"});
  CHECK(lora_target_tensors(ds, 1) ==
        std::vector<std::string>{"attn.query", "attn.wkv_a", "attn.wkv_b", "attn.o"});
  CHECK(lora_in_out(ds, "attn.query") == std::pair<int64_t, int64_t>{8, 2 * 4});
  CHECK(lora_in_out(ds, "attn.wkv_a") == std::pair<int64_t, int64_t>{8, 4 + 2});
  CHECK(lora_in_out(ds, "attn.wkv_b") == std::pair<int64_t, int64_t>{4, 2 * 4});
  CHECK(lora_in_out(ds, "attn.o") == std::pair<int64_t, int64_t>{2 * 2, 8});
  CHECK(lora_in_out(ds, "mlp.wi_0") == std::pair<int64_t, int64_t>{8, 6});
  CHECK_THROWS_AS(lora_in_out(ds, "attn.wq_b"), Error);
  CHECK_THROWS_AS(lora_in_out(ds, "moe.experts.wi_0"), Error);

  const ModelConfig ds_q = deepseek_config(3);
  CHECK(lora_target_tensors(ds_q, 2) ==
        std::vector<std::string>{"attn.wq_a", "attn.wq_b", "attn.wkv_a", "attn.wkv_b", "attn.o"});
  CHECK(lora_in_out(ds_q, "attn.wq_b") == std::pair<int64_t, int64_t>{3, 2 * 4});
  CHECK_THROWS_AS(lora_in_out(ds_q, "attn.query"), Error);
  ModelConfig all_moe = deepseek_config();
  all_moe.first_num_dense_layers = 0;
  CHECK_THROWS_AS(lora_in_out(all_moe, "mlp.wi_0"), Error);
}

TEST_CASE("lora: MaxText Linen scanned llama, query and out, unrolled on read") {
  TmpDir d("linen_scanned");
  write_config(d, {{"r", 2}, {"lora_alpha", 3.0}, {"target_modules", {"q_proj", "o_proj"}}});
  const std::string p = "params.params.decoder.layers.self_attention.";
  // docs/maxtext.md §4.1: query A [E, L, r], B [r, L, H, D]; out A [H, L, D, r], B [r, L, E].
  const F32Tensor qa = ramp(p + "query.lora_a.kernel", {8, 3, 2}, 0);
  const F32Tensor qb = ramp(p + "query.lora_b.kernel", {2, 3, 2, 4}, 100);
  const F32Tensor oa = ramp(p + "out.lora_a.kernel", {2, 3, 4, 2}, 200);
  const F32Tensor ob = ramp(p + "out.lora_b.kernel", {2, 3, 8}, 300);
  write_safetensors_f32((d.path / "lora.safetensors").string(), {qa, qb, oa, ob});

  AdapterSource s = AdapterSource::open(d.str(), llama_config(), 2.0);
  CHECK(s.format() == AdapterFormat::MaxText);
  CHECK(std::string(adapter_format_name(s.format())) == "maxtext");
  CHECK(s.rank() == 2);
  CHECK(s.lora_alpha() == 3.0);
  CHECK(s.user_scale() == 2.0);
  CHECK(target_list(s) == Targets{{0, "attn.q"},
                                  {0, "attn.o"},
                                  {1, "attn.q"},
                                  {1, "attn.o"},
                                  {2, "attn.q"},
                                  {2, "attn.o"}});
  for (const LoraTargetInfo& t : s.targets()) {
    CHECK(t.rank == 2);
    CHECK(t.scale == doctest::Approx(3.0 / 2 * 2.0));
  }
  REQUIRE(s.find(1, "attn.q"));
  CHECK(s.find(1, "attn.q")->a_key == p + "query.lora_a.kernel");
  CHECK(s.find(1, "attn.q")->b_key == p + "query.lora_b.kernel");
  CHECK(s.find(1, "attn.k") == nullptr);
  CHECK(s.find(3, "attn.q") == nullptr);

  // Query of layer 1: A[e, 1, k] → a[e·r + k]; B[k, 1, h, j] → b[k·H·D + h·D + j].
  LoraDelta q = s.read(1, "attn.q");
  CHECK(q.in == 8);
  CHECK(q.out == 8);
  CHECK(q.rank == 2);
  CHECK(q.scale == doctest::Approx(3.0f));
  REQUIRE(q.a.size() == 16);
  REQUIRE(q.b.size() == 16);
  for (int e = 0; e < 8; ++e)
    for (int k = 0; k < 2; ++k)
      CHECK(q.a[size_t(e * 2 + k)] == qa.data[size_t((e * 3 + 1) * 2 + k)]);
  for (int k = 0; k < 2; ++k)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j)
        CHECK(q.b[size_t(k * 8 + h * 4 + j)] == qb.data[size_t(((k * 3 + 1) * 2 + h) * 4 + j)]);

  // Out of layer 2: A[h, 2, j, k] → a[(h·D + j)·r + k]; B[k, 2, e] → b[k·E + e].
  LoraDelta o = s.read(2, "attn.o");
  CHECK(o.in == 8);
  CHECK(o.out == 8);
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < 2; ++k)
        CHECK(o.a[size_t((h * 4 + j) * 2 + k)] == oa.data[size_t(((h * 3 + 2) * 4 + j) * 2 + k)]);
  for (int k = 0; k < 2; ++k)
    for (int e = 0; e < 8; ++e)
      CHECK(o.b[size_t(k * 8 + e)] == ob.data[size_t((k * 3 + 2) * 8 + e)]);
  CHECK_THROWS_AS(s.read(0, "attn.k"), Error);
}

TEST_CASE("lora: MaxText NNX unrolled llama, module-path targets, '.' and '/' keys") {
  TmpDir d("nnx_unrolled");
  write_config(d,
               {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"self_attention.query", "wi_0"}}});
  const F32Tensor qa0 = ramp("decoder.layers_0.self_attention.query.lora_a.kernel", {8, 2}, 0);
  const F32Tensor qb0 = ramp("decoder.layers_0.self_attention.query.lora_b.kernel", {2, 2, 4}, 10);
  const F32Tensor wa1 = ramp("decoder/layers_1/mlp/wi_0/lora_a.kernel", {8, 2}, 20);
  const F32Tensor wb1 = ramp("decoder/layers_1/mlp/wi_0/lora_b.kernel", {2, 6}, 30);
  const F32Tensor qa2 = ramp("decoder/layers_2/self_attention/query/lora_a.kernel", {8, 2}, 40);
  const F32Tensor qb2 = ramp("decoder/layers_2/self_attention/query/lora_b.kernel", {2, 2, 4}, 50);
  write_safetensors_f32((d.path / "adapter.safetensors").string(), {qa0, qb0, wa1, wb1, qa2, qb2});

  AdapterSource s = AdapterSource::open(d.str(), llama_config());
  CHECK(target_list(s) == Targets{{0, "attn.q"}, {1, "mlp.wi_0"}, {2, "attn.q"}});
  CHECK(s.targets()[0].scale == doctest::Approx(1.0));
  LoraDelta q = s.read(2, "attn.q");
  CHECK(q.a == qa2.data);  // unrolled: stored [E, r] and [r, H, D] are already [in, r], [r, out]
  CHECK(q.b == qb2.data);
  LoraDelta w = s.read(1, "mlp.wi_0");
  CHECK(w.in == 8);
  CHECK(w.out == 6);
  CHECK(w.b == wb1.data);

  SUBCASE("the NNX tree saved inside a TrainState: 'params/decoder/…'") {
    TmpDir d2("nnx_trainstate");
    write_config(d2, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    F32Tensor a = qa0, b = qb0;
    a.key = "params.decoder.layers_0.self_attention.query.lora_a.kernel";
    b.key = "params/decoder/layers_0/self_attention/query/lora_b.kernel";
    write_safetensors_f32((d2.path / "x.safetensors").string(), {a, b});
    AdapterSource s2 = AdapterSource::open(d2.str(), llama_config());
    CHECK(target_list(s2) == Targets{{0, "attn.q"}});
  }
}

TEST_CASE("lora: MaxText sharded adapter with an index") {
  TmpDir d("sharded");
  write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"k_proj"}}});
  const std::string p = "params.params.decoder.layers_1.self_attention.key.";
  write_safetensors_f32((d.path / "a-00001.safetensors").string(),
                        {ramp(p + "lora_a.kernel", {8, 2}, 0)});
  write_safetensors_f32((d.path / "a-00002.safetensors").string(),
                        {ramp(p + "lora_b.kernel", {2, 1, 4}, 0)});
  json index = {{"weight_map",
                 {{p + "lora_a.kernel", "a-00001.safetensors"},
                  {p + "lora_b.kernel", "a-00002.safetensors"}}}};
  std::ofstream(d.path / "a.safetensors.index.json") << index.dump();
  AdapterSource s = AdapterSource::open(d.str(), llama_config());
  CHECK(target_list(s) == Targets{{1, "attn.k"}});
  CHECK(s.read(1, "attn.k").out == 4);
}

TEST_CASE("lora: MaxText DeepSeek dense_layers + moe_layers, wkv_b") {
  TmpDir d("deepseek");
  write_config(d, {{"r", 2}, {"lora_alpha", 4}, {"target_modules", {"self_attention.wkv_b"}}});
  const std::string p = "params.params.decoder.";
  // wkv_b [Rkv 4, H 2, Dn+Dv 4]: A [Rkv, L, r], B [r, L, H, Dn+Dv]; 1 dense and 2 MoE layers.
  const F32Tensor da = ramp(p + "dense_layers.self_attention.wkv_b.lora_a.kernel", {4, 1, 2}, 0);
  const F32Tensor db =
      ramp(p + "dense_layers.self_attention.wkv_b.lora_b.kernel", {2, 1, 2, 4}, 10);
  const F32Tensor ma = ramp(p + "moe_layers.self_attention.wkv_b.lora_a.kernel", {4, 2, 2}, 20);
  const F32Tensor mb = ramp(p + "moe_layers.self_attention.wkv_b.lora_b.kernel", {2, 2, 2, 4}, 30);

  SUBCASE("both groups") {
    write_safetensors_f32((d.path / "lora.safetensors").string(), {da, db, ma, mb});
    AdapterSource s = AdapterSource::open(d.str(), deepseek_config());
    CHECK(target_list(s) == Targets{{0, "attn.wkv_b"}, {1, "attn.wkv_b"}, {2, "attn.wkv_b"}});
    CHECK(s.targets()[2].scale == doctest::Approx(2.0));
    LoraDelta l0 = s.read(0, "attn.wkv_b");
    CHECK(l0.a == da.data);
    CHECK(l0.b == db.data);
    // Layer 2 is moe_layers index 1.
    LoraDelta l2 = s.read(2, "attn.wkv_b");
    CHECK(l2.in == 4);
    CHECK(l2.out == 8);
    for (int i = 0; i < 4; ++i)
      for (int k = 0; k < 2; ++k)
        CHECK(l2.a[size_t(i * 2 + k)] == ma.data[size_t((i * 2 + 1) * 2 + k)]);
    for (int k = 0; k < 2; ++k)
      for (int c = 0; c < 8; ++c)
        CHECK(l2.b[size_t(k * 8 + c)] == mb.data[size_t((k * 2 + 1) * 8 + c)]);
  }
  SUBCASE("a group may be absent") {
    write_safetensors_f32((d.path / "lora.safetensors").string(), {ma, mb});
    AdapterSource s = AdapterSource::open(d.str(), deepseek_config());
    CHECK(target_list(s) == Targets{{1, "attn.wkv_b"}, {2, "attn.wkv_b"}});
  }
  SUBCASE("the dense MLP is not a target of moe_layers") {
    write_config(d, {{"r", 2}, {"lora_alpha", 4}, {"target_modules", {"mlp.wi_0"}}});
    const std::string k = p + "moe_layers.mlp.wi_0.lora_a.kernel";
    write_safetensors_f32(
        (d.path / "lora.safetensors").string(),
        {ramp(k, {8, 2, 2}, 0), ramp(p + "moe_layers.mlp.wi_0.lora_b.kernel", {2, 2, 6}, 0)});
    std::string m = error_of([&] { AdapterSource::open(d.str(), deepseek_config()); });
    CHECK(has(m, "'" + k + "'"));
    CHECK(has(m, "unknown target"));
  }
}

TEST_CASE("lora: PEFT transpose, llama3.1 permutation, query scale, rsLoRA, patterns") {
  struct Variant {
    std::string block;
    RopeLayout rope;
    bool permute, scale_q;
  };
  for (const Variant& v : {Variant{"llama2", RopeLayout::Interleaved, true, true},
                           Variant{"mistral", RopeLayout::HalfSplit, false, true},
                           Variant{"qwen3", RopeLayout::HalfSplit, false, false}}) {
    CAPTURE(v.block);
    TmpDir d("peft_" + v.block);
    write_config(d, peft_config({{"use_rslora", true},
                                 {"rank_pattern", {{"k_proj", 2}}},
                                 {"alpha_pattern", {{"model.layers.1.self_attn.q_proj", 16}}}}));
    const std::string l0 = kPeft + "0.self_attn.", l1 = kPeft + "1.self_attn.";
    // PyTorch orientation: lora_A [r, in], lora_B [out, r]; out = H·D 8 for q, K·D 4 for k/v.
    const F32Tensor qa = ramp(l0 + "q_proj.lora_A.weight", {4, 8}, 0);
    const F32Tensor qb = ramp(l0 + "q_proj.lora_B.weight", {8, 4}, 10);
    const F32Tensor ka = ramp(l0 + "k_proj.lora_A.weight", {2, 8}, 20);
    const F32Tensor kb = ramp(l0 + "k_proj.lora_B.weight", {4, 2}, 30);
    const F32Tensor va = ramp(l0 + "v_proj.lora_A.weight", {4, 8}, 40);
    const F32Tensor vb = ramp(l0 + "v_proj.lora_B.weight", {4, 4}, 50);
    const F32Tensor q1a = ramp(l1 + "q_proj.lora_A.weight", {4, 8}, 60);
    const F32Tensor q1b = ramp(l1 + "q_proj.lora_B.weight", {8, 4}, 70);
    write_safetensors_f32((d.path / "adapter_model.safetensors").string(),
                          {qa, qb, ka, kb, va, vb, q1a, q1b});

    AdapterSource s = AdapterSource::open(d.str(), llama_config(v.block, v.rope), 0.5);
    CHECK(s.format() == AdapterFormat::Peft);
    CHECK(s.use_rslora());
    CHECK(target_list(s) == Targets{{0, "attn.q"}, {0, "attn.k"}, {0, "attn.v"}, {1, "attn.q"}});
    // rsLoRA: alpha / sqrt(r), with rank_pattern's r for k and alpha_pattern's alpha for layer 1 q.
    CHECK(s.find(0, "attn.q")->scale == doctest::Approx(8.0 / 2.0 * 0.5));
    CHECK(s.find(0, "attn.k")->rank == 2);
    CHECK(s.find(0, "attn.k")->scale == doctest::Approx(8.0 / std::sqrt(2.0) * 0.5));
    CHECK(s.find(0, "attn.v")->scale == doctest::Approx(8.0 / 2.0 * 0.5));
    CHECK(s.find(1, "attn.q")->scale == doctest::Approx(16.0 / 2.0 * 0.5));

    // Output column c of head h in MaxText order comes from HF column src(c).
    auto src = [&](int64_t col) -> int64_t {
      if (!v.permute) return col;
      const int64_t h = col / 4, j = col % 4;
      return h * 4 + (j % 2 == 0 ? j / 2 : j / 2 + 2);
    };
    LoraDelta q = s.read(0, "attn.q");
    REQUIRE(q.rank == 4);
    for (int i = 0; i < 8; ++i)
      for (int k = 0; k < 4; ++k) CHECK(q.a[size_t(i * 4 + k)] == qa.data[size_t(k * 8 + i)]);
    const float qs = v.scale_q ? 0.5f : 1.0f;  // 1/sqrt(head_dim 4)
    for (int k = 0; k < 4; ++k)
      for (int c = 0; c < 8; ++c)
        CHECK(q.b[size_t(k * 8 + c)] == qb.data[size_t(src(c) * 4 + k)] * qs);

    LoraDelta kd = s.read(0, "attn.k");  // permuted like q, never scaled
    REQUIRE(kd.rank == 2);
    REQUIRE(kd.out == 4);
    for (int i = 0; i < 8; ++i)
      for (int k = 0; k < 2; ++k) CHECK(kd.a[size_t(i * 2 + k)] == ka.data[size_t(k * 8 + i)]);
    for (int k = 0; k < 2; ++k)
      for (int c = 0; c < 4; ++c) CHECK(kd.b[size_t(k * 4 + c)] == kb.data[size_t(src(c) * 2 + k)]);

    LoraDelta vd = s.read(0, "attn.v");  // transposed only
    for (int k = 0; k < 4; ++k)
      for (int c = 0; c < 4; ++c) CHECK(vd.b[size_t(k * 4 + c)] == vb.data[size_t(c * 4 + k)]);
  }
}

TEST_CASE("lora: PEFT DeepSeek, no transform, dense MLP only on dense layers") {
  TmpDir d("peft_deepseek");
  write_config(d,
               peft_config({{"target_modules",
                             "model\\.layers\\.\\d+\\.(self_attn\\.kv_b_proj|mlp\\.gate_proj)"}}));
  const F32Tensor ka = ramp(kPeft + "2.self_attn.kv_b_proj.lora_A.weight", {4, 4}, 0);
  const F32Tensor kb = ramp(kPeft + "2.self_attn.kv_b_proj.lora_B.weight", {8, 4}, 10);
  const F32Tensor ga = ramp(kPeft + "0.mlp.gate_proj.lora_A.weight", {4, 8}, 20);
  const F32Tensor gb = ramp(kPeft + "0.mlp.gate_proj.lora_B.weight", {6, 4}, 30);
  write_safetensors_f32((d.path / "adapter_model.safetensors").string(), {ka, kb, ga, gb});
  AdapterSource s = AdapterSource::open(d.str(), deepseek_config());
  CHECK(target_list(s) == Targets{{0, "mlp.wi_0"}, {2, "attn.wkv_b"}});
  LoraDelta kv = s.read(2, "attn.wkv_b");
  for (int k = 0; k < 4; ++k)
    for (int c = 0; c < 8; ++c) CHECK(kv.b[size_t(k * 8 + c)] == kb.data[size_t(c * 4 + k)]);

  SUBCASE("gate_proj on a MoE layer") {
    const std::string key = kPeft + "1.mlp.gate_proj.lora_A.weight";
    write_safetensors_f32(
        (d.path / "adapter_model.safetensors").string(),
        {ramp(key, {4, 8}, 0), ramp(kPeft + "1.mlp.gate_proj.lora_B.weight", {6, 4}, 0)});
    std::string m = error_of([&] { AdapterSource::open(d.str(), deepseek_config()); });
    CHECK(has(m, "'" + key + "'"));
    CHECK(has(m, "unknown target"));
  }
  SUBCASE("experts are refused by name") {
    const std::string key = kPeft + "1.mlp.experts.0.gate_proj.lora_A.weight";
    write_safetensors_f32((d.path / "adapter_model.safetensors").string(), {ramp(key, {4, 8}, 0)});
    std::string m = error_of([&] { AdapterSource::open(d.str(), deepseek_config()); });
    CHECK(has(m, "'" + key + "'"));
    CHECK(has(m, "LoRA on MoE experts is not supported"));
  }
}

TEST_CASE("lora: merge_lora matches the naive triple loop") {
  LoraDelta d;
  d.in = 5;
  d.out = 37;  // not a multiple of any vector width
  d.rank = 3;
  d.scale = 0.75f;
  uint32_t seed = 7;
  auto next = [&] {
    seed = seed * 1664525u + 1013904223u;
    return float(int32_t(seed >> 8) % 2000 - 1000) / 997.0f;
  };
  for (int i = 0; i < 5 * 3; ++i) d.a.push_back(next());
  for (int i = 0; i < 3 * 37; ++i) d.b.push_back(next());
  std::vector<float> w(5 * 37);
  for (float& x : w) x = next();
  std::vector<double> want(w.begin(), w.end());
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 37; ++j) {
      double sum = 0;
      for (int k = 0; k < 3; ++k) sum += double(d.a[size_t(i * 3 + k)]) * d.b[size_t(k * 37 + j)];
      want[size_t(i * 37 + j)] += 0.75 * sum;
    }
  merge_lora(d, w.data());
  for (size_t i = 0; i < w.size(); ++i) CHECK(w[i] == doctest::Approx(want[i]).epsilon(1e-5));

  LoraDelta bad = d;
  bad.b.pop_back();
  CHECK_THROWS_AS(merge_lora(bad, w.data()), Error);
}

TEST_CASE("lora: refusals name the file, key or config entry") {
  const ModelConfig c = llama_config();
  TmpDir d("errors");
  const std::string dir = d.str();
  auto open = [&] { AdapterSource::open(dir, c); };
  auto peft = [&](const json& cfg, const std::vector<F32Tensor>& tensors) {
    write_config(d, cfg);
    write_safetensors_f32((d.path / "adapter_model.safetensors").string(), tensors);
  };
  const std::string lin = "params.params.decoder.layers.self_attention.";

  SUBCASE("missing directory") {
    const std::string gone = dir + "/nope";
    CHECK(has(error_of([&] { AdapterSource::open(gone, c); }), gone));
  }
  SUBCASE("missing adapter_config.json") {
    CHECK(has(error_of(open), (d.path / "adapter_config.json").string()));
  }
  SUBCASE("adapter_config.json with a number that does not fit, or not a regular file") {
    const std::string cfg = (d.path / "adapter_config.json").string();
    std::ofstream(cfg) << R"({"r": 4, "lora_alpha": 1e999, "target_modules": ["q_proj"]})";
    const std::string m = error_of(open);
    CHECK(has(m, cfg + ": malformed JSON: "));
    CHECK(has(m, "number overflow parsing '1e999'"));
    fs::remove(cfg);
    REQUIRE(::mkfifo(cfg.c_str(), 0600) == 0);
    CHECK(error_of(open) == cfg + ": not a regular file (a FIFO)");
  }
  SUBCASE("MaxText weights that are not a regular file are refused by name") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    const std::string fifo = (d.path / "adapter.safetensors").string();
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    CHECK(error_of(open) == fifo + ": not a regular file (a FIFO)");
  }
  SUBCASE("PEFT weights that are not a regular file are refused by name") {
    write_config(d, peft_config());
    const std::string fifo = (d.path / "adapter_model.safetensors").string();
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    CHECK(error_of(open) == fifo + ": not a regular file (a FIFO)");
  }
  SUBCASE("an unrolled layer index too large for 64 bits is no layer") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"query"}}});
    write_safetensors_f32(
        (d.path / "l.safetensors").string(),
        {ramp(
            "params.params.decoder.layers_99999999999999999999.self_attention.query.lora_a.kernel",
            {8, 2}, 0)});
    CHECK(has(error_of(open), "unknown target 'decoder/layers_99999999999999999999"));
  }
  SUBCASE("config key missing or ill-typed") {
    peft({{"peft_type", "LORA"}, {"lora_alpha", 8}, {"target_modules", {"q_proj"}}}, peft_q_pair());
    std::string m = error_of(open);
    CHECK(has(m, "adapter_config.json"));
    CHECK(has(m, "'r'"));
    peft(peft_config({{"lora_alpha", "eight"}}), peft_q_pair());
    CHECK(has(error_of(open), "'lora_alpha'"));
    peft(peft_config({{"r", 0}}), peft_q_pair());
    CHECK(has(error_of(open), "'r'"));
  }
  SUBCASE("PEFT rank mismatch between A and B") {
    const std::string m = kPeft + "0.self_attn.q_proj";
    peft(peft_config(),
         {ramp(m + ".lora_A.weight", {4, 8}, 0), ramp(m + ".lora_B.weight", {8, 2}, 0)});
    std::string e = error_of(open);
    CHECK(has(e, "rank mismatch between A and B"));
    CHECK(has(e, m + ".lora_A.weight"));
    CHECK(has(e, m + ".lora_B.weight"));
  }
  SUBCASE("MaxText rank mismatch between A and B") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    write_safetensors_f32((d.path / "l.safetensors").string(),
                          {ramp(lin + "query.lora_a.kernel", {8, 3, 2}, 0),
                           ramp(lin + "query.lora_b.kernel", {3, 3, 2, 4}, 0)});
    std::string e = error_of(open);
    CHECK(has(e, "rank mismatch between A and B"));
    CHECK(has(e, lin + "query.lora_a.kernel"));
    CHECK(has(e, lin + "query.lora_b.kernel"));
  }
  SUBCASE("PEFT shape mismatch names key, got, expected, layer and tensor") {
    const std::string m = kPeft + "1.self_attn.q_proj";
    peft(peft_config(),
         {ramp(m + ".lora_A.weight", {4, 7}, 0), ramp(m + ".lora_B.weight", {8, 4}, 0)});
    CHECK(has(error_of(open), (d.path / "adapter_model.safetensors").string() + ": key '" + m +
                                  ".lora_A.weight' has shape [4, 7], expected [4, 8] (layer 1 "
                                  "attn.q: in = 8"));
    // The rank comes from rank_pattern where one matches.
    peft(peft_config({{"rank_pattern", {{"q_proj", 2}}}}), peft_q_pair(1));
    std::string e = error_of(open);
    CHECK(has(e, "expected [2, 8]"));
    CHECK(has(e, "rank_pattern 'q_proj'"));
  }
  SUBCASE("MaxText scanned layer count differs from the base") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    write_safetensors_f32((d.path / "l.safetensors").string(),
                          {ramp(lin + "query.lora_a.kernel", {8, 2, 2}, 0),
                           ramp(lin + "query.lora_b.kernel", {2, 2, 2, 4}, 0)});
    std::string e = error_of(open);
    CHECK(has(e, "'" + lin + "query.lora_a.kernel' has shape [8, 2, 2], expected [8, 3, 2]"));
    CHECK(has(e, "3 layers"));
  }
  SUBCASE("MaxText unknown target") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    write_safetensors_f32((d.path / "l.safetensors").string(),
                          {ramp(lin + "out.lora_a.kernel", {2, 3, 4, 2}, 0),
                           ramp(lin + "out.lora_b.kernel", {2, 3, 8}, 0)});
    std::string e = error_of(open);
    CHECK(has(e, "unknown target"));
    CHECK(has(e, lin + "out.lora_"));
  }
  SUBCASE("MaxText LoRA on a norm is an unknown target, whole components only") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"self_attention.query"}}});
    const std::string key = "decoder.layers_0.self_attention.query_norm.lora_a.kernel";
    write_safetensors_f32(
        (d.path / "l.safetensors").string(),
        {ramp(key, {4, 2}, 0),
         ramp("decoder.layers_0.self_attention.query_norm.lora_b.kernel", {2}, 0)});
    std::string e = error_of([&] { AdapterSource::open(dir, llama_config("qwen3")); });
    CHECK(has(e, "unknown target"));
    CHECK(has(e, "query_norm.lora_"));
  }
  SUBCASE("MaxText target_modules entry naming no projection") {
    write_config(
        d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj", "self_attention.quer"}}});
    write_safetensors_f32((d.path / "l.safetensors").string(),
                          {ramp(lin + "query.lora_a.kernel", {8, 3, 2}, 0),
                           ramp(lin + "query.lora_b.kernel", {2, 3, 2, 4}, 0)});
    std::string e = error_of(open);
    CHECK(has(e, "'self_attention.quer'"));
    CHECK(has(e, "target_modules"));
  }
  SUBCASE("MaxText non-LoRA key") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    write_safetensors_f32((d.path / "l.safetensors").string(),
                          {ramp(lin + "query.kernel", {8, 3, 2, 4}, 0)});
    std::string e = error_of(open);
    CHECK(has(e, "'" + lin + "query.kernel'"));
    CHECK(has(e, "not a LoRA tensor"));
  }
  SUBCASE("A without B") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    write_safetensors_f32((d.path / "l.safetensors").string(),
                          {ramp(lin + "query.lora_a.kernel", {8, 3, 2}, 0)});
    CHECK(has(error_of(open), "'" + lin + "query.lora_a.kernel'"));
    const std::string m = kPeft + "0.self_attn.q_proj.lora_B.weight";
    fs::remove(d.path / "l.safetensors");
    peft(peft_config(), {ramp(m, {8, 4}, 0)});
    CHECK(has(error_of(open), "'" + m + "'"));
  }
  SUBCASE("two safetensors files without an index") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    write_safetensors_f32((d.path / "one.safetensors").string(),
                          {ramp(lin + "query.lora_a.kernel", {8, 3, 2}, 0)});
    write_safetensors_f32((d.path / "two.safetensors").string(),
                          {ramp(lin + "query.lora_b.kernel", {2, 3, 2, 4}, 0)});
    std::string e = error_of(open);
    CHECK(has(e, "one.safetensors"));
    CHECK(has(e, "two.safetensors"));
  }
  SUBCASE("no weights, empty adapter") {
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    CHECK(has(error_of(open), "no adapter weights"));
    peft(peft_config(), {});
    CHECK(has(error_of(open), "no LoRA tensors"));
  }
  SUBCASE("layer index out of range") {
    const std::string m = kPeft + "5.self_attn.q_proj.lora_A.weight";
    peft(peft_config(), {ramp(m, {4, 8}, 0)});
    std::string e = error_of(open);
    CHECK(has(e, "'" + m + "'"));
    CHECK(has(e, "layer count mismatch"));
    fs::remove(d.path / "adapter_model.safetensors");
    write_config(d, {{"r", 2}, {"lora_alpha", 2}, {"target_modules", {"q_proj"}}});
    const std::string key = "params.params.decoder.layers_7.self_attention.query.lora_a.kernel";
    write_safetensors_f32((d.path / "l.safetensors").string(), {ramp(key, {8, 2}, 0)});
    e = error_of(open);
    CHECK(has(e, "'" + key + "'"));
    CHECK(has(e, "layer count mismatch"));
  }
  SUBCASE("use_dora") {
    peft(peft_config({{"use_dora", true}}), peft_q_pair());
    std::string e = error_of(open);
    CHECK(has(e, "DoRA (use_dora) is not supported"));
    CHECK(has(e, "adapter_config.json"));
  }
  SUBCASE("modules_to_save") {
    peft(peft_config({{"modules_to_save", {"lm_head"}}}), peft_q_pair());
    CHECK(has(error_of(open), "'modules_to_save'"));
  }
  SUBCASE("bias") {
    peft(peft_config({{"bias", "lora_only"}}), peft_q_pair());
    CHECK(has(error_of(open), "'bias'"));
    const std::string key = kPeft + "0.self_attn.q_proj.bias";
    std::vector<F32Tensor> t = peft_q_pair();
    t.push_back(ramp(key, {8}, 0));
    peft(peft_config(), t);
    CHECK(has(error_of(open), "'" + key + "'"));
  }
  SUBCASE("other refused config features") {
    for (const json& extra : {json{{"fan_in_fan_out", true}}, json{{"peft_type", "LOHA"}},
                              json{{"layer_replication", {{0, 2}}}}}) {
      peft(peft_config(extra), peft_q_pair());
      CHECK(has(error_of(open), "'" + extra.begin().key() + "'"));
    }
  }
  SUBCASE("embedding LoRA, DoRA magnitude, lm_head") {
    for (const std::string& key :
         {std::string("base_model.model.model.embed_tokens.lora_embedding_A"),
          kPeft + "0.self_attn.q_proj.lora_magnitude_vector",
          std::string("base_model.model.lm_head.lora_A.weight")}) {
      std::vector<F32Tensor> t = peft_q_pair();
      t.push_back(ramp(key, {4, 8}, 0));
      peft(peft_config(), t);
      CHECK(has(error_of(open), "'" + key + "'"));
    }
  }
  SUBCASE("PEFT module not covered by target_modules") {
    peft(peft_config({{"target_modules", {"v_proj"}}}), peft_q_pair());
    std::string e = error_of(open);
    CHECK(has(e, "unknown target"));
    CHECK(has(e, "q_proj.lora_A.weight"));
  }
  SUBCASE("PEFT target_modules naming embed_tokens, even without embedding tensors") {
    peft(peft_config({{"target_modules", {"q_proj", "embed_tokens"}}}), peft_q_pair());
    std::string e = error_of(open);
    CHECK(has(e, "target_modules"));
    CHECK(has(e, "'embed_tokens'"));
  }
  SUBCASE("PEFT key of an unexpected form") {
    const std::string key =
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight";
    peft(peft_config(), {ramp(key, {4, 8}, 0)});
    CHECK(has(error_of(open), "'" + key + "'"));
  }
}
