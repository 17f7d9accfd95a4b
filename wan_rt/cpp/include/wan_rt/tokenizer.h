// umT5 tokenization as wan_rt's Python runtime does it (wan_rt/models/text_encoder.py): the prompt
// cleaned, the checkpoint's own SentencePiece model, EOS appended, zeros to the text length.
//
// Prompt cleaning is Wan's `clean='whitespace'`: ftfy.fix_text, HTML unescaped twice, whitespace
// collapsed. Repeated here exactly: HTML unescaping (Python's html.unescape, all HTML5 references),
// whitespace (Python's Unicode whitespace set) and ftfy's table-driven fixes (Latin ligatures,
// full/half width, curly quotes, control characters). Not repeated: ftfy's mojibake repair
// (fix_encoding, restore_byte_a0, decode_inconsistent_utf8, replace_lossy_sequences,
// fix_c1_controls), its own HTML unescape pass (it differs only on triply escaped or all-caps
// entities), ANSI escape removal (the ESC itself is still removed) and its NFC step (the
// SentencePiece model's own normalizer, NFKC for umT5, composes first anyway).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace wan_rt {

// The cleaned prompt (UTF-8 in and out; invalid UTF-8 bytes become U+FFFD).
std::string clean_prompt(const std::string& prompt);

struct Tokens {
  std::vector<int64_t> input_ids;       // pieces + EOS, zero-padded to max_length
  std::vector<int64_t> attention_mask;  // 1 on the pieces and EOS
};

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& spiece_model);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // As transformers' T5 tokenizer with padding="max_length", truncation=True: at most
  // max_length - 1 pieces, then EOS, then the pad id.
  Tokens operator()(const std::string& prompt, int64_t max_length) const;

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int64_t eos_id_, pad_id_;
};

}  // namespace wan_rt
