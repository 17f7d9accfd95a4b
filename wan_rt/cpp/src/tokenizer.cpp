#include "wan_rt/tokenizer.h"

#include "wan_rt/errors.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <unordered_map>
#include <unordered_set>
#include <utility>

namespace wan_rt {
namespace {

#include "text_tables.inc"

std::u32string utf8_decode(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const int n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    char32_t cp = n == 1 ? c : n == 2 ? c & 0x1f : n == 3 ? c & 0x0f : c & 0x07;
    bool ok = n > 0 && i + n <= s.size();
    for (int k = 1; ok && k < n; ++k) {
      const auto cont = static_cast<unsigned char>(s[i + k]);
      ok = (cont >> 6) == 0x2;
      cp = (cp << 6) | (cont & 0x3f);
    }
    if (!ok) {
      out.push_back(0xfffd);
      ++i;
      continue;
    }
    out.push_back(cp);
    i += n;
  }
  return out;
}

std::string utf8_encode(const std::u32string& s) {
  std::string out;
  for (char32_t c : s) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xc0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3f));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xe0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (c & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (c & 0x3f));
    }
  }
  return out;
}

template <size_t N>
std::unordered_map<char32_t, std::u32string> char_map(const std::pair<char32_t, const char32_t*> (&table)[N]) {
  std::unordered_map<char32_t, std::u32string> m;
  for (const auto& [k, v] : table) m.emplace(k, v);
  return m;
}

template <size_t N>
std::unordered_set<char32_t> char_set(const char32_t (&table)[N]) {
  return {std::begin(table), std::end(table)};
}

bool is_space(char32_t c) {
  static const auto spaces = char_set(tables::kSpaces);
  return spaces.count(c) > 0;
}

// str.translate with ftfy's tables (ligatures, width, quotes, then control characters removed).
std::u32string ftfy_fixes(const std::u32string& text) {
  static const auto ligatures = char_map(tables::kLigatures), width = char_map(tables::kWidthMap);
  static const auto single = char_set(tables::kSingleQuotes), dbl = char_set(tables::kDoubleQuotes);
  static const auto control = char_set(tables::kControlChars);
  std::u32string a, b;
  for (char32_t c : text) {
    auto it = ligatures.find(c);
    a += it == ligatures.end() ? std::u32string(1, c) : it->second;
  }
  for (char32_t c : a) {
    auto it = width.find(c);
    b += it == width.end() ? std::u32string(1, c) : it->second;
  }
  a.clear();
  for (char32_t c : b) {
    if (control.count(c)) continue;
    a += dbl.count(c) ? U'"' : single.count(c) ? U'\'' : c;
  }
  return a;
}

