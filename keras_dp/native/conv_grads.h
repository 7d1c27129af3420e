// Per-example kernel gradients of a 2-D convolution, read in place from the
// layer's input and output gradients: no patches are written.
//
// For one example with input x (H, W, C) and output gradients dy (Ho, Wo, F),
// both channels-last, the kernel gradient of tap (a, b) is
//   G[f, (a * kernel_w + b) * C + c] = sum over output positions (h, w) of
//       x[h * stride_h + a * dilation_h - pad_top,
//         w * stride_w + b * dilation_w - pad_left, c] * dy[h, w, f],
// the positions outside the input (the conv's zero padding) left out. The
// columns are ordered like the kernel's (taps, C) rows.
//
// Each tile of the gradient (up to 16 channels of one tap by 16 or 32
// filters) is accumulated in vector registers over all output positions
// and then written once, with its squared norm added to the example's, so
// the norms need no second pass over the gradients and can be had without
// writing them at all. On x86-64 the tiles use AVX-512 or AVX2 registers
// where the CPU has them (checked at run time), and 128-bit vectors
// otherwise.
#ifndef KERAS_DP_CONV_GRADS_H_
#define KERAS_DP_CONV_GRADS_H_

#include <cstdint>
#include <cstring>
#include <vector>

namespace keras_dp {

struct ConvGeometry {
  int64_t in_h, in_w, channels;
  int64_t out_h, out_w, filters;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t dilation_h, dilation_w;
  int64_t pad_top, pad_left;
};

namespace conv_grads_internal {

// One tile: channels [c0, c0 + CB) of tap (a, b), filters [f0, f0 + FB * L)
// of the padded output gradients `dy` (row length `row`).
template <int L, int CB, int FB>
__attribute__((always_inline)) inline void Tile(
    const ConvGeometry& g, const float* x, const float* dy, int64_t row,
    int64_t a, int64_t b, int64_t c0, int64_t f0, double* squared_norm,
    float* grads) {
  typedef float vec __attribute__((vector_size(L * sizeof(float))));
  vec acc[CB][FB];
  std::memset(acc, 0, sizeof(acc));
  const int64_t x_step = g.stride_w * g.channels;
  const int64_t w_offset = b * g.dilation_w - g.pad_left;
  // Output columns whose input column lies inside the input.
  int64_t w_begin = w_offset >= 0 ? 0 : (-w_offset + g.stride_w - 1) / g.stride_w;
  int64_t w_end = g.in_w - 1 - w_offset < 0
                      ? 0
                      : (g.in_w - 1 - w_offset) / g.stride_w + 1;
  if (w_end > g.out_w) w_end = g.out_w;
  for (int64_t h = 0; w_begin < w_end && h < g.out_h; h++) {
    const int64_t in_row = h * g.stride_h + a * g.dilation_h - g.pad_top;
    if (in_row < 0 || in_row >= g.in_h) continue;
    const float* xp =
        x + (in_row * g.in_w + w_begin * g.stride_w + w_offset) * g.channels + c0;
    const float* dp = dy + (h * g.out_w + w_begin) * row + f0;
    for (int64_t w = w_begin; w < w_end; w++, xp += x_step, dp += row) {
      vec d[FB];
      for (int j = 0; j < FB; j++) std::memcpy(&d[j], dp + j * L, sizeof(vec));
      for (int c = 0; c < CB; c++) {
        const float xc = xp[c];
        for (int j = 0; j < FB; j++) acc[c][j] += xc * d[j];
      }
    }
  }
  vec squares = acc[0][0] * acc[0][0];
  for (int c = 0; c < CB; c++)
    for (int j = (c == 0); j < FB; j++) squares += acc[c][j] * acc[c][j];
  float lanes[L];
  std::memcpy(lanes, &squares, sizeof(lanes));
  for (int l = 0; l < L; l++) *squared_norm += lanes[l];
  if (grads == nullptr) return;
  float tile[CB][FB * L];
  std::memcpy(tile, acc, sizeof(tile));
  const int64_t columns = g.kernel_h * g.kernel_w * g.channels;
  float* out = grads + f0 * columns + (a * g.kernel_w + b) * g.channels + c0;
  for (int f = 0; f < FB * L && f0 + f < g.filters; f++, out += columns) {
    for (int c = 0; c < CB; c++) out[c] = tile[c][f];
  }
}

// A last block of `rest` (< CB) channels.
template <int L, int CB, int FB>
__attribute__((always_inline)) inline void LastChannels(
    int64_t rest, const ConvGeometry& g, const float* x, const float* dy,
    int64_t row, int64_t a, int64_t b, int64_t c0, int64_t f0,
    double* squared_norm, float* grads) {
  if constexpr (CB > 0) {
    if (rest == CB) {
      Tile<L, CB, FB>(g, x, dy, row, a, b, c0, f0, squared_norm, grads);
    } else {
      LastChannels<L, CB - 1, FB>(rest, g, x, dy, row, a, b, c0, f0,
                                  squared_norm, grads);
    }
  }
}

template <int L, int CB, int FB>
__attribute__((always_inline)) inline void Channels(
    const ConvGeometry& g, const float* x, const float* dy, int64_t row,
    int64_t a, int64_t b, int64_t f0, double* squared_norm, float* grads) {
  int64_t c0 = 0;
  for (; c0 + CB <= g.channels; c0 += CB) {
    Tile<L, CB, FB>(g, x, dy, row, a, b, c0, f0, squared_norm, grads);
  }
  LastChannels<L, CB - 1, FB>(g.channels - c0, g, x, dy, row, a, b, c0, f0,
                              squared_norm, grads);
}

template <int L>
__attribute__((always_inline)) inline double Example(
    const ConvGeometry& g, const float* x, const float* dy, float* scratch,
    float* grads) {
  // Filters padded to whole vectors (zeros), so that tiles need no masks.
  const int64_t row = (g.filters + L - 1) / L * L;
  if (row != g.filters) {
    for (int64_t t = 0; t < g.out_h * g.out_w; t++) {
      std::memcpy(scratch + t * row, dy + t * g.filters,
                  g.filters * sizeof(float));
      std::memset(scratch + t * row + g.filters, 0,
                  (row - g.filters) * sizeof(float));
    }
    dy = scratch;
  }
  double squared_norm = 0.0;
  for (int64_t a = 0; a < g.kernel_h; a++) {
    for (int64_t b = 0; b < g.kernel_w; b++) {
      int64_t f0 = 0;
      // 8 channels x 2 vectors or 16 x 1: 16 accumulators, which leaves
      // registers for the output gradients and the broadcast input.
      for (; f0 + 2 * L <= row; f0 += 2 * L) {
        Channels<L, 8, 2>(g, x, dy, row, a, b, f0, &squared_norm, grads);
      }
      for (; f0 < row; f0 += L) {
        Channels<L, 16, 1>(g, x, dy, row, a, b, f0, &squared_norm, grads);
      }
    }
  }
  return squared_norm;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) inline double ExampleAvx512(
    const ConvGeometry& g, const float* x, const float* dy, float* scratch,
    float* grads) {
  return Example<16>(g, x, dy, scratch, grads);
}
__attribute__((target("avx2,fma"))) inline double ExampleAvx2(
    const ConvGeometry& g, const float* x, const float* dy, float* scratch,
    float* grads) {
  return Example<8>(g, x, dy, scratch, grads);
}
#endif

}  // namespace conv_grads_internal

// The widest vectors this CPU runs (16, 8 or 4 floats), at most `cap`
// unless it is 0.
inline int ConvGradsVectorWidth(int64_t cap) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int widest = __builtin_cpu_supports("avx512f") ? 16
                            : (__builtin_cpu_supports("avx2") &&
                               __builtin_cpu_supports("fma"))
                                ? 8
                                : 4;
#else
  static const int widest = 4;
#endif
  return cap > 0 && cap < widest ? static_cast<int>(cap) : widest;
}

