#include "tokenizer/tokenizer.h"

#include <sentencepiece_processor.h>

#include "common/error.h"

namespace kiln {

Tokenizer::Tokenizer(std::span<const uint8_t> model, const std::string& source)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  if (model.empty()) throw Error(source + ": empty tokenizer model");
  const auto status = sp_->LoadFromSerializedProto(
      std::string_view(reinterpret_cast<const char*>(model.data()), model.size()));
  if (!status.ok())
    throw Error(source + ": not a SentencePiece model (" + std::string(status.message()) + ")");
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok())
    throw Error("tokenizer: cannot encode text (" + std::string(status.message()) + ")");
  return {ids.begin(), ids.end()};
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  const std::vector<int> v(ids.begin(), ids.end());
  std::string text;
  const auto status = sp_->Decode(v, &text);
  if (!status.ok())
    throw Error("tokenizer: cannot decode ids (" + std::string(status.message()) + ")");
  return text;
}

int64_t Tokenizer::vocab_size() const {
  return sp_->GetPieceSize();
}
int32_t Tokenizer::bos_id() const {
  return sp_->bos_id();
}
int32_t Tokenizer::eos_id() const {
  return sp_->eos_id();
}

std::string TextStream::push(int32_t id) {
  ids_.push_back(id);
  const std::string full = tok_.decode(ids_);
  // Hold back an incomplete character (byte-fallback pieces decode to U+FFFD until the rest of
  // the character arrives) and anything that no longer extends what was already returned.
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  if (full.size() >= kReplacement.size() &&
      std::string_view(full).substr(full.size() - kReplacement.size()) == kReplacement)
    return {};
  if (full.size() <= text_.size() || full.compare(0, text_.size(), text_) != 0) return {};
  std::string fresh = full.substr(text_.size());
  text_ = full;
  return fresh;
}

std::string TextStream::finish() {
  const std::string full = tok_.decode(ids_);
  if (full.size() <= text_.size() || full.compare(0, text_.size(), text_) != 0) return {};
  std::string fresh = full.substr(text_.size());
  text_ = full;
  return fresh;
}

}  // namespace kiln
