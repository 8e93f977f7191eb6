// MaxText model configs as YAML: the flat subset MaxText's model files use — top-level
// `key: value` lines, `[a, b]` flow lists (which may span lines), comments, quoted strings and
// YAML 1.2 scalars plus MaxText's `_` digit separators (`500_000`). Nested blocks and block
// scalars are skipped as "<nested block, not read>": no model key kiln reads is nested.
//
// Why not yaml-cpp: the YAML library Debian 12 ships (yaml-cpp 0.7.0) loops forever, allocating,
// in YAML::LoadAll on some malformed inputs (upstream jbeder/yaml-cpp#1319, fixed after 0.7.0; a
// yaml-cpp-based reader ran out of memory in kiln's CI fuzz smoke, docs/hardening.md), and
// YAML::Load accepts such an input without an error and ignores what follows. A config is untrusted
// input that must fail with a one-line error naming the file and line, so kiln keeps this small
// parser, which the config_yaml fuzz target covers.
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace kiln {

// One top-level value of a config with where it came from, so that a type error can point at it.
struct ConfigValue {
  nlohmann::json value;
  std::string text;    // as written (YAML scalar text, JSON string contents or JSON dump)
  std::string origin;  // "<file>:<line>", "<file>" or "--set key=value"
};

// Calls set(key, value) for every top-level `key: value` of `content` (the text of `path`), in
// file order. Throws kiln::Error "PATH:LINE: …" for a line outside the subset (an indented line
// with no key above it, a top-level list, a line without "key:", an unclosed or unbalanced
// bracket).
void parse_config_yaml(const std::string& path, const std::string& content,
                       const std::function<void(const std::string&, ConfigValue)>& set);

// One YAML scalar as JSON: null, true/false, an int64 (a larger integer as a double), a float
// (including .inf/.nan), a quoted or plain string, or a flat `[a, b]` list of scalars (a nested
// flow collection stays text). `_` between digits is allowed, as MaxText writes `500_000`.
// Also the reading of a `--set key=value` value.
nlohmann::json parse_config_scalar(std::string_view text);

}  // namespace kiln
