#include "export/config_reader.h"

#include <doctest/doctest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"

namespace fs = std::filesystem;
using kiln::ExportConfig;
using kiln::read_export_config;
using kiln::RopeLayout;
using Overrides = std::vector<std::pair<std::string, std::string>>;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("kiln-config-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) +
            "-" + std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string write(const std::string& name, const std::string& text) const {
    const std::string p = (path / name).string();
    std::ofstream out(p, std::ios::binary);
    out << text;
    REQUIRE(out.good());
    return p;
  }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const kiln::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

std::string raw_value(const ExportConfig& c, const std::string& key) {
  for (const auto& [k, v] : c.raw)
    if (k == key) return v;
  return "<absent>";
}

// As in MaxText's src/maxtext/configs/models/llama3.1-8b.yml, plus a few base.yml-style lines.
const char* kLlama31Yaml = R"(# Copyright 2024 Google LLC
#
# Licensed under the Apache License, Version 2.0 (the "License");

# model config for llama3.1-8b

base_emb_dim: 4096
base_num_query_heads: 32
base_num_kv_heads: 8
base_num_decoder_layers: 32
base_mlp_dim: 14336
head_dim: 128
mlp_activations: ["silu","linear"]
vocab_size: 128256
enable_dropout: False
logits_via_embedding: False
normalization_layer_epsilon: 1.0e-5
rope_max_timescale: 500_000
decoder_block: "llama2" # Uses the same decoder block as llama2
logical_axis_rules: [
                      ['activation_batch', ['data', 'fsdp', 'fsdp_transpose', 'expert']],
                      ['norm', 'fsdp'],  # trailing comment inside a flow list
                    ]
data_sharding: [['data', 'stage', 'fsdp', 'fsdp_transpose', 'sequence', 'tensor', 'expert']]
dtype: "bfloat16"
weight_dtype: float32
)";

}  // namespace

TEST_CASE("config: MaxText llama3.1-8b model YAML") {
  TempDir dir;
  const std::string path = dir.write("llama3.1-8b.yml", kLlama31Yaml);
  const ExportConfig c = read_export_config(path, {});
  const kiln::ModelConfig& m = c.model;
  CHECK(m.decoder_block == "llama2");
  CHECK(m.model_name == "llama3.1-8b");  // MaxText names model files after model_name
  CHECK(m.emb_dim == 4096);
  CHECK(m.num_query_heads == 32);
  CHECK(m.num_kv_heads == 8);
  CHECK(m.head_dim == 128);
  CHECK(m.mlp_dim == 14336);
  CHECK(m.num_decoder_layers == 32);
  CHECK(m.vocab_size == 128256);
  CHECK(m.normalization_layer_epsilon == 1e-5);
  CHECK(m.rope_max_timescale == 500000.0);
  CHECK(m.rope_min_timescale == 1.0);
  CHECK(m.rope_linear_scaling_factor == 1.0);
  CHECK(m.rope_use_scale);
  CHECK(m.rope_layout == RopeLayout::Interleaved);
  CHECK_FALSE(m.use_qk_norm);
  CHECK(m.query_scale == 1.0);
  CHECK_FALSE(m.logits_via_embedding);
  CHECK(m.normalize_embedding_logits);
  CHECK(m.final_logits_soft_cap == 0.0);
  CHECK(m.max_target_length == 2048);
  CHECK(c.scan_layers);
  CHECK(c.param_scan_axis == 1);
  CHECK(raw_value(c, "rope_max_timescale") == "500_000");
  CHECK(raw_value(c, "enable_dropout") == "False");
  CHECK(raw_value(c, "decoder_block") == "llama2");
  CHECK(contains(raw_value(c, "logical_axis_rules"), "['norm', 'fsdp']"));
  CHECK(raw_value(c, "weight_dtype") == "float32");
  CHECK(c.raw.front().first == "base_emb_dim");  // file order is kept

  SUBCASE("the same file under another name is half-split RoPE unless model_name says llama3.1") {
    const std::string p3 = dir.write("llama3-8b.yaml", kLlama31Yaml);
    CHECK(read_export_config(p3, {}).model.rope_layout == RopeLayout::HalfSplit);
    CHECK(read_export_config(p3, {}).model.model_name == "llama3-8b");
    const ExportConfig named = read_export_config(p3, {{"model_name", "llama3.1-8b"}});
    CHECK(named.model.rope_layout == RopeLayout::Interleaved);
    CHECK(raw_value(named, "model_name") == "llama3.1-8b");
    CHECK(read_export_config(p3, {{"rope_type", "llama3.1"}}).model.rope_layout ==
          RopeLayout::Interleaved);
  }
  SUBCASE("--set overrides apply after the file and are parsed as YAML scalars") {
    const ExportConfig o = read_export_config(path, {{"base_num_decoder_layers", "2"},
                                                     {"rope_max_timescale", "1_000_000"},
                                                     {"scan_layers", "false"},
                                                     {"param_scan_axis", "0"},
                                                     {"max_target_length", "4_096"},
                                                     {"final_logits_soft_cap", "30.0"},
                                                     {"some_unknown_key", "[a, b]"}});
    CHECK(o.model.num_decoder_layers == 2);
    CHECK(o.model.rope_max_timescale == 1e6);
    CHECK_FALSE(o.scan_layers);
    CHECK(o.param_scan_axis == 0);
    CHECK(o.model.max_target_length == 4096);
    CHECK(o.model.final_logits_soft_cap == 30.0);
    CHECK(raw_value(o, "base_num_decoder_layers") == "2");
    CHECK(raw_value(o, "some_unknown_key") == "[a, b]");
  }
}

