#include "common/durable_output.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

std::string errno_text(int e) {
  return std::strerror(e);
}

std::string pid_text() {
  return std::to_string(::getpid());
}

struct DirAndName {
  std::string dir;
  std::string name;
};

DirAndName split_path(const std::string& path) {
  fs::path p(path);
  if (p.filename().empty() && p.has_parent_path()) p = p.parent_path();  // "out/" is "out"
  return {p.has_parent_path() ? p.parent_path().string() : std::string("."), p.filename().string()};
}

std::string sibling(const std::string& final_path, const std::string& suffix) {
  const DirAndName dn = split_path(final_path);
  return (fs::path(dn.dir) / ("." + dn.name + "." + suffix + "-" + pid_text())).string();
}

// Consumes `prefix` followed by at least one digit from the front of `s`.
bool take_numbered(std::string_view& s, std::string_view prefix) {
  if (!s.starts_with(prefix)) return false;
  size_t n = prefix.size();
  while (n < s.size() && s[n] >= '0' && s[n] <= '9') ++n;
  if (n == prefix.size()) return false;
  s.remove_prefix(n);
  return true;
}

// Whether `entry` (a name in the directory of NAME) is a temporary some kiln writer of NAME makes.
bool is_temporary_of(std::string_view entry, const std::string& name) {
  const bool hidden = entry.starts_with('.');
  if (hidden) entry.remove_prefix(1);
  if (!entry.starts_with(name) || entry.substr(name.size(), 1) != ".") return false;
  entry.remove_prefix(name.size() + 1);
  std::string_view rest = entry;
  if (take_numbered(rest, "kiln-calibrate-")) {
    if (rest.empty()) return true;  // hidden: this kiln's scratch; unhidden: earlier builds'
    // the temporary of an earlier build's unhidden scratch export
    return hidden && take_numbered(rest, ".kiln-tmp-") && rest.empty();
  }
  if (!hidden) return false;
  for (std::string_view kind : {"kiln-tmp-", "kiln-old-"}) {
    rest = entry;
    if (take_numbered(rest, kind) && rest.empty()) return true;
  }
  return false;
}

// The lock of `path` when no live process holds it; an empty FileHandle otherwise.
FileHandle lock_if_free(const std::string& path, bool directory) {
  const int fd = ::open(
      path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | (directory ? O_DIRECTORY : 0));
  if (fd < 0) return {};
  FileHandle lock(fd);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) return {};
  return lock;
}

// Whether `fd` still is the file or directory at `path` (another writer's clean-up may have
// removed it between our creating and locking it).
bool still_at(int fd, const std::string& path) {
  struct stat a {};
  struct stat b {};
  return ::fstat(fd, &a) == 0 && ::lstat(path.c_str(), &b) == 0 && a.st_dev == b.st_dev &&
         a.st_ino == b.st_ino;
}

void sync_fd(int fd, const std::string& path) {
  if (::fsync(fd) != 0) throw Error(path + ": cannot sync to disk: " + errno_text(errno));
}

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
}

// Creates `path` with `create` (an open descriptor, or -1 and errno) and locks it. A few
// attempts: a concurrent writer's clean-up can remove it between our creating and locking it (the
// clean-up holds the lock while it removes).
template <typename Create>
FileHandle create_locked(const std::string& path, const std::string& error_prefix,
                         Create&& create) {
  for (int attempt = 0;; ++attempt) {
    FileHandle fd(create());
    const int e = errno;
    if (fd.get() >= 0 && ::flock(fd.get(), LOCK_EX | LOCK_NB) == 0 && still_at(fd.get(), path))
      return fd;
    if (fd.get() < 0 && e != EEXIST) throw Error(error_prefix + errno_text(e));
    if (attempt >= 3)
      throw Error(error_prefix + (fd.get() < 0 ? "it exists and is in use by another process"
                                               : "another process removed it"));
    ::usleep(10000);
  }
}

// Whether `entry` is a temporary of any NAME.
bool is_temporary(const std::string& entry) {
  for (size_t pos = entry.find(".kiln-"); pos != std::string::npos;
       pos = entry.find(".kiln-", pos + 1)) {
    const size_t start = entry.starts_with('.') ? 1 : 0;
    if (pos > start && is_temporary_of(entry, entry.substr(start, pos - start))) return true;
  }
  return false;
}

