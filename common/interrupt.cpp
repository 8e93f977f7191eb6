#include "common/interrupt.h"

#include <atomic>
#include <csignal>

namespace kiln {

namespace {
std::atomic<bool> g_interrupted{false};
extern "C" void on_signal(int) {
  g_interrupted.store(true, std::memory_order_relaxed);
}
}  // namespace

void install_interrupt_handler() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

bool interrupted() {
  return g_interrupted.load(std::memory_order_relaxed);
}

void clear_interrupted() {
  g_interrupted.store(false, std::memory_order_relaxed);
}

void throw_if_interrupted(const char* what) {
  if (interrupted()) throw Interrupted(std::string(what) + ": interrupted; nothing was written");
}

}  // namespace kiln
