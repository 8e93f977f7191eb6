#include "export/config_yaml.h"

#include <doctest/doctest.h>

#include <string>
#include <utility>
#include <vector>

#include "common/error.h"

using kiln::ConfigValue;
using kiln::parse_config_scalar;
using kiln::parse_config_yaml;

namespace {

std::vector<std::pair<std::string, ConfigValue>> parse(const std::string& text) {
  std::vector<std::pair<std::string, ConfigValue>> out;
  parse_config_yaml("c.yml", text, [&](const std::string& k, ConfigValue v) {
    out.emplace_back(k, std::move(v));
  });
  return out;
}

std::string error_of(const std::string& text) {
  try {
    parse(text);
  } catch (const kiln::Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST_CASE("config_yaml: keys in file order, each with its line") {
  const auto v = parse("# a model\nb: 1\n\na: [x, 2,\n    3.5]  # spans lines\nc: '7'\n");
  REQUIRE(v.size() == 3);
  CHECK(v[0].first == "b");
  CHECK(v[0].second.value == 1);
  CHECK(v[0].second.origin == "c.yml:2");
  CHECK(v[1].first == "a");
  CHECK(v[1].second.value == nlohmann::json::array({"x", 2, 3.5}));
  CHECK(v[1].second.origin == "c.yml:4");
  CHECK(v[2].second.value == "7");  // quoted: a string, not a number
  CHECK(v[2].second.origin == "c.yml:6");
}

TEST_CASE("config_yaml: scalars as MaxText writes them") {
  CHECK(parse_config_scalar("500_000") == 500000);
  CHECK(parse_config_scalar("-3") == -3);
  CHECK(parse_config_scalar("1e-5") == 1e-5);
  CHECK(parse_config_scalar("True") == true);
  CHECK(parse_config_scalar("~").is_null());
  CHECK(parse_config_scalar("99999999999999999999").is_number_float());  // beyond int64
  CHECK(parse_config_scalar("llama2") == "llama2");
  CHECK(parse_config_scalar("[[1, 2], 3]") == "[[1, 2], 3]");  // nested: kept as text
}

TEST_CASE("config_yaml: what Debian's yaml-cpp 0.7.0 loops on is refused at once, by line") {
  // falcosecurity/falco#3281: YAML::LoadAll of yaml-cpp 0.7.0 never returns on this file.
  const std::string falco =
      "- macro: exclude_commands\n"
      "  condition:\n"
      "    (user.uid = 1001 and user.loginuid in (-1, 1001) and proc.exepath = "
      "\"/usr/bin/script\" and proc.args in (\n"
      "\"/usr/local/bin/script_metrics.sh\",\n"
      "    \"-c rsync\"\n"
      "    )  )  \n"
      "    )\n";
  CHECK(error_of(falco).starts_with("c.yml:1: a top-level list item"));
  CHECK(error_of("a: [:\n") == "c.yml:1: key 'a': '[' is never closed");
  CHECK(error_of("a: 1\n  b: 2\n").starts_with("c.yml:2: unexpected indented line"));
}