template <typename Match>
void remove_stale(const std::string& dir, Match&& match) {
  std::vector<std::string> found;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (match(it->path().filename().string())) found.push_back(it->path());
  std::sort(found.begin(), found.end());
  for (const std::string& path : found) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0 || !(S_ISDIR(st.st_mode) || S_ISREG(st.st_mode))) continue;
    // Held while removing, so a writer that created this very name a moment ago cannot lock it.
    const FileHandle lock = lock_if_free(path, S_ISDIR(st.st_mode));
    if (lock.get() < 0) continue;  // a live writer
    fs::remove_all(path, ec);
    if (ec)
      std::fprintf(stderr,
                   "kiln: warning: cannot remove %s, left by an interrupted kiln command: %s\n",
                   path.c_str(), ec.message().c_str());
    else
      std::fprintf(stderr, "kiln: removed %s, left by an interrupted kiln command\n", path.c_str());
  }
}

}  // namespace

FileHandle open_directory(const std::string& dir) {
  FileHandle fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) throw Error(dir + ": cannot open directory: " + errno_text(errno));
  return fd;
}

void remove_stale_temporaries(const std::string& final_path) {
  const DirAndName dn = split_path(final_path);
  remove_stale(dn.dir, [&](const std::string& entry) { return is_temporary_of(entry, dn.name); });
}

void remove_stale_temporaries_in(const std::string& dir) {
  remove_stale(dir, is_temporary);
}

void sync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) throw Error(path + ": cannot open to sync: " + errno_text(errno));
  const FileHandle owned(fd);
  sync_fd(fd, path);
}

void sync_tree(const std::string& dir) {
  std::vector<std::string> dirs;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_symlink()) continue;
    if (it->is_directory())
      dirs.push_back(it->path());
    else if (it->is_regular_file())
      sync_path(it->path());
  }
  if (ec) throw Error(dir + ": cannot list: " + ec.message());
  // A directory entry is durable once its directory is synced; innermost first, the root last.
  std::sort(dirs.begin(), dirs.end(), std::greater<>());
  for (const auto& d : dirs) sync_path(d);
  sync_path(dir);
}

FileHandle lock_directory(const std::string& dir, const std::string& what) {
  FileHandle lock = open_directory(dir);
  if (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0)
    throw Error(dir + ": another process is changing it (" + what +
                " needs it alone; try again when that has finished)");
  return lock;
}

