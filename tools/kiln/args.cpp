#include "tools/kiln/args.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include "common/text.h"

namespace kiln::cli {
namespace {

constexpr size_t kHelpWidth = 80;
constexpr size_t kMaxLeftColumn = 28;  // wider entries put their help on the next line

// Every usage message ends with the same pointer to --help, so users always know the next step.
UsageError usage_error(const std::string& program, const std::string& message) {
  return UsageError(program + ": " + message + " (see '" + program + " --help')");
}

// Greedy word wrap; `indent` starts every line after the first.
std::string wrap(std::string_view text, size_t first_column, size_t indent) {
  std::string out;
  size_t column = first_column;
  std::istringstream words{std::string(text)};
  std::string word;
  bool first = true;
  while (words >> word) {
    if (!first && column + 1 + word.size() > kHelpWidth) {
      out += '\n';
      out.append(indent, ' ');
      column = indent;
    } else if (!first) {
      out += ' ';
      ++column;
    }
    out += word;
    column += word.size();
    first = false;
  }
  return out;
}

std::string format_double(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

// ----- ArgParser ---------------------------------------------------------------------------------

ArgParser::ArgParser(std::string program, std::string description)
    : program_(std::move(program)), description_(std::move(description)) {}

ArgParser& ArgParser::positional(std::string name, std::string help) {
  positionals_.push_back({std::move(name), std::move(help)});
  return *this;
}

ArgParser& ArgParser::option(std::string name, std::string metavar, std::string help) {
  return add(
      {std::move(name), std::move(metavar), std::move(help), Kind::kOption, false, false, {}});
}

ArgParser& ArgParser::option(std::string name, std::string metavar, std::string help,
                             std::string default_value) {
  return add({std::move(name), std::move(metavar), std::move(help), Kind::kOption, false, true,
              std::move(default_value)});
}

ArgParser& ArgParser::option(std::string name, std::string metavar, std::string help, Required) {
  return add(
      {std::move(name), std::move(metavar), std::move(help), Kind::kOption, true, false, {}});
}

ArgParser& ArgParser::flag(std::string name, std::string help) {
  return add({std::move(name), {}, std::move(help), Kind::kFlag, false, false, {}});
}

ArgParser& ArgParser::multi(std::string name, std::string metavar, std::string help) {
  return add(
      {std::move(name), std::move(metavar), std::move(help), Kind::kMulti, false, false, {}});
}

ArgParser& ArgParser::multi(std::string name, std::string metavar, std::string help, Required) {
  return add({std::move(name), std::move(metavar), std::move(help), Kind::kMulti, true, false, {}});
}

ArgParser& ArgParser::add(Spec spec) {
  // Declarations are code, not input: a bad one is a bug in the command, caught by its first run.
  if (spec.name.size() < 3 || spec.name.compare(0, 2, "--") != 0 ||
      spec.name.find('=') != std::string::npos) {
    throw std::logic_error("ArgParser: option name '" + spec.name + "' must look like --name");
  }
  if (spec.name == "--help" || find(spec.name) != nullptr) {
    throw std::logic_error("ArgParser: option '" + spec.name + "' declared twice");
  }
  specs_.push_back(std::move(spec));
  return *this;
}

const ArgParser::Spec* ArgParser::find(std::string_view name) const {
  for (const Spec& s : specs_) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

Args ArgParser::parse(int argc, const char* const* argv) const {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  return parse(args);
}

Args ArgParser::parse(const std::vector<std::string>& args) const {
  // Help wins over any other problem on the line: someone typing --help after a typo wants the
  // usage, not an error about the typo.
  for (const std::string& arg : args) {
    if (arg == "--") break;
    if (arg == "-h" || arg == "--help") throw HelpRequested(usage());
  }

  Args out;
  out.program_ = program_;
  for (const Spec& s : specs_) {
    Args::Value v;
    v.is_flag = s.kind == Kind::kFlag;
    if (s.has_default) {
      v.state = Args::State::kDefault;
      v.values.push_back(s.default_value);
    }
    out.values_.emplace(s.name, std::move(v));
  }

  bool options_ended = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (!options_ended && arg == "--") {
      options_ended = true;
      continue;
    }
    // A lone "-" conventionally means stdin/stdout, so it is a positional, not an option.
    if (options_ended || arg.size() < 2 || arg[0] != '-') {
      out.positionals_.push_back(arg);
      continue;
    }

    const size_t eq = arg.compare(0, 2, "--") == 0 ? arg.find('=') : std::string::npos;
    const std::string name = arg.substr(0, eq);
    const Spec* spec = find(name);
    if (spec == nullptr) throw usage_error(program_, "unknown option '" + name + "'");
    Args::Value& v = out.values_.at(spec->name);

    if (spec->kind == Kind::kFlag) {
      if (eq != std::string::npos) {
        throw usage_error(program_, "option '" + name + "' takes no value");
      }
      v.state = Args::State::kGiven;
      continue;
    }

    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < args.size() && args[i + 1].compare(0, 2, "--") != 0) {
      // A following "--option" is much more likely a forgotten value than a value that happens
      // to start with "--"; such a value can still be passed as --opt=--value.
      value = args[++i];
    } else {
      throw usage_error(program_, "option '" + name + "' needs a value (" + spec->metavar + ")");
    }

    if (spec->kind == Kind::kOption) {
      if (v.state == Args::State::kGiven) {
        throw usage_error(program_, "option '" + name + "' given more than once");
      }
      v.values.assign(1, std::move(value));
    } else {
      v.values.push_back(std::move(value));
    }
    v.state = Args::State::kGiven;
  }

  if (out.positionals_.size() < positionals_.size()) {
    throw usage_error(program_, "missing argument " + positionals_[out.positionals_.size()].name);
  }
  if (out.positionals_.size() > positionals_.size()) {
    throw usage_error(program_,
                      "unexpected argument '" + out.positionals_[positionals_.size()] + "'");
  }

  std::string missing;
  for (const Spec& s : specs_) {
    if (s.required && out.values_.at(s.name).state != Args::State::kGiven) {
      missing += (missing.empty() ? "" : ", ") + s.name + " " + s.metavar;
    }
  }
  if (!missing.empty()) throw usage_error(program_, "missing required option " + missing);

  return out;
}

std::string ArgParser::synopsis() const {
  std::vector<std::string> items;
  for (const Positional& p : positionals_) items.push_back(p.name);
  // Required options first: they are what a reader needs to assemble a working command line.
  for (const Spec& s : specs_) {
    if (s.required)
      items.push_back(s.name + " " + s.metavar + (s.kind == Kind::kMulti ? "..." : ""));
  }
  for (const Spec& s : specs_) {
    if (s.required) continue;
    switch (s.kind) {
      case Kind::kFlag:
        items.push_back("[" + s.name + "]");
        break;
      case Kind::kOption:
        items.push_back("[" + s.name + " " + s.metavar + "]");
        break;
      case Kind::kMulti:
        items.push_back("[" + s.name + " " + s.metavar + "]...");
        break;
    }
  }

  std::string line = "Usage: " + program_;
  const size_t indent = line.size() + 1;
  std::string out;
  for (const std::string& item : items) {
    if (line.size() + 1 + item.size() > kHelpWidth && line.size() > indent) {
      out += line + '\n';
      line = std::string(indent - 1, ' ');
    }
    line += ' ' + item;
  }
  return out + line + '\n';
}

std::string ArgParser::usage() const {
  struct Row {
    std::string left;
    std::string help;
  };
  std::vector<Row> args_rows;
  for (const Positional& p : positionals_) args_rows.push_back({p.name, p.help});
  std::vector<Row> option_rows;
  for (const Spec& s : specs_) {
    std::string help = s.help;
    if (s.has_default) help += " (default: " + s.default_value + ")";
    if (s.kind == Kind::kMulti) help += s.required ? " (required, repeatable)" : " (repeatable)";
    if (s.kind == Kind::kOption && s.required) help += " (required)";
    option_rows.push_back({s.kind == Kind::kFlag ? s.name : s.name + " " + s.metavar, help});
  }
  option_rows.push_back({"-h, --help", "show this help and exit"});

  size_t left_width = 0;
  for (const auto* rows : {&args_rows, &option_rows}) {
    for (const Row& r : *rows) {
      if (r.left.size() <= kMaxLeftColumn) left_width = std::max(left_width, r.left.size());
    }
  }
  const size_t help_column = 2 + left_width + 2;

  auto section = [&](const char* title, const std::vector<Row>& rows) {
    if (rows.empty()) return std::string();
    std::string s = std::string("\n") + title + ":\n";
    for (const Row& r : rows) {
      s += "  " + r.left;
      if (r.left.size() > left_width) {
        s += '\n' + std::string(help_column, ' ');
      } else {
        s += std::string(left_width - r.left.size() + 2, ' ');
      }
      s += wrap(r.help, help_column, help_column) + '\n';
    }
    return s;
  };

  std::string out = synopsis();
  if (!description_.empty()) out += '\n' + wrap(description_, 0, 0) + '\n';
  out += section("Arguments", args_rows);
  out += section("Options", option_rows);
  return out;
}

// ----- Args --------------------------------------------------------------------------------------

const Args::Value& Args::lookup(std::string_view name) const {
  const auto it = values_.find(name);
  if (it == values_.end()) {
    throw std::logic_error(program_ + ": option '" + std::string(name) + "' was never declared");
  }
  return it->second;
}

bool Args::has(std::string_view name) const {
  const Value& v = lookup(name);
  return v.is_flag ? v.state == State::kGiven : !v.values.empty();
}

bool Args::given(std::string_view name) const {
  return lookup(name).state == State::kGiven;
}

const std::string& Args::single(std::string_view name) const {
  const Value& v = lookup(name);
  if (v.is_flag || v.values.empty()) {
    throw std::logic_error(program_ + ": option '" + std::string(name) +
                           "' has no value; check has() first");
  }
  // For a repeatable option the last value wins, matching what most tools do.
  return v.values.back();
}

const std::string& Args::get(std::string_view name) const {
  return single(name);
}

int64_t Args::get_int(std::string_view name) const {
  return get_int(name, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
}

int64_t Args::get_int(std::string_view name, int64_t min, int64_t max) const {
  const std::string& s = single(name);
  int64_t v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  const std::string what = "option '" + std::string(name) + "'";
  if (ec == std::errc::invalid_argument || ptr != s.data() + s.size()) {
    throw error(what + " expects an integer, got '" + s + "'");
  }
  if (ec == std::errc::result_out_of_range) {
    throw error(what + " is out of range for a 64-bit integer, got '" + s + "'");
  }
  if (v < min || v > max) {
    throw error(what + " must be between " + std::to_string(min) + " and " + std::to_string(max) +
                ", got '" + s + "'");
  }
  return v;
}

uint64_t Args::get_u64(std::string_view name) const {
  const std::string& s = single(name);
  uint64_t v = 0;
  // from_chars rejects a leading '-' for unsigned types, unlike strtoull which wraps it around.
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  const std::string what = "option '" + std::string(name) + "'";
  if (ec == std::errc::invalid_argument || ptr != s.data() + s.size()) {
    throw error(what + " expects a non-negative integer, got '" + s + "'");
  }
  if (ec == std::errc::result_out_of_range) {
    throw error(what + " is out of range for a 64-bit unsigned integer, got '" + s + "'");
  }
  return v;
}

double Args::get_double(std::string_view name) const {
  return get_double(name, -std::numeric_limits<double>::max(), std::numeric_limits<double>::max());
}

double Args::get_double(std::string_view name, double min, double max) const {
  const std::string& s = single(name);
  double v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  const std::string what = "option '" + std::string(name) + "'";
  // from_chars accepts "inf" and "nan"; neither is a meaningful setting for any kiln option.
  if (ec != std::errc{} || ptr != s.data() + s.size() || !std::isfinite(v)) {
    throw error(what + " expects a finite number, got '" + s + "'");
  }
  if (v < min || v > max) {
    throw error(what + " must be between " + format_double(min) + " and " + format_double(max) +
                ", got '" + s + "'");
  }
  return v;
}

std::vector<int32_t> Args::get_token_list(std::string_view name) const {
  try {
    return parse_token_list(single(name), "option '" + std::string(name) + "'");
  } catch (const UsageError& e) {
    throw error(e.what());
  }
}

const std::vector<std::string>& Args::get_all(std::string_view name) const {
  return lookup(name).values;
}

const std::string& Args::positional(size_t i) const {
  if (i >= positionals_.size()) {
    throw std::logic_error(program_ + ": positional " + std::to_string(i) + " was never declared");
  }
  return positionals_[i];
}

UsageError Args::error(const std::string& message) const {
  return usage_error(program_, message);
}

// ----- token lists -------------------------------------------------------------------------------

std::vector<int32_t> parse_token_list(const std::string& text, const std::string& what) {
  if (trim(text).empty()) throw UsageError(what + " needs at least one token id");

  std::vector<int32_t> tokens;
  size_t start = 0;
  for (size_t item = 1;; ++item) {
    const size_t comma = text.find(',', start);
    const std::string_view raw =
        std::string_view(text).substr(start, comma == std::string::npos ? comma : comma - start);
    const std::string_view s = trim(raw);
    if (s.empty()) {
      throw UsageError(what + ": token " + std::to_string(item) + " is empty in '" + text + "'");
    }
    int64_t v = 0;
    const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || ptr != s.data() + s.size() || v < 0 ||
        v > std::numeric_limits<int32_t>::max()) {
      throw UsageError(what + ": '" + std::string(s) +
                       "' is not a token id (expected an integer from 0 to 2147483647)");
    }
    tokens.push_back(static_cast<int32_t>(v));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return tokens;
}

}  // namespace kiln::cli
