// Competing load for measuring kiln on a busy machine (`kiln bench --contend SPEC`, `kiln contend
// SPEC`). A spec lists processes to start beside the measurement:
//
//   SPEC  = ITEM[,ITEM...]
//   ITEM  = KIND[:COUNT][:nice=N][:threads=T]
//   KIND  = busy     one thread spinning on integer work (CPU time only)
//         | stream   one thread reading and writing a 512 MiB buffer (memory bandwidth)
//         | faults   one thread mapping, touching and unmapping 64 MiB (page faults, zeroing)
//         | omp      T OpenMP threads (default: every core) doing ~20 µs of work between
//                    barriers, like another engine or a parallel test run
//
// e.g. `busy:3:nice=19` (three niced busy loops) or `omp:2:nice=19,faults:2:nice=19,stream` (the
// mix of multi-threaded, page-faulting and streaming low-priority work of a shared build host).
// Each process is this program re-run as a worker (`/proc/self/exe contend --worker …`), dies
// with its parent, and is killed when the Contention is destroyed.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace kiln::cli {

enum class LoadKind { kBusy, kStream, kFaults, kOmp };

struct LoadItem {
  LoadKind kind = LoadKind::kBusy;
  int count = 1;
  int nice = 0;     // 0..19: only lower priority than ours
  int threads = 0;  // omp only; 0 → every core
};

// Parses SPEC; throws kiln::UsageError naming the bad item and what was expected.
std::vector<LoadItem> parse_contention(const std::string& spec);
// The spec again, normalised ("busy:3:nice=19"), for reports.
std::string describe_contention(const std::vector<LoadItem>& items);

// Starts the processes of `items` (none for an empty list) and kills them when destroyed.
class Contention {
 public:
  explicit Contention(const std::vector<LoadItem>& items);
  ~Contention();
  Contention(const Contention&) = delete;
  Contention& operator=(const Contention&) = delete;
  int processes() const { return int(pids_.size()); }

 private:
  void stop();
  std::vector<pid_t> pids_;
};

// `kiln contend`: runs SPEC in the foreground until interrupted or for --seconds; with `--worker`
// (argv as Contention starts it) runs one load process.
int cmd_contend(int argc, const char* const* argv);

}  // namespace kiln::cli