// Python's html.unescape: the regex &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?) and
// its replacement (_replace_charref), over code points.
std::u32string html_unescape(const std::u32string& s) {
  static const auto named = [] {
    std::unordered_map<std::string, std::u32string> m;
    for (const auto& [k, v] : tables::kHtml5) m.emplace(k, v);
    return m;
  }();
  static const auto invalid_refs = char_map(tables::kInvalidCharrefs);
  static const auto invalid_points = char_set(tables::kInvalidCodepoints);
  auto is_digit = [](char32_t c) { return c >= U'0' && c <= U'9'; };
  auto is_hex = [&](char32_t c) { return is_digit(c) || (c >= U'a' && c <= U'f') || (c >= U'A' && c <= U'F'); };
  auto ascii = [](const std::u32string& t, size_t n, std::string& out) {
    out.clear();
    for (size_t i = 0; i < n; ++i) {
      if (t[i] >= 0x80) return false;
      out += static_cast<char>(t[i]);
    }
    return true;
  };
  std::u32string out;
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    if (s[i] != U'&') {
      out += s[i++];
      continue;
    }
    size_t j = i + 1;
    if (j < n && s[j] == U'#') {
      const bool hex = j + 2 < n && (s[j + 1] == U'x' || s[j + 1] == U'X') && is_hex(s[j + 2]);
      size_t k = j + (hex ? 2 : 1);
      if (!hex && !(k < n && is_digit(s[k]))) {  // no alternative matches at this '&'
        out += s[i++];
        continue;
      }
      uint64_t num = 0;
      bool huge = false;
      for (; k < n && (hex ? is_hex(s[k]) : is_digit(s[k])); ++k) {
        const char32_t c = s[k];
        const uint64_t d = is_digit(c) ? c - U'0' : (c | 0x20) - U'a' + 10;
        num = num * (hex ? 16 : 10) + d;
        huge = huge || num > 0x10ffff;
        if (huge) num = 0x110000;
      }
      if (k < n && s[k] == U';') ++k;
      auto it = invalid_refs.find(static_cast<char32_t>(num));
      if (!huge && it != invalid_refs.end())
        out += it->second;
      else if ((num >= 0xd800 && num <= 0xdfff) || num > 0x10ffff)
        out += U'\ufffd';
      else if (!invalid_points.count(static_cast<char32_t>(num)))
        out += static_cast<char32_t>(num);
      i = k;
      continue;
    }
    size_t k = j;
    while (k < n && k - j < 32 && std::u32string_view(U"\t\n\f <&#;").find(s[k]) == std::u32string_view::npos) ++k;
    if (k == j) {
      out += s[i++];
      continue;
    }
    if (k < n && s[k] == U';') ++k;
    const std::u32string ref = s.substr(j, k - j);
    std::string key;
    std::u32string replaced = U"&" + ref;
    if (ascii(ref, ref.size(), key) && named.count(key)) {
      replaced = named.at(key);
    } else {
      for (size_t x = ref.size() - 1; x > 1; --x)  // the longest name the reference starts with
        if (ascii(ref, x, key) && named.count(key)) {
          replaced = named.at(key) + ref.substr(x);
          break;
        }
    }
    out += replaced;
    i = k;
  }
  return out;
}

std::u32string strip(const std::u32string& s) {
  size_t a = 0, b = s.size();
  while (a < b && is_space(s[a])) ++a;
  while (b > a && is_space(s[b - 1])) --b;
  return s.substr(a, b - a);
}

}  // namespace

std::string clean_prompt(const std::string& prompt) {
  const std::u32string text = strip(html_unescape(html_unescape(ftfy_fixes(utf8_decode(prompt)))));
  std::u32string collapsed;  // re.sub(r"\s+", " ", text)
  bool in_run = false;
  for (char32_t c : text) {
    if (is_space(c) && in_run) continue;
    in_run = is_space(c);
    collapsed += in_run ? U' ' : c;
  }
  return utf8_encode(strip(collapsed));
}

Tokenizer::Tokenizer(const std::string& spiece_model) : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const auto status = sp_->Load(spiece_model);
  if (!status.ok()) throw StaleEngineError(spiece_model + ": cannot load the SentencePiece model (" +
                                           status.ToString() + ")");
  eos_id_ = sp_->eos_id();
  pad_id_ = std::max(0, sp_->pad_id());  // T5's pad id is 0
}

Tokenizer::~Tokenizer() = default;

Tokens Tokenizer::operator()(const std::string& prompt, int64_t max_length) const {
  std::vector<int> pieces;
  const auto status = sp_->Encode(clean_prompt(prompt), &pieces);
  if (!status.ok()) throw std::runtime_error("SentencePiece: " + status.ToString());
  Tokens t;
  const size_t keep = std::min(pieces.size(), static_cast<size_t>(std::max<int64_t>(max_length - 1, 0)));
  t.input_ids.assign(pieces.begin(), pieces.begin() + static_cast<std::ptrdiff_t>(keep));
  t.input_ids.push_back(eos_id_);
  t.attention_mask.assign(t.input_ids.size(), 1);
  t.input_ids.resize(max_length, pad_id_);
  t.attention_mask.resize(max_length, 0);
  return t;
}

}  // namespace wan_rt
