#include "export/lora.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string_view>

#include "common/error.h"
#include "export/key_layout.h"
#include "export/lora_reader.h"
#include "schema/blob_file.h"

namespace kiln {

namespace fs = std::filesystem;
using namespace lora_detail;

const char* adapter_format_name(AdapterFormat f) {
  return f == AdapterFormat::MaxText ? "maxtext" : "peft";
}

namespace {

// The projections LoRA may adapt (docs/maxtext.md §4.2's default module set, and the MLA
// projections for DeepSeek). Norms, the router and the experts carry no adapter.
constexpr std::string_view kLlamaTargets[] = {"attn.q",   "attn.k",   "attn.v", "attn.o",
                                              "mlp.wi_0", "mlp.wi_1", "mlp.wo"};
constexpr std::string_view kDeepSeekTargets[] = {"attn.wq_a",  "attn.wq_b",  "attn.query",
                                                 "attn.wkv_a", "attn.wkv_b", "attn.o",
                                                 "mlp.wi_0",   "mlp.wi_1",   "mlp.wo"};

int64_t product(const std::vector<int64_t>& s, size_t begin, size_t end) {
  int64_t n = 1;
  for (size_t i = begin; i < end; ++i) n *= s[i];
  return n;
}

}  // namespace

namespace lora_detail {

size_t input_axes(const std::string& tensor) {
  return tensor == "attn.o" ? 2 : 1;
}

std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

std::optional<std::vector<int64_t>> target_base_shape(const ModelConfig& c,
                                                      const std::string& tensor) {
  std::vector<int> layers = {0};
  if (c.is_deepseek() && c.first_num_dense_layers > 0 &&
      c.first_num_dense_layers < c.num_decoder_layers)
    layers.push_back(int(c.first_num_dense_layers));
  for (int l : layers) {
    std::vector<std::string> t = lora_target_tensors(c, l);
    if (std::find(t.begin(), t.end(), tensor) == t.end()) continue;
    for (const TensorSpec& s : layer_tensor_specs(c, l))
      if (s.name == tensor) return s.shape;
  }
  return std::nullopt;
}

std::vector<std::string> all_target_tensors(const ModelConfig& c) {
  std::vector<std::string> out;
  for (const GroupSpan& g : layer_groups(c)) {
    if (g.count <= 0) continue;
    for (const std::string& t : lora_target_tensors(c, int(g.first_layer)))
      if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
  }
  return out;
}

std::string file_of(const SourceTensor& t) {
  return t.file ? t.file->path() : "?";
}

}  // namespace lora_detail

// --- targets -------------------------------------------------------------------------------------

std::vector<std::string> lora_target_tensors(const ModelConfig& c, int layer) {
  std::vector<std::string> out;
  // layer_tensor_specs already knows which MLA projections and which MLP this layer has, and its
  // order is the artifact order.
  for (const TensorSpec& s : layer_tensor_specs(c, layer)) {
    bool targetable = false;
    if (c.is_deepseek())
      targetable = std::find(std::begin(kDeepSeekTargets), std::end(kDeepSeekTargets), s.name) !=
                   std::end(kDeepSeekTargets);
    else
      targetable = std::find(std::begin(kLlamaTargets), std::end(kLlamaTargets), s.name) !=
                   std::end(kLlamaTargets);
    if (targetable) out.push_back(s.name);
  }
  return out;
}

std::pair<int64_t, int64_t> lora_in_out(const ModelConfig& c, const std::string& tensor) {
  std::optional<std::vector<int64_t>> shape = target_base_shape(c, tensor);
  if (!shape)
    throw Error("tensor '" + tensor + "' cannot carry a LoRA adapter in a " + c.decoder_block +
                " model (LoRA targets: " + join(all_target_tensors(c), ", ") + ")");
  const size_t k = input_axes(tensor);
  return {product(*shape, 0, k), product(*shape, k, shape->size())};
}

// --- the adapter ---------------------------------------------------------------------------------

void AdapterSource::Impl::add(PendingPair p) {
  const auto key = std::make_pair(p.info.layer, p.info.tensor);
  auto [it, inserted] = pending.try_emplace(key, p);
  if (!inserted)
    throw Error(file_of(*p.src.a) + ": keys '" + it->second.info.a_key + "' and '" + p.info.a_key +
                "' both hold the LoRA pair of layer " + std::to_string(p.info.layer) + " " +
                p.info.tensor);
}

void AdapterSource::Impl::finish(const std::string& where) {
  if (pending.empty()) throw Error(where + ": the adapter holds no LoRA tensors");
  for (int l = 0; l < int(base.num_decoder_layers); ++l)
    for (const std::string& t : lora_target_tensors(base, l)) {
      auto it = pending.find({l, t});
      if (it == pending.end()) continue;
      by_target.emplace(it->first, targets.size());
      targets.push_back(std::move(it->second.info));
      sources.push_back(it->second.src);
    }
  // Every pending pair was checked against the layer's targets when it was added.
  if (targets.size() != pending.size())
    throw Error(where + ": internal: LoRA pairs outside the model's targets");
  pending.clear();
}

const LoraTargetInfo& AdapterSource::Impl::info_for(int layer, const std::string& tensor,
                                                    size_t* index) const {
  auto it = by_target.find({layer, tensor});
  if (it == by_target.end())
    throw Error(dir + ": internal: the adapter has no LoRA pair for layer " +
                std::to_string(layer) + " " + tensor);
  *index = it->second;
  return targets[it->second];
}

AdapterSource AdapterSource::open(const std::string& dir, const ModelConfig& base,
                                  double user_scale) {
  if (!std::isfinite(user_scale))
    throw Error("LoRA scale " + std::to_string(user_scale) + " is not a finite number");
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(dir + ": LoRA adapter directory does not exist (or is not a directory)");
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  if (!fs::exists(config_path, ec))
    throw Error(config_path +
                ": not found (a LoRA adapter directory holds adapter_config.json "
                "and the adapter weights)");
  AdapterConfig cfg(config_path);

  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->base = base;
  impl->user_scale = user_scale;
  const bool peft = cfg.json().contains("peft_type") ||
                    fs::exists(fs::path(dir) / "adapter_model.safetensors", ec);
  impl->format = peft ? AdapterFormat::Peft : AdapterFormat::MaxText;
  if (peft)
    impl->open_peft(cfg);
  else
    impl->open_maxtext(cfg);
  return AdapterSource(std::move(impl));
}

AdapterSource::AdapterSource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AdapterSource::AdapterSource(AdapterSource&&) noexcept = default;
AdapterSource& AdapterSource::operator=(AdapterSource&&) noexcept = default;
AdapterSource::~AdapterSource() = default;

AdapterFormat AdapterSource::format() const {
  return impl_->format;
}
const std::string& AdapterSource::dir() const {
  return impl_->dir;
}
int64_t AdapterSource::rank() const {
  return impl_->rank;
}
double AdapterSource::lora_alpha() const {
  return impl_->alpha;
}
bool AdapterSource::use_rslora() const {
  return impl_->rslora;
}
double AdapterSource::user_scale() const {
  return impl_->user_scale;
}
const std::vector<LoraTargetInfo>& AdapterSource::targets() const {
  return impl_->targets;
}

const LoraTargetInfo* AdapterSource::find(int layer, const std::string& tensor) const {
  auto it = impl_->by_target.find({layer, tensor});
  return it == impl_->by_target.end() ? nullptr : &impl_->targets[it->second];
}

LoraDelta AdapterSource::read(int layer, const std::string& tensor) const {
  size_t i = 0;
  const LoraTargetInfo& info = impl_->info_for(layer, tensor, &i);
  const PairSource& src = impl_->sources[i];
  const ModelConfig& c = impl_->base;
  const auto [in, out] = lora_in_out(c, tensor);
  LoraDelta d;
  d.in = in;
  d.out = out;
  d.rank = info.rank;
  d.scale = float(info.scale);
  d.a.resize(size_t(in * d.rank));
  d.b.resize(size_t(d.rank * out));
  if (impl_->format == AdapterFormat::MaxText)
    impl_->read_maxtext(src, d);
  else
    impl_->read_peft(src, info, tensor, d);
  return d;
}

void merge_lora(const LoraDelta& d, float* w) {
  if (d.a.size() != size_t(d.in * d.rank) || d.b.size() != size_t(d.rank * d.out))
    throw Error("internal: LoRA delta [" + std::to_string(d.in) + ", " + std::to_string(d.rank) +
                "]·[" + std::to_string(d.rank) + ", " + std::to_string(d.out) + "] holds " +
                std::to_string(d.a.size()) + " / " + std::to_string(d.b.size()) + " values");
  const int64_t in = d.in, out = d.out, rank = d.rank;
  const float scale = d.scale;
  // Row i of A·B is Σ_k a[i,k]·b[k,:]: accumulated into one row buffer with a unit-stride inner
  // loop over j that the compiler vectorises, then added to w once, scaled.
  std::vector<float> row(static_cast<size_t>(out));
  float* __restrict acc = row.data();
  for (int64_t i = 0; i < in; ++i) {
    std::fill(acc, acc + out, 0.0f);
    const float* ai = d.a.data() + i * rank;
    for (int64_t k = 0; k < rank; ++k) {
      const float aik = ai[k];
      const float* __restrict bk = d.b.data() + k * out;
      for (int64_t j = 0; j < out; ++j) acc[j] += aik * bk[j];
    }
    float* __restrict wi = w + i * out;
    for (int64_t j = 0; j < out; ++j) wi[j] += scale * acc[j];
  }
}

}  // namespace kiln