// The geometry of a conv from its attributes, `attributes` = (kernel_h,
// kernel_w, stride_h, stride_w, dilation_h, dilation_w, pad_top,
// pad_left), and the dimensions of x (n, H, W, C) and dy (n, Ho, Wo, F);
// an error message (and `g` unset) where they do not make one. Any
// (Ho, Wo) is safe: reads stay inside x whatever the geometry (positions
// outside it are the padding's zeros), and inside dy.
inline const char* SetConvGeometry(const int64_t attributes[8],
                                   const int64_t x_dims[4],
                                   const int64_t dy_dims[4], ConvGeometry* g) {
  for (int i = 0; i < 8; i++) {
    // Kernel size, strides and dilations at least 1; pads at least 0.
    if (attributes[i] < (i < 6 ? 1 : 0)) {
      return "kernel_size, strides and dilations must be positive, pads not "
             "negative";
    }
  }
  if (x_dims[0] != dy_dims[0]) {
    return "x must be (n, H, W, C) and dy (n, Ho, Wo, F)";
  }
  *g = ConvGeometry{x_dims[1],     x_dims[2],     x_dims[3],     dy_dims[1],
                    dy_dims[2],    dy_dims[3],    attributes[0], attributes[1],
                    attributes[2], attributes[3], attributes[4], attributes[5],
                    attributes[6], attributes[7]};
  return nullptr;
}

// Examples [lo, hi) of x (n, H, W, C) and dy (n, Ho, Wo, F): each one's
// squared norm into `squared_norms`, and its gradients, (filters,
// kernel_h * kernel_w * channels), into `grads` unless it is null.
// `width`: from ConvGradsVectorWidth.
inline void ConvKernelGradsOfExamples(const ConvGeometry& g, int width,
                                      const float* x, const float* dy,
                                      float* squared_norms, float* grads,
                                      int64_t lo, int64_t hi) {
  using namespace conv_grads_internal;
  const int64_t x_size = g.in_h * g.in_w * g.channels;
  const int64_t dy_size = g.out_h * g.out_w * g.filters;
  const int64_t grads_size = g.filters * g.kernel_h * g.kernel_w * g.channels;
  // The output gradients with the filters padded to whole vectors.
  std::vector<float> scratch(g.out_h * g.out_w * ((g.filters + 15) / 16 * 16));
  for (int64_t i = lo; i < hi; i++) {
    const float* xi = x + i * x_size;
    const float* dyi = dy + i * dy_size;
    float* gi = grads == nullptr ? nullptr : grads + i * grads_size;
    double squared_norm;
#if defined(__x86_64__) && defined(__GNUC__)
    if (width >= 16) {
      squared_norm = ExampleAvx512(g, xi, dyi, scratch.data(), gi);
    } else if (width >= 8) {
      squared_norm = ExampleAvx2(g, xi, dyi, scratch.data(), gi);
    } else {
      squared_norm = Example<4>(g, xi, dyi, scratch.data(), gi);
    }
#else
    squared_norm = Example<4>(g, xi, dyi, scratch.data(), gi);
#endif
    squared_norms[i] = static_cast<float>(squared_norm);
  }
}

}  // namespace keras_dp

#endif  // KERAS_DP_CONV_GRADS_H_
