// Crash-consistent, reproducible outputs: the one way kiln writes a directory (an artifact, a
// run-time adapter) or a file (the manifest of `kiln adapter`, a golden .npy, calibration
// statistics).
//
// Everything is written under a temporary sibling `.NAME.kiln-tmp-PID`, fsync'd (every file, then
// the directories) and moved to NAME with one rename, so a crash, a full disk or kill -9 leaves
// NAME as it was before or as it is after, never half-written. The temporary is locked (flock on
// its own descriptor) for as long as its writer lives; the next writer to the same NAME removes
// the temporaries whose lock is free (their writer died) and reports each on stderr, and leaves a
// locked one (a live concurrent writer) alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "common/file_io.h"

namespace kiln {

// Removes the leftovers of dead writers of `final_path`: its siblings `.NAME.kiln-tmp-PID`,
// `.NAME.kiln-old-PID` and `.NAME.kiln-calibrate-PID` (and the unhidden `NAME.kiln-calibrate-PID`
// of kiln versions before 0.1.1) whose lock is free. One stderr line per removed entry. Never
// throws: a leftover that cannot be removed is reported and skipped.
void remove_stale_temporaries(const std::string& final_path);
// The same for the temporaries of every NAME in `dir`.
void remove_stale_temporaries_in(const std::string& dir);

// fsync of one file or directory; throws kiln::Error naming `path`.
void sync_path(const std::string& path);
// fsync of every file and directory below `dir`, then of `dir` itself.
void sync_tree(const std::string& dir);

// Opens the directory `dir` (for fsync and flock); throws kiln::Error naming it.
FileHandle open_directory(const std::string& dir);

// Locks the existing directory `dir` against other kiln commands that change it (`kiln adapter
// add/remove`); throws kiln::Error naming it when another process holds the lock.
FileHandle lock_directory(const std::string& dir, const std::string& what);

// A locked, empty temporary directory `.NAME.<kind>-PID` next to `final_path` (created after
// removing stale temporaries of NAME). Removed with everything in it on destruction unless
// committed.
class StagedDirectory {
 public:
  // `kind` is "kiln-tmp" for a directory to be renamed into place, "kiln-calibrate" for scratch
  // space that never is.
  explicit StagedDirectory(std::string final_path, const char* kind = "kiln-tmp");
  ~StagedDirectory();
  StagedDirectory(const StagedDirectory&) = delete;
  StagedDirectory& operator=(const StagedDirectory&) = delete;

  const std::string& path() const { return path_; }
  const std::string& final_path() const { return final_; }

  // Syncs the tree and moves it to the final path. Without `replace`, an existing final path is
  // an error (renameat2 RENAME_NOREPLACE, so a directory another process created meanwhile is
  // never overwritten). With `replace`, an existing one is swapped out atomically
  // (RENAME_EXCHANGE: the final path is always the old or the new tree), then removed.
  // `sync` false skips every fsync, for scratch output a crash may lose.
  void commit(bool replace, bool sync = true);

 private:
  std::string final_;
  std::string path_;
  FileHandle lock_;
  bool committed_ = false;
};

// A file written through a locked temporary `.NAME.kiln-tmp-PID` beside `final_path`; commit()
// syncs it and renames it over the final path (replacing an existing file). Removed on
// destruction unless committed.
class StagedFile {
 public:
  explicit StagedFile(std::string final_path);
  ~StagedFile();
  StagedFile(const StagedFile&) = delete;
  StagedFile& operator=(const StagedFile&) = delete;

  void write(const void* data, size_t bytes);
  // Renames to `final_path`, or to `other_final` when given (a file staged under one name that is
  // committed under another, e.g. the journal of `kiln adapter`).
  void commit(const std::string& other_final = "");
  const std::string& path() const { return path_; }

 private:
  std::string final_;
  std::string path_;
  FileHandle fd_;
  bool committed_ = false;
};

// StagedFile in one call.
void write_file_durably(const std::string& path, std::span<const uint8_t> bytes);

// Renames the file `from` over `to` (same directory) and syncs the directory. Throws kiln::Error
// naming both.
void rename_durably(const std::string& from, const std::string& to);

// Moves the synced tree or file `from` to `to` (same directory), as StagedDirectory::commit does:
// without `replace` an existing `to` is an error; with it, `to` is swapped out atomically and
// removed. Syncs the directory. Throws kiln::Error naming `to`.
void move_into_place(const std::string& from, const std::string& to, bool replace,
                     bool sync = true);

// The time recorded as an output's creation time ("YYYY-MM-DDTHH:MM:SSZ"): SOURCE_DATE_EPOCH
// (decimal seconds since 1970-01-01 UTC, the reproducible-builds.org convention) when set, so two
// runs on the same inputs write identical bytes; the current time otherwise. A malformed
// SOURCE_DATE_EPOCH throws kiln::Error naming the variable.
std::string output_time_utc();

}  // namespace kiln
