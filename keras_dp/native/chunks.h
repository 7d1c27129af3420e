// Splits a range of work units (pairs of noise numbers, examples) into
// chunks that the calling thread and pool threads take from one atomic
// counter. The caller never waits on a task
// that has not started (the pool may be busy, or be the caller's own
// thread): it works through the chunks itself and then waits only for
// chunks already taken, which are being computed.
#ifndef KERAS_DP_CHUNKS_H_
#define KERAS_DP_CHUNKS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "noise.h"

namespace keras_dp {

// 16 blocks of pairs (32768 numbers): enough work per chunk that taking it
// from the counter costs little, few enough chunks per draw that the
// threads share a draw evenly.
constexpr int64_t kChunkPairs = 16 * KDP_BLOCK;

struct Chunks {
  Chunks(int64_t num_units, int64_t chunk_size,
         std::function<void(int64_t, int64_t)> work)
      : num_units(num_units),
        chunk_size(chunk_size),
        num_chunks((num_units + chunk_size - 1) / chunk_size),
        work(std::move(work)) {}

  int64_t num_units;
  int64_t chunk_size;
  int64_t num_chunks;
  std::function<void(int64_t, int64_t)> work;  // unit range [lo, hi)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  // Takes and computes chunks until none are left.
  void Drain() {
    for (;;) {
      const int64_t chunk = next.fetch_add(1);
      if (chunk >= num_chunks) return;
      const int64_t lo = chunk * chunk_size;
      const int64_t hi =
          lo + chunk_size < num_units ? lo + chunk_size : num_units;
      work(lo, hi);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs work(lo, hi) over [0, num_units) in chunks of `chunk_size` units,
// with up to `helpers` extra tasks scheduled through
// `schedule(std::function<void()>)`.
template <typename Schedule>
void RunChunks(int64_t num_units, int64_t chunk_size, int64_t helpers,
               Schedule schedule, std::function<void(int64_t, int64_t)> work) {
  auto chunks = std::make_shared<Chunks>(num_units, chunk_size, std::move(work));
  if (helpers > chunks->num_chunks - 1) helpers = chunks->num_chunks - 1;
  // A task that starts after the call returned finds no chunk left and
  // touches nothing but `chunks`, which it keeps alive.
  for (int64_t i = 0; i < helpers; i++) schedule([chunks] { chunks->Drain(); });
  chunks->Drain();
  while (chunks->finished.load(std::memory_order_acquire) <
         chunks->num_chunks) {
    std::this_thread::yield();
  }
}

}  // namespace keras_dp

#endif  // KERAS_DP_CHUNKS_H_
