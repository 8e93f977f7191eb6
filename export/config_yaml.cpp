#include "export/config_yaml.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <vector>

#include "common/error.h"
#include "common/text.h"

namespace kiln {

using nlohmann::json;

namespace {

// Removes a trailing comment: '#' outside quotes, at the start or after whitespace (YAML treats
// `a#b` as plain text).
std::string_view strip_comment(std::string_view line) {
  char quote = 0;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quote) {
      if (c == quote) quote = 0;
    } else if (c == '\'' || c == '"') {
      if (i == 0 || std::isspace(static_cast<unsigned char>(line[i - 1])) || line[i - 1] == '[' ||
          line[i - 1] == ',' || line[i - 1] == ':')
        quote = c;
    } else if (c == '#' && (i == 0 || std::isspace(static_cast<unsigned char>(line[i - 1])))) {
      return line.substr(0, i);
    }
  }
  return line;
}

// Net bracket depth of a flow collection fragment, ignoring brackets inside quotes.
int bracket_balance(std::string_view s) {
  int depth = 0;
  char quote = 0;
  for (char c : s) {
    if (quote) {
      if (c == quote) quote = 0;
    } else if (c == '\'' || c == '"') {
      quote = c;
    } else if (c == '[' || c == '{') {
      ++depth;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return depth;
}

std::optional<std::string> unquote(std::string_view s) {
  if (s.size() < 2 || (s.front() != '"' && s.front() != '\'') || s.back() != s.front())
    return std::nullopt;
  std::string_view body = s.substr(1, s.size() - 2);
  std::string out;
  if (s.front() == '\'') {  // single quotes: only '' is special
    for (size_t i = 0; i < body.size(); ++i) {
      out += body[i];
      if (body[i] == '\'' && i + 1 < body.size() && body[i + 1] == '\'') ++i;
    }
    return out;
  }
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] != '\\' || i + 1 == body.size()) {
      out += body[i];
      continue;
    }
    switch (char c = body[++i]) {
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      default:
        out += c;
        break;
    }
  }
  return out;
}

bool is_int_text(std::string_view s) {
  size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
  if (i >= s.size() || !std::isdigit(static_cast<unsigned char>(s[i]))) return false;
  for (; i < s.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(s[i])) && s[i] != '_') return false;
  return true;
}

// [-+]? (digits[_digits]* [. digits*]? | . digits+) ([eE][-+]?digits+)?, with at least a '.' or
// an exponent (otherwise it is an integer).
bool is_float_text(std::string_view s) {
  size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
  size_t digits = 0;
  bool dot = false, exp = false;
  for (; i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '_'); ++i)
    digits += s[i] != '_';
  if (i < s.size() && s[i] == '.') {
    dot = true;
    for (++i; i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '_'); ++i)
      digits += s[i] != '_';
  }
  if (digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    exp = true;
    ++i;
    if (i < s.size() && (s[i] == '-' || s[i] == '+')) ++i;
    size_t exp_digits = 0;
    for (; i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])); ++i) ++exp_digits;
    if (exp_digits == 0) return false;
  }
  return i == s.size() && (dot || exp);
}

std::string without_underscores(std::string_view s) {
  std::string out;
  for (char c : s)
    if (c != '_') out += c;
  return out;
}

// Splits the inside of a flat `[a, b, c]` into items; nested collections are not split (the caller
// keeps those lists as raw text).
json parse_flow_list(std::string_view text) {
  std::string_view body = trim(text.substr(1, text.size() - 2));
  json arr = json::array();
  if (body.empty()) return arr;
  std::vector<std::string_view> items;
  char quote = 0;
  size_t start = 0;
  for (size_t i = 0; i <= body.size(); ++i) {
    if (i < body.size() && quote) {
      if (body[i] == quote) quote = 0;
      continue;
    }
    if (i < body.size() && (body[i] == '\'' || body[i] == '"')) {
      quote = body[i];
      continue;
    }
    if (i == body.size() || body[i] == ',') {
      items.push_back(trim(body.substr(start, i - start)));
      start = i + 1;
    }
  }
  if (!items.empty() && items.back().empty()) items.pop_back();  // trailing comma
  for (std::string_view item : items) {
    if (!item.empty() && (item.front() == '[' || item.front() == '{'))
      return json(std::string(text));  // nested: kept verbatim, no supported key needs it
    arr.push_back(parse_config_scalar(item));
  }
  return arr;
}

// A YAML 1.2-ish scalar, plus `_` digit separators as in MaxText's `500_000`.
bool indented(std::string_view line) {
  return !line.empty() && (line.front() == ' ' || line.front() == '\t');
}

}  // namespace

