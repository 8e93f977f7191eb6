#include "tools/kiln/contention.h"

#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string_view>

#include "common/clock.h"
#include "common/error.h"
#include "common/interrupt.h"
#include "engine/ops/parallel.h"
#include "tools/kiln/args.h"

extern char** environ;

namespace kiln::cli {

namespace {

struct KindName {
  LoadKind kind;
  const char* name;
};
constexpr KindName kKinds[] = {{LoadKind::kBusy, "busy"},
                               {LoadKind::kStream, "stream"},
                               {LoadKind::kFaults, "faults"},
                               {LoadKind::kOmp, "omp"}};

const char* kind_name(LoadKind k) {
  for (const KindName& n : kKinds)
    if (n.kind == k) return n.name;
  return "?";
}

int parse_int(std::string_view s, int lo, int hi, const std::string& item, const char* what) {
  int v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < lo || v > hi)
    throw UsageError("load spec '" + item + "': " + what + " must be an integer from " +
                     std::to_string(lo) + " to " + std::to_string(hi) + ", got '" + std::string(s) +
                     "'");
  return v;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  for (;;) {
    const size_t at = s.find(sep);
    out.push_back(s.substr(0, at));
    if (at == std::string_view::npos) return out;
    s.remove_prefix(at + 1);
  }
}

// ---- the load processes ----------------------------------------------------------------------

[[noreturn]] void spin() {
  volatile uint64_t x = 1;
  for (;;) x = x * 6364136223846793005u + 1442695040888963407u;
}

// Larger than any L3 this runs on, so every pass goes to memory; reads and writes, as a compiler
// or a test suite does.
[[noreturn]] void stream_memory() {
  constexpr size_t kWords = (size_t(512) << 20) / sizeof(uint64_t);
  const auto buf = std::make_unique<uint64_t[]>(kWords);
  volatile uint64_t* const first = buf.get();  // a volatile store per pass: the loop is kept
  for (uint64_t pass = 0;; ++pass) {
    uint64_t sum = 0;
    for (size_t i = 0; i < kWords; ++i) {
      sum += buf[i];
      buf[i] = sum ^ pass;
    }
    *first = sum;
  }
}

[[noreturn]] void fault_pages() {
  constexpr size_t kBytes = size_t(64) << 20;
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  for (;;) {
    void* p = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      ::usleep(1000);
      continue;
    }
    for (size_t off = 0; off < kBytes; off += page) static_cast<volatile char*>(p)[off] = 1;
    ::munmap(p, kBytes);
  }
}

// A team that meets at a barrier every ~20 µs of work: the synchronisation pattern of another
// engine, or of a parallel test binary, competing for the same cores.
[[noreturn]] void omp_team(int threads) {
  if (threads <= 0) threads = int(::sysconf(_SC_NPROCESSORS_ONLN));
  ops::run_team(threads, [](int64_t, int64_t) {
    for (;;) {
      const double until = now_seconds() + 20e-6;
      volatile uint64_t x = 1;
      while (now_seconds() < until) x = x * 3 + 1;
      ops::team_barrier();
    }
  });
  for (;;) ::pause();
}

[[noreturn]] void run_worker(LoadKind kind, int nice, int threads, pid_t parent) {
  // Die with the parent even if it is killed; the check covers a parent gone before the prctl.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(0);
  if (nice > 0) ::setpriority(PRIO_PROCESS, 0, nice);
  switch (kind) {
    case LoadKind::kBusy:
      spin();
    case LoadKind::kStream:
      stream_memory();
    case LoadKind::kFaults:
      fault_pages();
    case LoadKind::kOmp:
      omp_team(threads);
  }
  ::_exit(0);
}

}  // namespace