TEST_CASE("config: qwen3 defaults and JSON configs") {
  TempDir dir;
  SUBCASE("qwen3-0.6b YAML: q/k norm on, runtime query scale") {
    const std::string path = dir.write("qwen3-0.6b.yml", R"(
base_emb_dim: 1024
base_num_query_heads: 16
base_num_kv_heads: 8
base_mlp_dim: 3072
base_num_decoder_layers: 28
head_dim: 128
mlp_activations: ["silu", "linear"] # "gated" MLP
vocab_size: 151936
decoder_block: "qwen3"
normalization_layer_epsilon: 1e-6
rope_max_timescale: 1000000
use_qk_norm: True
logits_via_embedding: True
normalize_embedding_logits: False
tokenizer_type: "huggingface"
)");
    const kiln::ModelConfig m = read_export_config(path, {}).model;
    CHECK(m.decoder_block == "qwen3");
    CHECK(m.normalization_layer_epsilon == 1e-6);
    CHECK(m.use_qk_norm);
    CHECK(m.query_scale == doctest::Approx(1.0 / std::sqrt(128.0)).epsilon(1e-15));
    CHECK(m.logits_via_embedding);
    CHECK_FALSE(m.normalize_embedding_logits);
    CHECK(m.rope_layout == RopeLayout::HalfSplit);
    CHECK(m.rope_max_timescale == 1e6);
  }
  SUBCASE("qwen3 without use_qk_norm defaults to true; explicit false is kept") {
    const std::string path = dir.write("q.json", R"({"decoder_block": "qwen3", "emb_dim": 64,
      "num_query_heads": 4, "num_kv_heads": 2, "head_dim": 16, "mlp_dim": 128,
      "num_decoder_layers": 2, "vocab_size": 300})");
    CHECK(read_export_config(path, {}).model.use_qk_norm);
    CHECK(read_export_config(path, {}).model.query_scale == 0.25);
    CHECK_FALSE(read_export_config(path, {{"use_qk_norm", "false"}}).model.use_qk_norm);
  }
  SUBCASE("JSON with MaxText field names, detected by content") {
    const std::string path = dir.write("model.cfg", R"(  {
      "decoder_block": "mistral", "model_name": "mistral-7b", "emb_dim": 64,
      "num_query_heads": 4, "num_kv_heads": 4, "head_dim": 16, "mlp_dim": 96,
      "num_decoder_layers": 3, "vocab_size": 256, "normalization_layer_epsilon": 1e-6,
      "rope_max_timescale": 1000000, "final_logits_soft_cap": null, "mlp_activations": ["silu", "linear"],
      "logical_axis_rules": [["norm", "fsdp"]], "max_target_length": 512, "dtype": "bfloat16"})");
    const ExportConfig c = read_export_config(path, {});
    CHECK(c.model.decoder_block == "mistral");
    CHECK(c.model.model_name == "mistral-7b");
    CHECK(c.model.emb_dim == 64);
    CHECK(c.model.num_kv_heads == 4);
    CHECK(c.model.head_dim == 16);
    CHECK(c.model.final_logits_soft_cap == 0.0);
    CHECK(c.model.max_target_length == 512);
    CHECK(c.model.rope_layout == RopeLayout::HalfSplit);
    CHECK_FALSE(c.model.use_qk_norm);
    CHECK(c.model.query_scale == 1.0);
    CHECK(raw_value(c, "logical_axis_rules") == R"([["norm","fsdp"]])");
    CHECK(raw_value(c, "decoder_block") == "mistral");
  }
  SUBCASE("a JSON file without model_name gets none") {
    const std::string path = dir.write("llama3.1-8b.json", R"({"decoder_block": "llama2",
      "emb_dim": 64, "num_query_heads": 4, "num_kv_heads": 2, "head_dim": 16, "mlp_dim": 96,
      "num_decoder_layers": 1, "vocab_size": 256})");
    CHECK(read_export_config(path, {}).model.model_name.empty());
    CHECK(read_export_config(path, {}).model.rope_layout == RopeLayout::HalfSplit);
  }
}