json parse_config_scalar(std::string_view text) {
  std::string_view s = trim(text);
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
  if (auto q = unquote(s)) return *q;
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  if (s.front() == '[' && s.back() == ']' && bracket_balance(s) == 0) return parse_flow_list(s);
  if (s.front() == '{') return std::string(s);
  if (is_int_text(s)) {
    const std::string digits = without_underscores(s);
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(digits.c_str(), &end, 10);
    if (errno == 0 && *end == '\0') return int64_t(v);
    return std::strtod(digits.c_str(), nullptr);  // too large for int64: keep the magnitude
  }
  if (is_float_text(s)) return std::strtod(without_underscores(s).c_str(), nullptr);
  const std::string l = to_lower(s);
  if (l == ".inf" || l == "+.inf") return HUGE_VAL;
  if (l == "-.inf") return -HUGE_VAL;
  if (l == ".nan") return NAN;
  return std::string(s);
}

void parse_config_yaml(const std::string& path, const std::string& content,
                       const std::function<void(const std::string&, ConfigValue)>& set) {
  std::vector<std::string_view> lines;
  {
    std::string_view all(content);
    size_t start = 0;
    while (start <= all.size()) {
      size_t nl = all.find('\n', start);
      if (nl == std::string_view::npos) nl = all.size();
      std::string_view line = all.substr(start, nl - start);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      lines.push_back(line);
      start = nl + 1;
    }
  }
  auto where = [&](size_t i) { return path + ":" + std::to_string(i + 1); };
  for (size_t i = 0; i < lines.size(); ++i) {
    std::string_view line = strip_comment(lines[i]);
    std::string_view t = trim(line);
    if (t.empty() || t == "---" || t == "...") continue;
    if (indented(line))
      throw Error(where(i) + ": unexpected indented line '" + std::string(t) +
                  "'; expected a top-level 'key: value' line");
    if (t.starts_with("- "))
      throw Error(where(i) + ": a top-level list item '" + std::string(t) +
                  "'; expected 'key: value' lines");
    // The key ends at the first ':' followed by a space or the end of the line.
    size_t colon = std::string_view::npos;
    size_t from = 0;
    if (t.front() == '"' || t.front() == '\'') from = t.find(t.front(), 1);
    for (size_t p = t.find(':', from == std::string_view::npos ? 0 : from);
         p != std::string_view::npos; p = t.find(':', p + 1)) {
      if (p + 1 == t.size() || t[p + 1] == ' ' || t[p + 1] == '\t') {
        colon = p;
        break;
      }
    }
    if (colon == std::string_view::npos || colon == 0)
      throw Error(where(i) + ": expected 'key: value', got '" + std::string(t) + "'");
    std::string_view key_text = trim(t.substr(0, colon));
    const std::string key = unquote(key_text).value_or(std::string(key_text));
    std::string value(trim(t.substr(colon + 1)));
    const size_t first = i;

    if (value.empty() || value == "|" || value == ">" || value.starts_with("|-") ||
        value.starts_with(">-")) {
      // A nested mapping, block list or block scalar: its lines are indented (a block list may
      // also start at column 0 with "- "). None of the keys we read are nested, so it is skipped.
      size_t j = i + 1, last = i;
      for (; j < lines.size(); ++j) {
        std::string_view lj = strip_comment(lines[j]);
        if (trim(lj).empty()) continue;
        if (!indented(lj) && !trim(lj).starts_with("- ") && trim(lj) != "-") break;
        last = j;
      }
      if (last == i && value.empty()) {
        set(key, ConfigValue{nullptr, "", where(first)});  // `key:` alone is null in YAML
      } else {
        set(key, ConfigValue{"<nested block, not read>", "<nested block, not read>", where(first)});
        i = last;
      }
      continue;
    }

    if (value.front() == '[' || value.front() == '{') {
      // Flow collections may span lines (MaxText's logical_axis_rules does).
      int depth = bracket_balance(value);
      while (depth > 0) {
        if (++i == lines.size())
          throw Error(where(first) + ": key '" + key + "': '" + value.substr(0, 1) +
                      "' is never closed");
        std::string_view more = trim(strip_comment(lines[i]));
        value += " ";
        value += more;
        depth += bracket_balance(more);
      }
      if (depth < 0)
        throw Error(where(first) + ": key '" + key + "': unbalanced brackets in '" + value + "'");
    }
    json v = parse_config_scalar(value);
    std::string text = v.is_string() ? v.get<std::string>() : value;
    set(key, ConfigValue{std::move(v), std::move(text), where(first)});
  }
}

}  // namespace kiln
