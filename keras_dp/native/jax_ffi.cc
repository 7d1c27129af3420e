// XLA FFI handlers for JAX on the CPU:
//   KerasDpStandardNormal(key) -> z, with `key` two uint32 words and z
//     float32 of any shape (noise.h);
//   KerasDpConvKernelGrads(x, dy) -> (squared_norms, grads): a 2-D conv's
//     per-example kernel gradients (conv_grads.h) from its inputs x
//     (n, H, W, C) and output gradients dy (n, Ho, Wo, F), the attribute
//     `geometry` holding kernel_h, kernel_w, stride_h, stride_w,
//     dilation_h, dilation_w, pad_top, pad_left, vector_width (0: the
//     widest the CPU runs); grads (n, F, kernel_h * kernel_w * C), or
//     (0, ...) for the norms alone.
#include <cstdint>
#include <vector>

#include "chunks.h"
#include "conv_grads.h"
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
      kdp_num_pairs(n), keras_dp::kChunkPairs, pool.num_threads(),
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

static ffi::Error ConvKernelGrads(ffi::ThreadPool pool,
                                  ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> dy,
                                  ffi::Span<const int64_t> geometry,
                                  ffi::ResultBuffer<ffi::F32> squared_norms,
                                  ffi::ResultBuffer<ffi::F32> grads) {
  const auto x_dims = x.dimensions();
  const auto dy_dims = dy.dimensions();
  if (x_dims.size() != 4 || dy_dims.size() != 4 || x_dims[0] != dy_dims[0]) {
    return ffi::Error::InvalidArgument(
        "x must be (n, H, W, C) and dy (n, Ho, Wo, F)");
  }
  if (geometry.size() != 9) {
    return ffi::Error::InvalidArgument("geometry needs 9 values");
  }
  keras_dp::ConvGeometry g;
  g.kernel_h = geometry[0];
  g.kernel_w = geometry[1];
  g.stride_h = geometry[2];
  g.stride_w = geometry[3];
  g.dilation_h = geometry[4];
  g.dilation_w = geometry[5];
  g.pad_top = geometry[6];
  g.pad_left = geometry[7];
  if (g.kernel_h < 1 || g.kernel_w < 1 || g.stride_h < 1 || g.stride_w < 1 ||
      g.dilation_h < 1 || g.dilation_w < 1 || g.pad_top < 0 || g.pad_left < 0) {
    return ffi::Error::InvalidArgument(
        "kernel_size, strides and dilations must be positive, pads not "
        "negative");
  }
  int width = keras_dp::ConvGradsVectorWidth();
  if (geometry[8] > 0 && geometry[8] < width) width = geometry[8];
  const int64_t n = x_dims[0];
  g.in_h = x_dims[1];
  g.in_w = x_dims[2];
  g.channels = x_dims[3];
  g.out_h = dy_dims[1];
  g.out_w = dy_dims[2];
  g.filters = dy_dims[3];
  const int64_t columns = g.kernel_h * g.kernel_w * g.channels;
  const bool keep_grads = grads->element_count() != 0;
  if (squared_norms->element_count() != n ||
      (keep_grads && grads->element_count() != n * g.filters * columns)) {
    return ffi::Error::InvalidArgument("unexpected result shapes");
  }
  const float* in = x.typed_data();
  const float* out_grads = dy.typed_data();
  float* norms = squared_norms->typed_data();
  float* kernel_grads = keep_grads ? grads->typed_data() : nullptr;
  const int64_t x_size = g.in_h * g.in_w * g.channels;
  const int64_t dy_size = g.out_h * g.out_w * g.filters;
  const int64_t grads_size = g.filters * columns;
  keras_dp::RunChunks(
      n, 1, pool.num_threads(),
      [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); },
      [=](int64_t lo, int64_t hi) {
        std::vector<float> scratch(keras_dp::ConvGradsScratchFloats(g));
        for (int64_t i = lo; i < hi; i++) {
          norms[i] = static_cast<float>(keras_dp::ConvKernelGradsOfExample(
              g, in + i * x_size, out_grads + i * dy_size, scratch.data(),
              kernel_grads ? kernel_grads + i * grads_size : nullptr, width));
        }
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