TEST_CASE("config: the YAML subset") {
  TempDir dir;
  const std::string path =
      dir.write("tiny", std::string("---\r\n") + R"(decoder_block: llama2   # comment after a value
model_name: 'tiny # not a comment'
emb_dim: 1_024
base_num_query_heads: 8
num_kv_heads: +2
mlp_dim: 2048
num_decoder_layers: 4
vocab_size: 32_000
head_dim: 128
normalization_layer_epsilon: 1.0e-6
rope_min_timescale: .5
rope_linear_scaling_factor: 2.
rope_use_scale: false
logits_via_embedding: TRUE
final_logits_soft_cap: ~
nested_block:
  inner: 1
  deeper:
    - x # comment
block_list:
- a
- b
literal: |
  some text
  more
empty_at_end:
url: http://example.com/a#b
quoted_hash: "a # b"
weird: a#b
)");
  const ExportConfig c = read_export_config(path, {});
  CHECK(c.model.decoder_block == "llama2");
  CHECK(c.model.model_name == "tiny # not a comment");
  CHECK(c.model.emb_dim == 1024);
  CHECK(c.model.num_query_heads == 8);
  CHECK(c.model.num_kv_heads == 2);
  CHECK(c.model.vocab_size == 32000);
  CHECK(c.model.normalization_layer_epsilon == 1e-6);
  CHECK(c.model.rope_min_timescale == 0.5);
  CHECK(c.model.rope_linear_scaling_factor == 2.0);
  CHECK_FALSE(c.model.rope_use_scale);
  CHECK(c.model.logits_via_embedding);
  CHECK(c.model.final_logits_soft_cap == 0.0);
  CHECK(raw_value(c, "decoder_block") == "llama2");
  CHECK(raw_value(c, "nested_block") == "<nested block, not read>");
  CHECK(raw_value(c, "inner") == "<absent>");
  CHECK(raw_value(c, "block_list") == "<nested block, not read>");
  CHECK(raw_value(c, "literal") == "<nested block, not read>");
  CHECK(raw_value(c, "empty_at_end") == "");
  CHECK(raw_value(c, "url") == "http://example.com/a#b");
  CHECK(raw_value(c, "quoted_hash") == "a # b");
  CHECK(raw_value(c, "weird") == "a#b");
}

