// XLA FFI handler for JAX on the CPU: KerasDpStandardNormal(key) -> z,
// with `key` two uint32 words and z float32 of any shape (noise.h).
#include <cstdint>

#include "chunks.h"
#include "noise.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error StandardNormal(ffi::ThreadPool pool,
                                 ffi::Buffer<ffi::U32> key,
                                 ffi::ResultBuffer<ffi::F32> z) {
  if (key.element_count() != 2) {
    return ffi::Error::InvalidArgument("the key must have two uint32 words");
  }
  const uint32_t key0 = key.typed_data()[0], key1 = key.typed_data()[1];
  const int64_t n = z->element_count();
  float* out = z->typed_data();
  keras_dp::RunChunks(
      kdp_num_pairs(n), pool.num_threads(),
      [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); },
      [=](int64_t lo, int64_t hi) {
        kdp_standard_normal_range(key0, key1, out, n, lo, hi);
      });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasDpStandardNormal, StandardNormal,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
