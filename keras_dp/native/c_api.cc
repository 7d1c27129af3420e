// Plain C entry points for frameworks that call keras_dp's kernels through
// ctypes on their own CPU buffers (PyTorch: keras_dp/backend/torch.py):
//   KerasDpStandardNormalC(key0, key1, out, n, secure, threads): out[0:n] standard
//     normal float32 numbers, the same as the XLA FFI and TensorFlow
//     kernels give for the key (noise.h);
//   KerasDpNoisyGradientsC(key0, key1, num, offsets, grads, out, stddev,
//     secure, threads): out[k] = grads[k] + stddev * z over the flat draw z split
//     at `offsets` (num + 1 entries), in one pass.
//   KerasDpConvKernelGradsC(attributes, x_dims, dy_dims, x, dy,
//     squared_norms, grads, vector_width, threads): a 2-D conv's
//     per-example kernel gradients' squared norms, and the gradients
//     unless `grads` is null (conv_grads.h, as the XLA FFI and TensorFlow
//     kernels compute them), in vectors of at most `vector_width` floats
//     (0: the widest the CPU runs); returns an error message, or null.
// `secure` (0 or 1): secure mode's sampler (noise.h) instead.
//   KerasDpSetParallelRunner(runner): the work of the calls above is
//     shared by the team of the OpenMP runtime whose `GOMP_parallel` is
//     `runner` (PyTorch's own threads), or by threads of their own (null).
// `threads`: how many threads share the work (the caller's included).
// No framework headers: the library builds in a second or two.
#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "chunks.h"
#include "conv_grads.h"
#include "noise.h"

namespace {

// GOMP_parallel(fn, data, num_threads, flags): runs fn(data) on a team of
// num_threads threads, the caller's included, and returns when all have.
using ParallelRunner = void (*)(void (*)(void*), void*, unsigned, unsigned);
std::atomic<ParallelRunner> parallel_runner{nullptr};

void DrainChunks(void* chunks) {
  static_cast<keras_dp::Chunks*>(chunks)->Drain();
}

void RunOnThreads(int64_t num_units, int32_t threads,
                  std::function<void(int64_t, int64_t)> work,
                  int64_t chunk_size = keras_dp::kChunkPairs) {
  const ParallelRunner runner = parallel_runner.load();
  if (runner != nullptr && threads > 1) {
    // The framework's threads, which would otherwise spin waiting for
    // their next task on the cores that threads of our own would take.
    keras_dp::Chunks chunks(num_units, chunk_size, std::move(work));
    runner(&DrainChunks, &chunks, static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> started;
  keras_dp::RunChunks(
      num_units, chunk_size, threads > 1 ? threads - 1 : 0,
      [&started](std::function<void()> task) {
        started.emplace_back(std::move(task));
      },
      std::move(work));
  for (auto& thread : started) thread.join();
}

}  // namespace

extern "C" {

void KerasDpSetParallelRunner(void* runner) {
  parallel_runner.store(reinterpret_cast<ParallelRunner>(runner));
}

void KerasDpStandardNormalC(uint32_t key0, uint32_t key1, float* out,
                            int64_t n, int32_t secure, int32_t threads) {
  RunOnThreads(kdp_num_units(n, secure), threads, [=](int64_t lo, int64_t hi) {
    if (secure) {
      kdp_secure_standard_normal_range(key0, key1, out, n, lo, hi);
    } else {
      kdp_standard_normal_range(key0, key1, out, n, lo, hi);
    }
  });
}

void KerasDpNoisyGradientsC(uint32_t key0, uint32_t key1, int64_t num,
                            const int64_t* offsets, const float* const* grads,
                            float* const* out, float stddev, int32_t secure,
                            int32_t threads) {
  const kdp_segments segments = {num, offsets, grads, out, stddev};
  RunOnThreads(kdp_num_units(offsets[num], secure), threads,
               [&segments, key0, key1, secure](int64_t lo, int64_t hi) {
                 if (secure) {
                   kdp_secure_noisy_range(key0, key1, &segments, lo, hi);
                 } else {
                   kdp_noisy_range(key0, key1, &segments, lo, hi);
                 }
               });
}

const char* KerasDpConvKernelGradsC(const int64_t* attributes,
                                    const int64_t* x_dims,
                                    const int64_t* dy_dims, const float* x,
                                    const float* dy, float* squared_norms,
                                    float* grads, int32_t vector_width,
                                    int32_t threads) {
  keras_dp::ConvGeometry g;
  const char* error = keras_dp::SetConvGeometry(attributes, x_dims, dy_dims, &g);
  if (error != nullptr) return error;
  const int width = keras_dp::ConvGradsVectorWidth(vector_width);
  RunOnThreads(
      x_dims[0], threads,
      [=](int64_t lo, int64_t hi) {
        keras_dp::ConvKernelGradsOfExamples(g, width, x, dy, squared_norms,
                                            grads, lo, hi);
      },
      1);
  return nullptr;
}

}  // extern "C"