void move_into_place(const std::string& from, const std::string& to, bool replace, bool sync) {
  const DirAndName target = split_path(to);
  const std::string from_name = split_path(from).name;
  const FileHandle dir = open_directory(target.dir);
  const auto sync_dir = [&] {
    if (sync) sync_fd(dir.get(), target.dir);
  };
  const auto exists_error = [&] {
    return Error(to +
                 ": already exists (created by another process while kiln was writing; use "
                 "--force to replace it)");
  };
  if (!replace) {
    if (::renameat2(dir.get(), from_name.c_str(), dir.get(), target.name.c_str(),
                    RENAME_NOREPLACE) == 0)
      return sync_dir();
    if (errno == EEXIST) throw exists_error();
    if (errno != EINVAL)
      throw Error(to + ": cannot rename " + from + " into place: " + errno_text(errno));
    // A filesystem without RENAME_NOREPLACE: check, then rename (a writer that creates `to`
    // between the two is overwritten; nothing better exists there).
    struct stat st {};
    if (::fstatat(dir.get(), target.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0)
      throw exists_error();
    if (::renameat(dir.get(), from_name.c_str(), dir.get(), target.name.c_str()) != 0)
      throw Error(to + ": cannot rename " + from + " into place: " + errno_text(errno));
    return sync_dir();
  }
  if (::renameat2(dir.get(), from_name.c_str(), dir.get(), target.name.c_str(), RENAME_EXCHANGE) ==
      0) {
    // `to` is the new tree and `from` the old one: at no moment was `to` missing.
    sync_dir();
    remove_tree(from);
    return sync_dir();
  }
  if (errno == ENOENT) return move_into_place(from, to, false, sync);  // nothing to replace
  if (errno != EINVAL)
    throw Error(to + ": cannot swap " + from + " into place: " + errno_text(errno));
  // A filesystem without RENAME_EXCHANGE: two renames. A crash between them leaves `to` missing
  // and the old tree under `.NAME.kiln-old-PID`, which the next writer of NAME removes.
  const std::string old = sibling(to, "kiln-old");
  const std::string old_name = split_path(old).name;
  if (::renameat(dir.get(), target.name.c_str(), dir.get(), old_name.c_str()) != 0)
    throw Error(to + ": cannot move the existing one aside: " + errno_text(errno));
  if (::renameat(dir.get(), from_name.c_str(), dir.get(), target.name.c_str()) != 0) {
    const int e = errno;
    ::renameat(dir.get(), old_name.c_str(), dir.get(), target.name.c_str());
    throw Error(to + ": cannot rename " + from + " into place: " + errno_text(e));
  }
  sync_dir();
  remove_tree(old);
  sync_dir();
}

void rename_durably(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    throw Error(to + ": cannot rename " + from + " into place: " + errno_text(errno));
  sync_path(split_path(to).dir);
}

// ----------------------------------------------------------------------------------------------
StagedDirectory::StagedDirectory(std::string final_path, const char* kind)
    : final_(std::move(final_path)) {
  remove_stale_temporaries(final_);
  path_ = sibling(final_, kind);
  lock_ = create_locked(path_, path_ + ": cannot create directory: ", [&] {
    return ::mkdir(path_.c_str(), 0777) == 0
               ? ::open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
               : -1;
  });
}

StagedDirectory::~StagedDirectory() {
  if (!committed_) remove_tree(path_);  // still locked: nobody else touches it meanwhile
}

void StagedDirectory::commit(bool replace, bool sync) {
  if (sync) sync_tree(path_);
  move_into_place(path_, final_, replace, sync);
  committed_ = true;
}

// ----------------------------------------------------------------------------------------------
StagedFile::StagedFile(std::string final_path) : final_(std::move(final_path)) {
  remove_stale_temporaries(final_);
  path_ = sibling(final_, "kiln-tmp");
  fd_ = create_locked(path_, final_ + ": cannot create the temporary file " + path_ + ": ", [&] {
    return ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  });
}

StagedFile::~StagedFile() {
  if (!committed_) ::unlink(path_.c_str());
}

void StagedFile::write(const void* data, size_t bytes) {
  const auto* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd_.get(), p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw Error(final_ + ": write failed: " + errno_text(n < 0 ? errno : ENOSPC));
    p += n;
    bytes -= size_t(n);
  }
}

void StagedFile::commit(const std::string& other_final) {
  sync_fd(fd_.get(), path_);
  rename_durably(path_, other_final.empty() ? final_ : other_final);
  committed_ = true;
}

void write_file_durably(const std::string& path, std::span<const uint8_t> bytes) {
  StagedFile f(path);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

// ----------------------------------------------------------------------------------------------
std::string output_time_utc() {
  std::time_t t = std::time(nullptr);
  if (const char* env = std::getenv("SOURCE_DATE_EPOCH")) {
    // 9999-12-31T23:59:59Z: the last second the recorded form can hold.
    constexpr uint64_t kLast = 253402300799;
    const std::string_view v(env);
    uint64_t seconds = 0;
    bool ok = !v.empty() && v.size() <= 12;
    for (char c : v) {
      ok = ok && c >= '0' && c <= '9';
      if (ok) seconds = seconds * 10 + uint64_t(c - '0');
    }
    if (!ok || seconds > kLast) {
      std::string shown;
      for (char c : v.substr(0, 40)) shown += (c >= ' ' && c <= '~') ? c : '?';
      throw Error(
          "SOURCE_DATE_EPOCH: '" + shown + (v.size() > 40 ? "...'" : "'") +
          " is not a time (expected decimal seconds since 1970-01-01 00:00:00 UTC, at most " +
          std::to_string(kLast) + ")");
    }
    t = std::time_t(seconds);
  }
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace kiln