TEST_CASE("config: errors name the file, the key and the expectation") {
  TempDir dir;
  const std::string base = R"(decoder_block: llama2
base_emb_dim: 64
base_num_query_heads: 4
base_num_kv_heads: 2
base_mlp_dim: 96
base_num_decoder_layers: 2
head_dim: 16
vocab_size: 256
)";
  auto err = [&](const std::string& name, const std::string& text, const Overrides& o = {}) {
    const std::string path = dir.write(name, text);
    const std::string msg = error_of([&] { (void)read_export_config(path, o); });
    CHECK(!msg.empty());
    CHECK(msg.find('\n') == std::string::npos);
    CHECK(contains(msg, path));
    return msg;
  };
  // The base config itself is fine.
  CHECK(read_export_config(dir.write("ok.yml", base), {}).model.emb_dim == 64);

  SUBCASE("every missing required field in one message") {
    const std::string msg = err("missing.yml", "decoder_block: llama2\nhead_dim: 16\n");
    CHECK(contains(msg,
                   "missing required fields: emb_dim (or base_emb_dim), num_query_heads (or "
                   "base_num_query_heads), num_kv_heads (or base_num_kv_heads), mlp_dim (or "
                   "base_mlp_dim), num_decoder_layers (or base_num_decoder_layers), vocab_size"));
    CHECK(contains(err("missing2.json", "{\"emb_dim\": 4}"), "decoder_block, num_query_heads"));
    CHECK(contains(err("nullreq.yml", base + "vocab_size: null\n"),
                   "missing required field: vocab_size"));
  }
  SUBCASE("unsupported decoder_block lists the supported ones") {
    const std::string msg = err("g3.yml", base + "decoder_block: gpt3\n");
    CHECK(contains(msg,
                   "decoder_block 'gpt3' is not supported (supported: llama2, mistral, "
                   "qwen3, deepseek)"));
    // A deepseek config names the MLA fields it misses.
    CHECK(contains(err("ds.yml", base + "decoder_block: deepseek\n"),
                   "kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim"));
  }
  SUBCASE("values of the wrong type") {
    std::string msg = err("type.yml", base + "emb_dim: abc\n");
    CHECK(contains(msg, "type.yml:9: key 'emb_dim' has value 'abc', expected an integer"));
    msg = err("type2.yml", base, {{"base_emb_dim", "abc"}});
    CHECK(contains(
        msg, "--set base_emb_dim=abc: key 'base_emb_dim' has value 'abc', expected an integer"));
    CHECK(contains(err("type3.yml", base + "rope_use_scale: 3\n"), "expected true or false"));
    CHECK(contains(err("type4.yml", base + "normalization_layer_epsilon: small\n"),
                   "key 'normalization_layer_epsilon' has value 'small', expected a number"));
    CHECK(contains(err("type5.yml", base + "head_dim: 16.0\n"), "key 'head_dim' has value '16.0'"));
    CHECK(contains(err("type6.json", R"({"decoder_block": 3})"),
                   "key 'decoder_block' has value '3', expected a string"));
    CHECK(contains(err("type7.yml", base + "num_kv_heads: [1, 2]\n"), "expected an integer"));
  }
  SUBCASE("unsupported features") {
    CHECK(contains(err("act.yml", base + "mlp_activations: [gelu]\n"),
                   "mlp_activations [gelu] is not supported for decoder_block llama2 (expected "
                   "[silu, linear])"));
    CHECK(contains(err("gps.yml", base + "global_parameter_scale: 2\n"),
                   "global_parameter_scale 2 is not supported (only 1)"));
    CHECK(contains(err("yarn.yml", base + "rope_type: yarn\n"),
                   "rope_type 'yarn' (YaRN) is not supported"));
    CHECK(contains(err("rope.yml", base + "rope_type: fancy\n"),
                   "rope_type 'fancy' is not supported"));
    CHECK(contains(err("axis.yml", base + "param_scan_axis: -1\n"),
                   "param_scan_axis -1 is out of range"));
    CHECK(read_export_config(dir.write("gps1.yml", base + "global_parameter_scale: 1\n"), {})
              .model.emb_dim == 64);
  }
  SUBCASE("plain and base_ dimension that disagree") {
    CHECK(contains(err("dup.yml", base + "emb_dim: 128\n"),
                   "'emb_dim' (128) and 'base_emb_dim' (64) disagree"));
    CHECK(read_export_config(dir.write("same.yml", base + "emb_dim: 64\n"), {}).model.emb_dim ==
          64);
  }
  SUBCASE("inconsistent values are caught by ModelConfig::validate") {
    CHECK(contains(err("gqa.yml", base + "base_num_kv_heads: 3\n"), "multiple of num_kv_heads"));
  }
  SUBCASE("malformed files") {
    CHECK(
        contains(err("bad.json", "{\"decoder_block\": \"llama2\",, }"), "malformed JSON at byte"));
    CHECK(contains(err("arr.json", "[1, 2]"), "expected a JSON object"));
    CHECK(contains(err("nocolon.yml", base + "just some words\n"),
                   "nocolon.yml:9: expected 'key: value', got 'just some words'"));
    CHECK(contains(err("indent.yml", "  decoder_block: llama2\n"),
                   "indent.yml:1: unexpected indented line"));
    CHECK(contains(err("open.yml", base + "rules: [[a, b],\n  [c, d]\n"),
                   "open.yml:9: key 'rules': '[' is never closed"));
    CHECK(contains(err("toplist.yml", "- a\n"), "top-level list item"));
    CHECK(contains(err("emptykey.yml", base, {{" ", "3"}}), "empty key"));
    const std::string missing = (dir.path / "absent.yml").string();
    const std::string msg = error_of([&] { (void)read_export_config(missing, {}); });
    CHECK(contains(msg, missing));
    CHECK(contains(msg, "cannot open"));
    CHECK(contains(error_of([&] { (void)read_export_config(dir.path.string(), {}); }),
                   "not a regular file (a directory)"));
    // A number that does not fit a double is a malformed file, named, not an internal error.
    CHECK(contains(err("huge.json", "{\"decoder_block\": \"llama2\", \"emb_dim\": 1e999}"),
                   "huge.json: malformed JSON: number overflow parsing '1e999'"));
  }
}
