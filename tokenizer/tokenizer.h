// Text ↔ token ids with the SentencePiece model an artifact carries (`kiln export --tokenizer`).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace kiln {

class Tokenizer {
 public:
  // Parses a serialized SentencePiece model. Throws kiln::Error naming `source` if the bytes are
  // not one.
  Tokenizer(std::span<const uint8_t> model, const std::string& source);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Plain pieces, no bos/eos added.
  std::vector<int32_t> encode(std::string_view text) const;
  std::string decode(std::span<const int32_t> ids) const;

  int64_t vocab_size() const;  // pieces, control and byte pieces included
  int32_t bos_id() const;      // −1 if the model has none
  int32_t eos_id() const;      // −1 if the model has none

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

// Turns generated ids into text as they arrive: each push returns the text that became final.
// Pieces are decoded together (SentencePiece's leading-space rule and byte-fallback pieces that
// form one UTF-8 character need their neighbours), so the text of a prefix is held back while it
// could still change.
class TextStream {
 public:
  explicit TextStream(const Tokenizer& tok) : tok_(tok) {}
  std::string push(int32_t id);
  std::string finish();                              // whatever is still held back
  const std::string& text() const { return text_; }  // everything returned so far

 private:
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;
  std::string text_;
};

}  // namespace kiln