std::vector<LoadItem> parse_contention(const std::string& spec) {
  std::vector<LoadItem> items;
  if (spec.empty())
    throw UsageError(
        "load spec: empty; expected e.g. busy:3:nice=19 (kinds: busy, stream, "
        "faults, omp)");
  for (std::string_view item : split(spec, ',')) {
    const std::string whole(item);
    const std::vector<std::string_view> parts = split(item, ':');
    LoadItem li;
    bool known = false;
    for (const KindName& k : kKinds)
      if (parts[0] == k.name) li.kind = k.kind, known = true;
    if (!known)
      throw UsageError("load spec '" + whole + "': unknown kind '" + std::string(parts[0]) +
                       "'; expected busy, stream, faults or omp");
    for (size_t i = 1; i < parts.size(); ++i) {
      const std::string_view p = parts[i];
      if (p.starts_with("nice=")) {
        li.nice = parse_int(p.substr(5), 0, 19, whole, "nice");
      } else if (p.starts_with("threads=")) {
        if (li.kind != LoadKind::kOmp)
          throw UsageError("load spec '" + whole + "': threads= applies to omp only");
        li.threads = parse_int(p.substr(8), 1, 256, whole, "threads");
      } else if (i == 1) {
        li.count = parse_int(p, 1, 64, whole, "the count");
      } else {
        throw UsageError("load spec '" + whole + "': unexpected '" + std::string(p) +
                         "'; expected KIND[:COUNT][:nice=N][:threads=T]");
      }
    }
    items.push_back(li);
  }
  return items;
}

std::string describe_contention(const std::vector<LoadItem>& items) {
  std::string out;
  for (const LoadItem& li : items) {
    if (!out.empty()) out += ',';
    out += kind_name(li.kind);
    out += ':' + std::to_string(li.count);
    if (li.nice) out += ":nice=" + std::to_string(li.nice);
    if (li.threads) out += ":threads=" + std::to_string(li.threads);
  }
  return out;
}

Contention::Contention(const std::vector<LoadItem>& items) {
  const std::string parent = std::to_string(::getpid());
  try {
    for (const LoadItem& li : items) {
      const std::string nice = std::to_string(li.nice), threads = std::to_string(li.threads);
      const char* argv[] = {"kiln",       "contend",       "--worker",     kind_name(li.kind),
                            nice.c_str(), threads.c_str(), parent.c_str(), nullptr};
      for (int i = 0; i < li.count; ++i) {
        pid_t pid = 0;
        const int rc = ::posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr,
                                     const_cast<char* const*>(argv), environ);
        if (rc != 0) throw Error(std::string("cannot start a load process: ") + std::strerror(rc));
        pids_.push_back(pid);
      }
    }
  } catch (...) {
    stop();
    throw;
  }
}

Contention::~Contention() {
  stop();
}

void Contention::stop() {
  for (pid_t pid : pids_) ::kill(pid, SIGKILL);
  for (pid_t pid : pids_) ::waitpid(pid, nullptr, 0);
  pids_.clear();
}

int cmd_contend(int argc, const char* const* argv) {
  if (argc == 6 && std::string_view(argv[1]) == "--worker") {
    // Internal: one load process, started by Contention (argv checked there).
    LoadKind kind = LoadKind::kBusy;
    for (const KindName& k : kKinds)
      if (std::string_view(argv[2]) == k.name) kind = k.kind;
    run_worker(kind, std::atoi(argv[3]), std::atoi(argv[4]), pid_t(std::atoll(argv[5])));
  }
  ArgParser p("kiln contend",
              "Runs competing load in the foreground until interrupted (or for --seconds): the "
              "load `kiln bench --contend` runs during its measurement, for measuring any other "
              "program under the same conditions. SPEC = KIND[:COUNT][:nice=N][:threads=T],... "
              "with KIND busy (a spinning thread), stream (a thread streaming 512 MiB of "
              "memory), faults (a thread mapping, touching and unmapping 64 MiB) or omp (T "
              "OpenMP threads meeting at a barrier every ~20 us; default every core); e.g. "
              "busy:3:nice=19 or omp:2:nice=19,faults:2:nice=19,stream.");
  p.positional("SPEC", "the load, e.g. busy:3:nice=19");
  p.option("--seconds", "S", "stop after S seconds (default: run until interrupted)");
  Args a = p.parse(argc, argv);
  const std::vector<LoadItem> items = parse_contention(a.positional(0));
  const int seconds = a.has("--seconds") ? int(a.get_int("--seconds", 1, 1 << 30)) : 0;
  install_interrupt_handler();
  Contention load(items);
  std::fprintf(stderr, "kiln contend: %d processes (%s)%s\n", load.processes(),
               describe_contention(items).c_str(), seconds ? "" : "; Ctrl-C or SIGTERM stops them");
  const double until = now_seconds() + seconds;
  while (!interrupted() && (seconds == 0 || now_seconds() < until)) ::usleep(20000);
  return 0;
}

}  // namespace kiln::cli
