// fuzz_replay: every fuzz target (built from the same sources as the libFuzzer targets, with the
// normal compiler) on every committed regression input, tests/fuzz/regressions/<target>/*, and,
// when KILN_FUZZ_SEEDS names a directory, on every seed in <dir>/<target>/ (tools/test generates
// them with tests/fuzz/make_seeds.py). An input passes when the target returns; an exception
// other than kiln::Error fails it, and so does a seed that kiln refuses (seeds are valid inputs,
// and a refused one would leave the fuzzer on the surface). Crashes and sanitizer reports end the
// process (tools/test counts that as a failure; `tools/test --sanitize` runs this under ASan and
// UBSan).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "fuzz_targets.h"
#include "tests/fuzz/fuzz_common.h"

#define KILN_DECLARE_TARGET(name) extern "C" int kiln_fuzz_##name(const uint8_t*, size_t);
KILN_FUZZ_TARGETS(KILN_DECLARE_TARGET)

namespace fs = std::filesystem;

namespace {

std::vector<fs::path> inputs_in(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

// Exactly as long as the file, on the heap, so that AddressSanitizer sees a read past the end as
// it does under libFuzzer.
void replay_one(const fs::path& path, int (*target)(const uint8_t*, size_t), bool seed) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE_MESSAGE(in, "cannot read " << path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  auto input = std::make_unique<uint8_t[]>(bytes.size());
  std::copy(bytes.begin(), bytes.end(), input.get());
  INFO("input: " << path.string());
  kiln::fuzz::take_refusal();
  CHECK_NOTHROW(target(input.get(), bytes.size()));
  const std::string refusal = kiln::fuzz::take_refusal();
  if (seed) CHECK_MESSAGE(refusal.empty(), "the seed is refused: " << refusal);
}

void replay(const std::string& name, int (*target)(const uint8_t*, size_t)) {
  for (const fs::path& p : inputs_in(fs::path(KILN_FUZZ_REGRESSIONS) / name))
    replay_one(p, target, false);
  const char* seeds = std::getenv("KILN_FUZZ_SEEDS");
  if (!seeds) {
    static const bool said = std::printf(
        "fuzz_replay: KILN_FUZZ_SEEDS is not set: replaying the committed regression inputs "
        "only\n");
    (void)said;
    return;
  }
  const std::vector<fs::path> seed_inputs = inputs_in(fs::path(seeds) / name);
  REQUIRE_MESSAGE(!seed_inputs.empty(), "no seeds in "
                                            << (fs::path(seeds) / name).string()
                                            << " (tests/fuzz/make_seeds.py writes them)");
  for (const fs::path& p : seed_inputs) replay_one(p, target, true);
}

}  // namespace

#define KILN_REPLAY_CASE(name)                                             \
  TEST_CASE("fuzz target " #name ": regression inputs and seeds replay") { \
    replay(#name, kiln_fuzz_##name);                                       \
  }
KILN_FUZZ_TARGETS(KILN_REPLAY_CASE)

TEST_CASE("every directory under tests/fuzz/regressions/ is named after a fuzz target") {
#define KILN_TARGET_NAME(name) #name,
  const std::set<std::string> targets = {KILN_FUZZ_TARGETS(KILN_TARGET_NAME)};
  for (const auto& e : fs::directory_iterator(KILN_FUZZ_REGRESSIONS)) {
    if (!e.is_directory()) continue;
    INFO(e.path().string());
    CHECK(targets.count(e.path().filename().string()) == 1);
  }
}

TEST_CASE("a bundle unpacks into sanitised relative names; a short last file takes what is left") {
  auto entry = [](const std::string& name, const std::string& data, uint32_t declared) {
    std::string e(1, char(name.size()));
    e += name;
    for (int i = 0; i < 4; ++i) e += char((declared >> (8 * i)) & 0xff);
    return e + data;
  };
  const std::string input =
      entry("../x/./a b", "12", 2) + entry("/a//b/c", "", 0) + entry(".index.json", "tail", 1000);
  const auto files =
      kiln::fuzz::unpack_bundle({reinterpret_cast<const uint8_t*>(input.data()), input.size()});
  REQUIRE(files.size() == 3);
  CHECK(files[0].name == "_../x/_.");  // at most three components
  CHECK(files[0].bytes == std::vector<uint8_t>{'1', '2'});
  CHECK(files[1].name == "a/b/c");
  CHECK(files[1].bytes.empty());
  CHECK(files[2].name == "_.index.json");
  CHECK(files[2].bytes == std::vector<uint8_t>{'t', 'a', 'i', 'l'});
  // A name cut short by the end of the input ends the bundle.
  const std::string cut = entry("abcde", "", 0).substr(0, 3);
  CHECK(kiln::fuzz::unpack_bundle({reinterpret_cast<const uint8_t*>(cut.data()), cut.size()})
            .empty());
}
