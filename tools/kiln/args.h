// Command-line parsing for the kiln subcommands.
//
// Each subcommand declares its arguments once; the same declarations drive parsing, validation
// and the --help text, so the usage a user sees cannot drift from what is accepted:
//
//   ArgParser p("kiln run", "Runs a prompt through an exported model and prints the tokens.");
//   p.positional("DIR", "artifact directory");
//   p.option("--tokens", "LIST", "comma-separated prompt token ids", cli::required);
//   p.option("--max-tokens", "N", "tokens to generate", "32");
//   p.flag("--json", "print one JSON object");
//   Args a = p.parse(argc, argv);       // argv[0] is the subcommand's own name and is skipped
//   int64_t n = a.get_int("--max-tokens", 0, 1 << 20);
//
// Bad usage throws kiln::UsageError (exit code 2) with a one-line message such as
//   kiln run: unknown option '--foo' (see 'kiln run --help')
// -h / --help throws HelpRequested carrying the usage text; the caller prints it and exits 0.
// Asking Args for a name that was never declared is a programming error (std::logic_error).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/error.h"

namespace kiln::cli {

// Not an error: the user asked for help. Thrown so that the command's code after parse() never
// runs; the top level prints usage() to stdout and exits 0.
class HelpRequested : public std::exception {
 public:
  explicit HelpRequested(std::string usage) : usage_(std::move(usage)) {}
  const std::string& usage() const { return usage_; }
  const char* what() const noexcept override { return usage_.c_str(); }

 private:
  std::string usage_;
};

// Tag marking an option (or a repeatable option) that must be given.
struct Required {};
inline constexpr Required required{};

class Args;

class ArgParser {
 public:
  // `program` is the name shown in messages ("kiln run"); `description` opens the help text.
  ArgParser(std::string program, std::string description);

  // A required positional argument; positionals are matched in declaration order.
  ArgParser& positional(std::string name, std::string help);
  // An option taking one value: optional with no value unless given, optional with a default,
  // or required.
  ArgParser& option(std::string name, std::string metavar, std::string help);
  ArgParser& option(std::string name, std::string metavar, std::string help,
                    std::string default_value);
  ArgParser& option(std::string name, std::string metavar, std::string help, Required);
  // A boolean switch that takes no value.
  ArgParser& flag(std::string name, std::string help);
  // An option that may be repeated, collecting every value in order (--set a=1 --set b=2).
  ArgParser& multi(std::string name, std::string metavar, std::string help);
  ArgParser& multi(std::string name, std::string metavar, std::string help, Required);

  // Parses argv[1..argc) (argv[0] is the command's own name). Accepts `--opt value`,
  // `--opt=value`, and `--` to end options. Throws UsageError or HelpRequested.
  Args parse(int argc, const char* const* argv) const;
  Args parse(const std::vector<std::string>& args) const;

  // The --help text, generated from the declarations.
  std::string usage() const;
  const std::string& program() const { return program_; }

 private:
  enum class Kind { kOption, kFlag, kMulti };
  struct Spec {
    std::string name;
    std::string metavar;
    std::string help;
    Kind kind = Kind::kOption;
    bool required = false;
    bool has_default = false;
    std::string default_value;
  };
  struct Positional {
    std::string name;
    std::string help;
  };

  ArgParser& add(Spec spec);
  const Spec* find(std::string_view name) const;
  std::string synopsis() const;

  std::string program_;
  std::string description_;
  std::vector<Positional> positionals_;
  std::vector<Spec> specs_;  // declaration order, which is also the help order
};

// The result of a successful parse. Values stay strings until asked for, so each accessor can
// report a bad number against the option it came from.
class Args {
 public:
  // A flag: whether it was given. An option: whether it has a value (given or defaulted).
  // A repeatable option: whether it was given at least once.
  bool has(std::string_view name) const;
  // Whether the user wrote the option or flag, as opposed to it holding its default.
  bool given(std::string_view name) const;

  // The value of an option, given or default. Throws std::logic_error if it has none: callers
  // check has() first for optional options declared without a default.
  const std::string& get(std::string_view name) const;
  // The value as a number; a malformed or out-of-range value is a UsageError naming the option.
  int64_t get_int(std::string_view name) const;
  int64_t get_int(std::string_view name, int64_t min, int64_t max) const;
  uint64_t get_u64(std::string_view name) const;
  double get_double(std::string_view name) const;  // finite values only
  double get_double(std::string_view name, double min, double max) const;
  // The value parsed by parse_token_list, with the error message prefixed by the program name.
  std::vector<int32_t> get_token_list(std::string_view name) const;

  // Every value of a repeatable option, in command-line order (empty if never given).
  const std::vector<std::string>& get_all(std::string_view name) const;

  const std::string& positional(size_t i) const;
  size_t positional_count() const { return positionals_.size(); }

  const std::string& program() const { return program_; }
  // A UsageError in the same format as the parser's own, for checks only the command can make
  // (`throw args.error("--top-k must not exceed the vocabulary size")`).
  UsageError error(const std::string& message) const;

 private:
  friend class ArgParser;
  enum class State { kUnset, kDefault, kGiven };
  struct Value {
    State state = State::kUnset;
    bool is_flag = false;
    std::vector<std::string> values;  // one entry for options, any number for multi
  };

  const Value& lookup(std::string_view name) const;
  const std::string& single(std::string_view name) const;

  std::string program_;
  std::vector<std::string> positionals_;
  std::map<std::string, Value, std::less<>> values_;
};

// Parses a comma-separated list of non-negative token ids ("1,2,3"; spaces around items are
// allowed). An empty list, an empty item or anything that is not an int32 token id is a
// UsageError that starts with `what` (e.g. "option '--tokens'" or "prompts.txt: line 3") and
// names the offending item.
std::vector<int32_t> parse_token_list(const std::string& text, const std::string& what);

}  // namespace kiln::cli
