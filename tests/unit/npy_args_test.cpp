// Tests for the kiln program's command-line parser (tools/kiln/args.h) and .npy I/O
// (tools/kiln/npy.h).
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/error.h"
#include "tools/kiln/args.h"
#include "tools/kiln/npy.h"

namespace fs = std::filesystem;
using kiln::UsageError;
using kiln::cli::ArgParser;
using kiln::cli::Args;
using kiln::cli::HelpRequested;

namespace {

ArgParser run_parser() {
  ArgParser p("kiln run", "Runs a prompt through an exported model.");
  p.positional("DIR", "artifact directory");
  p.option("--tokens", "LIST", "comma-separated prompt token ids", kiln::cli::required);
  p.option("--max-tokens", "N", "tokens to generate", "32");
  p.option("--temperature", "T", "sampling temperature", "0");
  p.option("--seed", "S", "sampling seed");
  p.flag("--json", "print one JSON object");
  p.multi("--checkpoint", "PATH", "a safetensors file");
  return p;
}

Args parse(const ArgParser& p, std::vector<std::string> args) {
  return p.parse(args);
}

// The message of the UsageError thrown by parsing `args`, or "" if none was thrown.
std::string usage_message(const ArgParser& p, std::vector<std::string> args) {
  try {
    p.parse(args);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

template <typename F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const kiln::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A scratch directory removed with everything in it when the test ends.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("kiln_npy_test_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// A .npy v1.0 file with the given header dict and raw data, padded the way numpy pads it.
std::string make_npy(const std::string& dict, const std::string& data, char major = 1) {
  std::string header = dict;
  const size_t prefix = major == 1 ? 10 : 12;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::string out = "\x93NUMPY";
  out += major;
  out += '\0';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  if (major != 1) out += std::string(2, '\0');
  return out + header + data;
}

template <typename T>
std::string raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

}  // namespace

// ----- args --------------------------------------------------------------------------------------

TEST_CASE("args: positional, options, defaults and flags") {
  const Args a = parse(run_parser(), {"model", "--tokens", "1,2,3", "--json"});
  CHECK(a.positional_count() == 1);
  CHECK(a.positional(0) == "model");
  CHECK(a.get("--tokens") == "1,2,3");
  CHECK(a.get_int("--max-tokens") == 32);  // default
  CHECK(a.has("--max-tokens"));
  CHECK_FALSE(a.given("--max-tokens"));
  CHECK(a.has("--json"));
  CHECK_FALSE(a.has("--seed"));  // optional, no default, not given
  CHECK(a.get_all("--checkpoint").empty());
  CHECK(a.program() == "kiln run");
}

TEST_CASE("args: --opt=value is the same as --opt value") {
  const ArgParser p = run_parser();
  const Args a = parse(p, {"--tokens=4, 5", "--max-tokens=7", "dir", "--seed", "9"});
  CHECK(a.get("--tokens") == "4, 5");
  CHECK(a.get_int("--max-tokens") == 7);
  CHECK(a.given("--max-tokens"));
  CHECK(a.get_u64("--seed") == 9);
  CHECK(a.positional(0) == "dir");
  // Only the first '=' splits, and an empty value is allowed.
  CHECK(parse(p, {"d", "--tokens=1", "--seed=a=b"}).get("--seed") == "a=b");
  CHECK(parse(p, {"d", "--tokens=1", "--seed="}).get("--seed").empty());
  // A value may start with a single '-' (a negative number).
  CHECK(parse(p, {"d", "--tokens=1", "--temperature", "-1.5"}).get_double("--temperature") == -1.5);
}

TEST_CASE("args: repeatable options keep every value in order") {
  const Args a = parse(run_parser(), {"--checkpoint", "a.safetensors", "d", "--tokens", "1",
                                      "--checkpoint=b.safetensors"});
  CHECK(a.get_all("--checkpoint") == std::vector<std::string>{"a.safetensors", "b.safetensors"});
  CHECK(a.has("--checkpoint"));
}

TEST_CASE("args: '--' ends the options") {
  const Args a = parse(run_parser(), {"--tokens", "1", "--", "--weird-dir"});
  CHECK(a.positional(0) == "--weird-dir");
}

TEST_CASE("args: unknown option") {
  CHECK(usage_message(run_parser(), {"d", "--tokens", "1", "--foo"}) ==
        "kiln run: unknown option '--foo' (see 'kiln run --help')");
  CHECK(usage_message(run_parser(), {"d", "--tokens", "1", "--foo=3"}) ==
        "kiln run: unknown option '--foo' (see 'kiln run --help')");
  CHECK(usage_message(run_parser(), {"d", "--tokens", "1", "-x"}) ==
        "kiln run: unknown option '-x' (see 'kiln run --help')");
}

TEST_CASE("args: missing or misplaced values") {
  CHECK(usage_message(run_parser(), {"d", "--tokens"}) ==
        "kiln run: option '--tokens' needs a value (LIST) (see 'kiln run --help')");
  // The next word is an option, so the value was forgotten rather than "--json".
  CHECK(contains(usage_message(run_parser(), {"d", "--tokens", "--json"}),
                 "option '--tokens' needs a value"));
  CHECK(contains(usage_message(run_parser(), {"d", "--tokens", "1", "--json=yes"}),
                 "option '--json' takes no value"));
  CHECK(contains(usage_message(run_parser(), {"d", "--tokens", "1", "--tokens", "2"}),
                 "option '--tokens' given more than once"));
}

TEST_CASE("args: missing required option and positionals") {
  CHECK(usage_message(run_parser(), {"d"}) ==
        "kiln run: missing required option --tokens LIST (see 'kiln run --help')");
  CHECK(usage_message(run_parser(), {"--tokens", "1"}) ==
        "kiln run: missing argument DIR (see 'kiln run --help')");
  CHECK(usage_message(run_parser(), {"d", "e", "--tokens", "1"}) ==
        "kiln run: unexpected argument 'e' (see 'kiln run --help')");

  ArgParser p("kiln export", "Exports a checkpoint.");
  p.multi("--checkpoint", "PATH", "a safetensors file", kiln::cli::required);
  p.option("--out", "DIR", "output directory", kiln::cli::required);
  CHECK(usage_message(p, {}) ==
        "kiln export: missing required option --checkpoint PATH, --out DIR "
        "(see 'kiln export --help')");
}

TEST_CASE("args: help") {
  const ArgParser p = run_parser();
  for (const char* h : {"-h", "--help"}) {
    CAPTURE(h);
    try {
      parse(p, {h});
      FAIL("no HelpRequested");
    } catch (const HelpRequested& e) {
      CHECK(e.usage() == p.usage());
    }
  }
  // Help wins over errors elsewhere on the line, but not after "--".
  CHECK_THROWS_AS(parse(p, {"--bogus", "--help"}), HelpRequested);
  CHECK(parse(p, {"--tokens", "1", "--", "--help"}).positional(0) == "--help");

  const std::string u = p.usage();
  INFO(u);
  CHECK(u.starts_with("Usage: kiln run DIR --tokens LIST [--max-tokens N]"));
  CHECK(contains(u, "Runs a prompt through an exported model."));
  CHECK(contains(u, "  DIR "));
  CHECK(contains(u, "artifact directory"));
  CHECK(contains(u, "--tokens LIST"));
  CHECK(contains(u, "(required)"));
  CHECK(contains(u, "tokens to generate (default: 32)"));
  CHECK(contains(u, "--json"));
  CHECK(contains(u, "(repeatable)"));
  CHECK(contains(u, "-h, --help"));
  CHECK(u.back() == '\n');
}

TEST_CASE("args: numbers") {
  const ArgParser p = run_parser();
  auto with = [&](const char* name, const char* value) {
    return parse(p, {"d", "--tokens", "1", std::string(name) + "=" + value});
  };
  CHECK(with("--max-tokens", "-3").get_int("--max-tokens") == -3);
  CHECK(with("--temperature", "0.7").get_double("--temperature") == doctest::Approx(0.7));
  CHECK(with("--temperature", "1e-3").get_double("--temperature") == doctest::Approx(1e-3));
  CHECK(with("--seed", "18446744073709551615").get_u64("--seed") == 18446744073709551615ull);

  auto message = [](auto&& f) { return error_message(f); };
  CHECK(message([&] { with("--max-tokens", "abc").get_int("--max-tokens"); }) ==
        "kiln run: option '--max-tokens' expects an integer, got 'abc' (see 'kiln run --help')");
  CHECK(contains(message([&] { with("--max-tokens", "1.5").get_int("--max-tokens"); }),
                 "expects an integer, got '1.5'"));
  CHECK(contains(message([&] { with("--max-tokens", "").get_int("--max-tokens"); }),
                 "expects an integer, got ''"));
  CHECK(contains(
      message([&] { with("--max-tokens", "99999999999999999999").get_int("--max-tokens"); }),
      "out of range"));
  CHECK(contains(message([&] { with("--max-tokens", "-1").get_int("--max-tokens", 0, 100); }),
                 "option '--max-tokens' must be between 0 and 100, got '-1'"));
  CHECK(contains(message([&] { with("--seed", "-1").get_u64("--seed"); }),
                 "option '--seed' expects a non-negative integer, got '-1'"));
  CHECK(contains(message([&] { with("--temperature", "nan").get_double("--temperature"); }),
                 "expects a finite number, got 'nan'"));
  CHECK(contains(message([&] { with("--temperature", "0.5x").get_double("--temperature"); }),
                 "expects a finite number, got '0.5x'"));
  CHECK(contains(message([&] { with("--temperature", "2").get_double("--temperature", 0, 1); }),
                 "must be between 0 and 1, got '2'"));
  // Every numeric error is a usage error (exit code 2), not a generic one.
  CHECK_THROWS_AS(with("--seed", "x").get_u64("--seed"), UsageError);
}

TEST_CASE("args: programming errors are not usage errors") {
  const Args a = parse(run_parser(), {"d", "--tokens", "1"});
  CHECK_THROWS_AS(a.get("--undeclared"), std::logic_error);
  CHECK_THROWS_AS(a.get("--seed"), std::logic_error);  // no value and no default
  CHECK_THROWS_AS(a.positional(1), std::logic_error);

  ArgParser p("kiln x", "");
  p.flag("--a", "");
  CHECK_THROWS_AS(p.flag("--a", ""), std::logic_error);
  CHECK_THROWS_AS(p.flag("-b", ""), std::logic_error);
  CHECK_THROWS_AS(p.flag("--help", ""), std::logic_error);
}

TEST_CASE("args: error() formats a command's own usage error") {
  const Args a = parse(run_parser(), {"d", "--tokens", "1"});
  const UsageError e = a.error("--top-k must be positive");
  CHECK(std::string(e.what()) == "kiln run: --top-k must be positive (see 'kiln run --help')");
}

TEST_CASE("token lists") {
  using kiln::cli::parse_token_list;
  CHECK(parse_token_list("1,2,3", "--tokens") == std::vector<int32_t>{1, 2, 3});
  CHECK(parse_token_list(" 7 , 0,\t2147483647 ", "--tokens") ==
        std::vector<int32_t>{7, 0, 2147483647});
  CHECK(parse_token_list("42", "--tokens") == std::vector<int32_t>{42});

  auto message = [](const char* text) {
    return error_message([&] { parse_token_list(text, "option '--tokens'"); });
  };
  CHECK(message("") == "option '--tokens' needs at least one token id");
  CHECK(message("  ") == "option '--tokens' needs at least one token id");
  CHECK(message("1,,2") == "option '--tokens': token 2 is empty in '1,,2'");
  CHECK(message("1,2,") == "option '--tokens': token 3 is empty in '1,2,'");
  CHECK(message("1,x,3") ==
        "option '--tokens': 'x' is not a token id (expected an integer from 0 to 2147483647)");
  CHECK(contains(message("-1"), "'-1' is not a token id"));
  CHECK(contains(message("2147483648"), "'2147483648' is not a token id"));
  CHECK(contains(message("1 2"), "'1 2' is not a token id"));
  CHECK(contains(message("1.5"), "'1.5' is not a token id"));
  CHECK_THROWS_AS(parse_token_list("x", "--tokens"), UsageError);

  // Through Args the message gains the program name and the --help pointer.
  const Args a = parse(run_parser(), {"d", "--tokens", "3, 4"});
  CHECK(a.get_token_list("--tokens") == std::vector<int32_t>{3, 4});
  const Args bad = parse(run_parser(), {"d", "--tokens", "3,y"});
  CHECK(error_message([&] { bad.get_token_list("--tokens"); }) ==
        "kiln run: option '--tokens': 'y' is not a token id (expected an integer from 0 to "
        "2147483647) (see 'kiln run --help')");
}

// ----- npy ---------------------------------------------------------------------------------------

TEST_CASE("npy: round trip of several ranks") {
  const TempDir dir;
  const std::vector<std::vector<int64_t>> shapes = {{2, 3}, {5}, {}, {2, 3, 4}, {2, 0, 3}};
  for (const auto& shape : shapes) {
    int64_t n = 1;
    for (const int64_t d : shape) n *= d;
    std::vector<float> data(static_cast<size_t>(n));
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i) * 0.25f - 1.0f;
    const std::string path = dir.file("a.npy");
    kiln::write_npy_f32(path, data.data(), shape);
    CHECK(std::distance(fs::directory_iterator(dir.path), {}) == 1);  // no temporary left

    const kiln::NpyArray back = kiln::read_npy_f32(path);
    CHECK(back.shape == shape);
    CHECK(back.data == data);
  }
}

TEST_CASE("npy: written header is what numpy writes") {
  const TempDir dir;
  const std::vector<float> data = {1.0f, -2.0f, 3.5f, 0.0f, 5.0f, 6.0f};
  const std::string path = dir.file("h.npy");
  kiln::write_npy_f32(path, data.data(), {2, 3});
  const std::string bytes = read_bytes(path);
  REQUIRE(bytes.size() > 10);
  CHECK(bytes.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  const size_t header_len =
      static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
  CHECK((10 + header_len) % 64 == 0);  // data is 64-byte aligned
  const std::string header = bytes.substr(10, header_len);
  CHECK(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
  CHECK(header.back() == '\n');
  CHECK(bytes.size() == 10 + header_len + data.size() * sizeof(float));
  CHECK(std::memcmp(bytes.data() + 10 + header_len, data.data(), data.size() * 4) == 0);

  kiln::write_npy_f32(path, data.data(), {6});
  CHECK(contains(read_bytes(path), "'shape': (6,), }"));
}

TEST_CASE("npy: a failed write leaves no file behind") {
  const TempDir dir;
  const float v = 1.0f;
  const std::string path = dir.file("missing-dir/x.npy");
  const std::string msg = error_message([&] { kiln::write_npy_f32(path, &v, {1}); });
  CHECK(contains(msg, "missing-dir/x.npy: cannot create the temporary file"));
  CHECK(fs::is_empty(dir.path));
  CHECK(contains(error_message([&] { kiln::write_npy_f32(dir.file("n.npy"), &v, {-1}); }),
                 "negative dimension"));
}

TEST_CASE("npy: reads <f8 (converted), v2.0 and numpy's optional forms") {
  const TempDir dir;
  const std::string path = dir.file("d.npy");
  write_bytes(path, make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }",
                             raw(std::vector<double>{0.5, -1.25, 3.0, 1e10})));
  kiln::NpyArray a = kiln::read_npy_f32(path);
  CHECK(a.shape == std::vector<int64_t>{2, 2});
  CHECK(a.data == std::vector<float>{0.5f, -1.25f, 3.0f, 1e10f});

  // Version 2.0, double quotes, no trailing comma, a 1-d array labelled Fortran order.
  write_bytes(path, make_npy("{\"descr\": \"<f4\", \"fortran_order\": True, \"shape\": (3,)}",
                             raw(std::vector<float>{1, 2, 3}), 2));
  a = kiln::read_npy_f32(path);
  CHECK(a.shape == std::vector<int64_t>{3});
  CHECK(a.data == std::vector<float>{1, 2, 3});
}

TEST_CASE("npy: bad files name the file and the expectation") {
  const TempDir dir;
  const std::string path = dir.file("bad.npy");
  auto message_for = [&](const std::string& bytes) {
    write_bytes(path, bytes);
    return error_message([&] { kiln::read_npy_f32(path); });
  };
  const std::string f4x6 = raw(std::vector<float>(6, 1.0f));
  const std::string ok_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

  SUBCASE("missing file") {
    CHECK(contains(error_message([&] { kiln::read_npy_f32(dir.file("none.npy")); }),
                   "none.npy: cannot open"));
  }
  SUBCASE("not a regular file: refused by name, a FIFO without waiting for a writer") {
    const std::string fifo = dir.file("fifo.npy");
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    CHECK(error_message([&] { kiln::read_npy_f32(fifo); }) ==
          fifo + ": not a regular file (a FIFO)");
    CHECK(error_message([&] { kiln::read_npy_f32("/dev/zero"); }) ==
          "/dev/zero: not a regular file (a character device)");
  }
  SUBCASE("a shape whose size wraps in 64 bits") {
    // 2^62 × 4 bytes of <f4 wrap to 0, the data the file holds.
    CHECK(message_for(make_npy(
              "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }", "")) ==
          path + ": shape (4611686018427387904,) has too many elements");
  }
  SUBCASE("bad magic") {
    std::string bytes = make_npy(ok_dict, f4x6);
    bytes[1] = 'X';
    CHECK(message_for(bytes) ==
          path + ": not a .npy file (expected it to start with \"\\x93NUMPY\")");
    CHECK(contains(message_for("abc"), "not a .npy file"));
    CHECK(contains(message_for(""), "not a .npy file"));
  }
  SUBCASE("unsupported version") {
    std::string bytes = make_npy(ok_dict, f4x6);
    bytes[6] = 9;
    CHECK(contains(message_for(bytes), "unsupported .npy version 9.0"));
  }
  SUBCASE("unsupported dtype") {
    CHECK(
        message_for(make_npy("{'descr': '>f4', 'fortran_order': False, 'shape': (6,), }", f4x6)) ==
        path + ": unsupported dtype '>f4' (expected '<f4' or '<f8')");
    CHECK(contains(
        message_for(make_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (6,), }", f4x6)),
        "unsupported dtype '<i4'"));
  }
  SUBCASE("fortran order") {
    CHECK(contains(
        message_for(make_npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", f4x6)),
        path + ": Fortran-order data is not supported"));
  }
  SUBCASE("truncated data") {
    CHECK(message_for(make_npy(ok_dict, f4x6.substr(0, 20))) ==
          path + ": truncated data: shape (2, 3) of <f4 needs 24 bytes of data, the file has 20");
  }
  SUBCASE("trailing data") {
    CHECK(contains(message_for(make_npy(ok_dict, f4x6 + "xyz")), "but 3 more bytes follow"));
  }
  SUBCASE("truncated header") {
    CHECK(contains(message_for(make_npy(ok_dict, "").substr(0, 40)), "truncated .npy header"));
  }
  SUBCASE("malformed header") {
    CHECK(contains(message_for(make_npy("{'descr': '<f4', 'shape': (6,), }", f4x6)),
                   "malformed .npy header: expected the keys"));
    CHECK(contains(
        message_for(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", f4x6)),
        "malformed .npy header"));
    CHECK(contains(message_for(make_npy("not a dict", f4x6)), "malformed .npy header"));
    CHECK(contains(
        message_for(make_npy("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (6,), }", f4x6)),
        "expected True or False"));
  }
}
