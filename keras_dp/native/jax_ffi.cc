// XLA FFI handlers for JAX on the CPU:
//   KerasDpStandardNormal(key) -> z, with `key` two uint32 words and z
//     float32 of any shape (noise.h; the attribute `secure`: secure
//     mode's sampler);
//   KerasDpConvKernelGrads(x, dy) -> (squared_norms, grads): a 2-D conv's
//     per-example kernel gradients (conv_grads.h) from its inputs x
//     (n, H, W, C) and output gradients dy (n, Ho, Wo, F), the attribute
//     `geometry` holding kernel_h, kernel_w, stride_h, stride_w,
//     dilation_h, dilation_w, pad_top, pad_left, vector_width (0: the
//     widest the CPU runs); grads (n, F, kernel_h * kernel_w * C), or
//     (0, ...) for the norms alone.
#include <cstdint>

#include "chunks.h"
#include "conv_grads.h"
#include "noise.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error StandardNormal(ffi::ThreadPool pool,
                                 ffi::Buffer<ffi::U32> key, bool secure,
                                 ffi::ResultBuffer<ffi::F32> z) {
  if (key.element_count() != 2) {
    return ffi::Error::InvalidArgument("the key must have two uint32 words");
  }
  const uint32_t key0 = key.typed_data()[0], key1 = key.typed_data()[1];
  const int64_t n = z->element_count();
  float* out = z->typed_data();
  keras_dp::RunChunks(
      kdp_num_units(n, secure), keras_dp::kChunkPairs, pool.num_threads(),
      [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); },
      [=](int64_t lo, int64_t hi) {
        if (secure) {
          kdp_secure_standard_normal_range(key0, key1, out, n, lo, hi);
        } else {
          kdp_standard_normal_range(key0, key1, out, n, lo, hi);
        }
      });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasDpStandardNormal, StandardNormal,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<bool>("secure")
                                  .Ret<ffi::Buffer<ffi::F32>>());

static ffi::Error ConvKernelGrads(ffi::ThreadPool pool,
                                  ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> dy,
                                  ffi::Span<const int64_t> geometry,
                                  ffi::ResultBuffer<ffi::F32> squared_norms,
                                  ffi::ResultBuffer<ffi::F32> grads) {
  if (x.dimensions().size() != 4 || dy.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument(
        "x must be (n, H, W, C) and dy (n, Ho, Wo, F)");
  }
  if (geometry.size() != 9) {
    return ffi::Error::InvalidArgument("geometry needs 9 values");
  }
  int64_t attributes[8], x_dims[4], dy_dims[4];
  for (int i = 0; i < 8; i++) attributes[i] = geometry[i];
  for (int i = 0; i < 4; i++) {
    x_dims[i] = x.dimensions()[i];
    dy_dims[i] = dy.dimensions()[i];
  }
  keras_dp::ConvGeometry g;
  const char* error = keras_dp::SetConvGeometry(attributes, x_dims, dy_dims, &g);
  if (error != nullptr) return ffi::Error::InvalidArgument(error);
  const int64_t n = x_dims[0];
  const bool keep_grads = grads->element_count() != 0;
  if (squared_norms->element_count() != n ||
      (keep_grads && grads->element_count() !=
                         n * g.filters * g.kernel_h * g.kernel_w * g.channels)) {
    return ffi::Error::InvalidArgument("unexpected result shapes");
  }
  const int width = keras_dp::ConvGradsVectorWidth(geometry[8]);
  const float* in = x.typed_data();
  const float* out_grads = dy.typed_data();
  float* norms = squared_norms->typed_data();
  float* kernel_grads = keep_grads ? grads->typed_data() : nullptr;
  keras_dp::RunChunks(
      n, 1, pool.num_threads(),
      [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); },
      [=](int64_t lo, int64_t hi) {
        keras_dp::ConvKernelGradsOfExamples(g, width, in, out_grads, norms,
                                            kernel_grads, lo, hi);
      });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasDpConvKernelGrads, ConvKernelGrads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("geometry")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
