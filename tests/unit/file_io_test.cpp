#include "common/file_io.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "common/error.h"
#include "common/mapped_file.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("kiln-file-io-test-" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("read_whole_file reads regular files and refuses everything else by name") {
  TempDir dir;
  const std::string text = dir / "text.txt";
  std::string bytes(200'000, 'x');  // several read() calls
  bytes[0] = '\0';
  bytes.back() = '\n';
  std::ofstream(text, std::ios::binary) << bytes;
  CHECK(read_whole_file(text) == bytes);
  const std::string empty = dir / "empty.txt";
  std::ofstream(empty).flush();
  CHECK(read_whole_file(empty).empty());

  SUBCASE("missing") {
    const std::string missing = dir / "absent.txt";
    CHECK(error_of([&] { read_whole_file(missing); }).starts_with(missing + ": cannot open: "));
  }
  SUBCASE("a FIFO is refused at once, without waiting for a writer") {
    const std::string fifo = dir / "fifo";
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    CHECK(error_of([&] { read_whole_file(fifo); }) == fifo + ": not a regular file (a FIFO)");
    CHECK(error_of([&] { MappedFile m(fifo); }) == fifo + ": not a regular file (a FIFO)");
    CHECK(error_of([&] { open_regular_file(fifo); }) == fifo + ": not a regular file (a FIFO)");
  }
  SUBCASE("a directory and a device") {
    CHECK(error_of([&] { read_whole_file(dir.path.string()); }) ==
          dir.path.string() + ": not a regular file (a directory)");
    CHECK(error_of([&] { MappedFile m("/dev/zero"); }) ==
          "/dev/zero: not a regular file (a character device)");
  }
  SUBCASE("a symbolic link to a regular file is that file") {
    const std::string link = dir / "link";
    fs::create_symlink(text, link);
    CHECK(read_whole_file(link) == bytes);
  }
}

TEST_CASE("open_regular_file reports the file's status and closes on scope exit") {
  TempDir dir;
  const std::string path = dir / "five.bin";
  std::ofstream(path, std::ios::binary) << "12345";
  struct stat st {};
  int fd = -1;
  {
    FileHandle h = open_regular_file(path, &st);
    fd = h.get();
    CHECK(fd >= 0);
    CHECK(st.st_size == 5);
    const FileHandle moved(std::move(h));
    CHECK(moved.get() == fd);
    CHECK(h.get() == -1);  // NOLINT(bugprone-use-after-move): the moved-from handle owns nothing
  }
  CHECK(::fcntl(fd, F_GETFD) == -1);  // closed once, by the handle that owned it last
  CHECK(file_type_name(S_IFIFO) == "a FIFO");
  CHECK(file_type_name(S_IFBLK) == "a block device");
  CHECK(file_type_name(S_IFSOCK) == "a socket");
}
