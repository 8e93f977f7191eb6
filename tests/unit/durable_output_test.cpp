#include "common/durable_output.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "common/error.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() /
           ("kiln_durable_test_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::set<std::string> entries() const {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(path)) names.insert(e.path().filename().string());
    return names;
  }
};

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// SOURCE_DATE_EPOCH set for one scope.
struct Env {
  explicit Env(const char* value) { ::setenv("SOURCE_DATE_EPOCH", value, 1); }
  ~Env() { ::unsetenv("SOURCE_DATE_EPOCH"); }
};

}  // namespace

TEST_CASE("a staged directory appears under its name only when committed") {
  const TempDir d("commit");
  const fs::path out = d.path / "model.kiln";
  {
    StagedDirectory s(out.string());
    CHECK(fs::path(s.path()).filename() == ".model.kiln.kiln-tmp-" + std::to_string(::getpid()));
    write_text(fs::path(s.path()) / "a", "new");
    CHECK_FALSE(fs::exists(out));
    s.commit(false);
  }
  CHECK(read_text(out / "a") == "new");
  CHECK(d.entries() == std::set<std::string>{"model.kiln"});
  {
    StagedDirectory s(out.string());
    write_text(fs::path(s.path()) / "b", "abandoned");
  }  // not committed: removed
  CHECK(d.entries() == std::set<std::string>{"model.kiln"});
}

TEST_CASE("without replace an existing final path is an error; with it the swap is whole") {
  const TempDir d("replace");
  const fs::path out = d.path / "out";
  fs::create_directories(out);
  write_text(out / "old", "old");
  {
    StagedDirectory s(out.string());
    write_text(fs::path(s.path()) / "new", "new");
    CHECK(error_of([&] { s.commit(false); }).find("already exists") != std::string::npos);
    CHECK(read_text(out / "old") == "old");
  }
  CHECK(d.entries() == std::set<std::string>{"out"});
  {
    StagedDirectory s(out.string());
    write_text(fs::path(s.path()) / "new", "new");
    s.commit(true);
  }
  CHECK_FALSE(fs::exists(out / "old"));
  CHECK(read_text(out / "new") == "new");
  CHECK(d.entries() == std::set<std::string>{"out"});  // the old tree is gone, not just hidden
}

TEST_CASE("stale temporaries of dead writers are removed, a locked one and others' are kept") {
  const TempDir d("stale");
  const std::string pid = std::to_string(::getpid());
  const std::set<std::string> stale = {".m.kiln-tmp-99999991", ".m.kiln-old-12",
                                       ".m.kiln-calibrate-7", "m.kiln-calibrate-8",
                                       ".m.kiln-calibrate-8.kiln-tmp-9"};
  const std::set<std::string> unrelated = {".mm.kiln-tmp-1",  "m.kiln-tmp-1",    ".m.kiln-tmp-",
                                           ".m.kiln-tmp-12a", ".x.m.kiln-tmp-3", "m"};
  for (const auto& n : stale) {
    fs::create_directories(d.path / n / "sub");
    write_text(d.path / n / "sub" / "f", "x");
  }
  write_text(d.path / ".m.kiln-tmp-4242", "a stale staged file");
  for (const auto& n : unrelated) fs::create_directories(d.path / n);
  // A live writer: its lock is held (here by this process, through its own descriptor).
  fs::create_directories(d.path / ".m.kiln-tmp-77");
  const int live = ::open((d.path / ".m.kiln-tmp-77").c_str(), O_RDONLY | O_DIRECTORY);
  REQUIRE(live >= 0);
  REQUIRE(::flock(live, LOCK_EX | LOCK_NB) == 0);

  remove_stale_temporaries((d.path / "m").string());
  std::set<std::string> want = unrelated;
  want.insert(".m.kiln-tmp-77");
  CHECK(d.entries() == want);

  ::close(live);  // the writer died
  remove_stale_temporaries((d.path / "m/").string());
  want.erase(".m.kiln-tmp-77");
  CHECK(d.entries() == want);

  // The temporaries of every name in a directory.
  fs::create_directories(d.path / ".a.kiln-tmp-5");
  write_text(d.path / ".b.c.kiln-old-6", "");
  remove_stale_temporaries_in(d.path.string());
  CHECK(d.entries() ==
        std::set<std::string>{"m", "m.kiln-tmp-1", ".m.kiln-tmp-", ".m.kiln-tmp-12a"});
}

TEST_CASE("a staged file replaces the final file whole, or leaves nothing") {
  const TempDir d("file");
  const fs::path out = d.path / "g.npy";
  write_text(out, "old");
  {
    StagedFile f(out.string());
    f.write("new!", 4);
    CHECK(read_text(out) == "old");
    f.commit();
  }
  CHECK(read_text(out) == "new!");
  {
    StagedFile f(out.string());
    f.write("half", 4);
  }
  CHECK(read_text(out) == "new!");
  CHECK(d.entries() == std::set<std::string>{"g.npy"});
  const std::vector<uint8_t> bytes = {1, 2, 3};
  write_file_durably(out.string(), bytes);
  CHECK(read_text(out) == "\x01\x02\x03");
  const std::string msg =
      error_of([&] { write_file_durably((d.path / "no-dir" / "x").string(), bytes); });
  CHECK(msg.find("no-dir/x: cannot create the temporary file") != std::string::npos);
}

TEST_CASE("a directory lock excludes a second holder") {
  const TempDir d("lock");
  {
    const FileHandle first = lock_directory(d.path.string(), "test");
    CHECK(error_of([&] {
            lock_directory(d.path.string(), "kiln adapter add");
          }).find("another process is changing it (kiln adapter add") != std::string::npos);
  }
  CHECK_NOTHROW(lock_directory(d.path.string(), "test"));
}

TEST_CASE("the output time comes from SOURCE_DATE_EPOCH when it is set") {
  ::unsetenv("SOURCE_DATE_EPOCH");
  CHECK(output_time_utc().size() == 20);
  {
    const Env e("0");
    CHECK(output_time_utc() == "1970-01-01T00:00:00Z");
  }
  {
    const Env e("1700000000");
    CHECK(output_time_utc() == "2023-11-14T22:13:20Z");
  }
  {
    const Env e("253402300799");
    CHECK(output_time_utc() == "9999-12-31T23:59:59Z");
  }
  for (const char* bad :
       {"", "12a", "-1", " 5", "1.5", "253402300800", "99999999999999999999", "1\nsecond line"}) {
    const Env e(bad);
    const std::string msg = error_of([] { output_time_utc(); });
    CAPTURE(bad);
    CHECK(msg.starts_with("SOURCE_DATE_EPOCH: '"));
    CHECK(msg.find('\n') == std::string::npos);
  }
}
