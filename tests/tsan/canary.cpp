// Proof that a ThreadSanitizer run of kiln's concurrency tests (tools/test --tsan) can see what it
// must: `canary race` has two threads write one int unsynchronised, and the run must report it;
// `canary barrier` hands data from one OpenMP thread to another across a barrier, and the run
// must report nothing (the runtime's barriers are visible to ThreadSanitizer only through Archer,
// LLVM's OpenMP tool). A clean run of the real tests means something only when both hold.
#include <omp.h>

#include <cstdio>
#include <cstring>
#include <thread>

namespace {

int racy_counter = 0;

void writer() {
  for (int i = 0; i < 1000; ++i) racy_counter = racy_counter + 1;
}

int race() {
  std::thread a(writer), b(writer);
  a.join();
  b.join();
  return racy_counter > 0 ? 0 : 1;
}

int barrier_handoff() {
  int slots[2] = {0, 0};
  int seen = 0;
#pragma omp parallel num_threads(2)
  {
    const int t = omp_get_thread_num();
    slots[t] = t + 1;
#pragma omp barrier
    if (t == 0) seen = slots[0] + slots[1];
  }
  return seen > 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "race") == 0) return race();
  if (argc == 2 && std::strcmp(argv[1], "barrier") == 0) return barrier_handoff();
  std::fprintf(stderr, "usage: canary race|barrier\n");
  return 2;
}
