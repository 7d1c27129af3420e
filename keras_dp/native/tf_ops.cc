// TensorFlow CPU ops around noise.h, with `key` two int32 words (read as
// uint32):
//   KerasDpStandardNormal(key, n) -> z, float32 of shape (n,) (the
//     attribute `secure`, on both noise ops: secure mode's sampler);
//   KerasDpNoisyGradients(key, stddev, grads) -> grads + stddev * z, with z
//     one flat KerasDpStandardNormal draw split over the float32 gradients
//     in order, added as it is made: TensorFlow would run the slices, the
//     scaling and the add as separate passes over memory.
//   KerasDpConvPatches(x, index) -> patches: x float32 (n, P, C) (a conv
//     layer's input, its positions flattened), index int32 (T, K) (the
//     input position each output position's taps read, -1 for the conv's
//     zero padding); patches[i, t, k] = x[i, index[t, k]], or zeros. One
//     pass: TensorFlow would pad the input and then gather.
//   KerasDpConvKernelGrads(x, dy) -> (squared_norms, grads): the per-example
//     kernel gradients of a 2-D convolution (conv_grads.h) from its inputs
//     x (n, H, W, C) and output gradients dy (n, Ho, Wo, F), with the
//     conv's kernel_size, strides, dilations and pads (the zeros before
//     each spatial axis) as attributes; grads (n, F, kernel_h * kernel_w
//     * C) when keep_grads, else (0, F, ...) and only the norms (n,) are
//     computed. The attribute vector_width (tests) caps the vectors' width
//     (16, 8 or 4 floats; 0, the default: the widest the CPU runs).
//     TensorFlow has no per-example filter gradient: it would
//     write the patches and multiply them, or transpose the examples into
//     the channels of one grouped convolution.
//   KerasDpSquaredNorms(x) -> squared_norms: x float32 (n, ...), the sum
//     of squares of each x[i] (n,), in one pass over x: TensorFlow's
//     Square and Sum are two passes, and its Sum is slow on the fast
//     path's many small per-example reductions.
#include <cstdint>
#include <cstring>
#include <vector>

#include "chunks.h"
#include "conv_grads.h"
#include "noise.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace keras_dp {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;

REGISTER_OP("KerasDpStandardNormal")
    .Input("key: int32")
    .Attr("n: int >= 0")
    .Attr("secure: bool = false")
    .Output("z: float")
    .SetShapeFn([](InferenceContext* c) {
      int64_t n;
      TF_RETURN_IF_ERROR(c->GetAttr("n", &n));
      c->set_output(0, c->Vector(n));
      return absl::OkStatus();
    });

REGISTER_OP("KerasDpNoisyGradients")
    .Input("key: int32")
    .Input("stddev: float")
    .Input("grads: N * float")
    .Attr("N: int >= 1")
    .Attr("secure: bool = false")
    .Output("noisy: N * float")
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 2; i < c->num_inputs(); i++) {
        c->set_output(i - 2, c->input(i));
      }
      return absl::OkStatus();
    });

REGISTER_OP("KerasDpSquaredNorms")
    .Input("x: float")
    .Output("squared_norms: float")
    .SetShapeFn([](InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
      c->set_output(0, c->Vector(c->Dim(x, 0)));
      return absl::OkStatus();
    });

REGISTER_OP("KerasDpConvPatches")
    .Input("x: float")
    .Input("index: int32")
    .Output("patches: float")
    .SetShapeFn([](InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle x, index;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &index));
      c->set_output(0, c->MakeShape({c->Dim(x, 0), c->Dim(index, 0),
                                     c->Dim(index, 1), c->Dim(x, 2)}));
      return absl::OkStatus();
    });

REGISTER_OP("KerasDpConvKernelGrads")
    .Input("x: float")
    .Input("dy: float")
    .Attr("kernel_size: list(int)")
    .Attr("strides: list(int)")
    .Attr("dilations: list(int)")
    .Attr("pads: list(int)")
    .Attr("keep_grads: bool")
    .Attr("vector_width: int = 0")
    .Output("squared_norms: float")
    .Output("grads: float")
    .SetShapeFn([](InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle x, dy;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &dy));
      std::vector<int32_t> kernel_size;
      bool keep_grads;
      TF_RETURN_IF_ERROR(c->GetAttr("kernel_size", &kernel_size));
      TF_RETURN_IF_ERROR(c->GetAttr("keep_grads", &keep_grads));
      c->set_output(0, c->Vector(c->Dim(x, 0)));
      ::tensorflow::shape_inference::DimensionHandle columns;
      TF_RETURN_IF_ERROR(c->Multiply(
          c->Dim(x, 3),
          kernel_size.size() == 2 ? kernel_size[0] * kernel_size[1] : 0,
          &columns));
      c->set_output(1, c->MakeShape({keep_grads ? c->Dim(x, 0) : c->MakeDim(0),
                                     c->Dim(dy, 3), columns}));
      return absl::OkStatus();
    });

// The key's two words; false (with the op failed) unless there are two.
bool ReadKey(OpKernelContext* context, uint32_t* key0, uint32_t* key1) {
  const Tensor& key = context->input(0);
  if (key.NumElements() != 2) {
    context->CtxFailure(absl::InvalidArgumentError("the key must have two words"));
    return false;
  }
  *key0 = static_cast<uint32_t>(key.flat<int32_t>()(0));
  *key1 = static_cast<uint32_t>(key.flat<int32_t>()(1));
  return true;
}

// work(lo, hi) over the pairs, on this thread and the op's worker pool.
void RunOnWorkers(OpKernelContext* context, int64_t num_pairs,
                  std::function<void(int64_t, int64_t)> work) {
  auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
  RunChunks(
      num_pairs, kChunkPairs, pool->NumThreads(),
      [pool](std::function<void()> task) { pool->Schedule(std::move(task)); },
      std::move(work));
}

class StandardNormalOp : public OpKernel {
 public:
  explicit StandardNormalOp(OpKernelConstruction* context)
      : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("n", &n_));
    OP_REQUIRES_OK(context, context->GetAttr("secure", &secure_));
  }

  void Compute(OpKernelContext* context) override {
    uint32_t key0, key1;
    if (!ReadKey(context, &key0, &key1)) return;
    Tensor* z = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, TensorShape({n_}), &z));
    float* out = z->flat<float>().data();
    const int64_t n = n_;
    const bool secure = secure_;
    RunOnWorkers(context, kdp_num_units(n, secure),
                 [=](int64_t lo, int64_t hi) {
                   if (secure) {
                     kdp_secure_standard_normal_range(key0, key1, out, n, lo,
                                                      hi);
                   } else {
                     kdp_standard_normal_range(key0, key1, out, n, lo, hi);
                   }
                 });
  }

 private:
  int64_t n_;
  bool secure_;
};

class NoisyGradientsOp : public OpKernel {
 public:
  explicit NoisyGradientsOp(OpKernelConstruction* context)
      : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("secure", &secure_));
  }

  void Compute(OpKernelContext* context) override {
    uint32_t key0, key1;
    if (!ReadKey(context, &key0, &key1)) return;
    const float stddev = context->input(1).scalar<float>()();
    const int num = context->num_inputs() - 2;
    std::vector<int64_t> offsets(num + 1, 0);
    std::vector<const float*> grads(num);
    std::vector<float*> out(num);
    for (int k = 0; k < num; k++) {
      const Tensor& grad = context->input(k + 2);
      Tensor* noisy = nullptr;
      // In place when nothing else holds the gradient's buffer.
      OP_REQUIRES_OK(context, context->forward_input_or_allocate_output(
                                  {k + 2}, k, grad.shape(), &noisy));
      grads[k] = grad.flat<float>().data();
      out[k] = noisy->flat<float>().data();
      offsets[k + 1] = offsets[k] + grad.NumElements();
    }
    const kdp_segments segments{num, offsets.data(), grads.data(), out.data(),
                                stddev};
    const bool secure = secure_;
    RunOnWorkers(context, kdp_num_units(offsets[num], secure),
                 [&segments, key0, key1, secure](int64_t lo, int64_t hi) {
                   if (secure) {
                     kdp_secure_noisy_range(key0, key1, &segments, lo, hi);
                   } else {
                     kdp_noisy_range(key0, key1, &segments, lo, hi);
                   }
                 });
  }

 private:
  bool secure_;
};

class SquaredNormsOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    OP_REQUIRES(context, x.dims() >= 1,
                absl::InvalidArgumentError("x must have a batch axis"));
    const int64_t n = x.dim_size(0);
    const int64_t row = n > 0 ? x.NumElements() / n : 0;
    Tensor* squared_norms = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({n}),
                                                     &squared_norms));
    const float* in = x.flat<float>().data();
    float* out = squared_norms->flat<float>().data();
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers->num_threads, workers->workers, n,
                        /*cost_per_unit=*/row, [=](int64_t lo, int64_t hi) {
                          for (int64_t i = lo; i < hi; i++) {
                            out[i] = SquaredNorm(in + i * row, row);
                          }
                        });
  }

 private:
  // Blocks of 4096 summed in 16 float lanes (which the compiler
  // vectorises), the blocks' sums in double: long rows (a sequence
  // layer's per-example kernel gradient) keep float32's precision.
  static float SquaredNorm(const float* x, int64_t size) {
    constexpr int64_t kLanes = 16, kBlock = 4096;
    double total = 0.0;
    for (int64_t start = 0; start < size; start += kBlock) {
      const int64_t end = start + kBlock < size ? start + kBlock : size;
      float lanes[kLanes] = {0.0f};
      int64_t j = start;
      for (; j + kLanes <= end; j += kLanes) {
        for (int64_t k = 0; k < kLanes; k++) lanes[k] += x[j + k] * x[j + k];
      }
      float block = 0.0f;
      for (; j < end; j++) block += x[j] * x[j];
      for (int64_t k = 0; k < kLanes; k++) block += lanes[k];
      total += block;
    }
    return static_cast<float>(total);
  }
};

class ConvPatchesOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& index = context->input(1);
    OP_REQUIRES(context, x.dims() == 3 && index.dims() == 2,
                absl::InvalidArgumentError(
                    "x must be (n, positions, channels), index (T, K)"));
    const int64_t n = x.dim_size(0), positions = x.dim_size(1),
                  channels = x.dim_size(2);
    const int64_t T = index.dim_size(0), K = index.dim_size(1);
    const int32_t* taps = index.flat<int32_t>().data();
    for (int64_t j = 0; j < T * K; j++) {
      OP_REQUIRES(context, taps[j] >= -1 && taps[j] < positions,
                  absl::InvalidArgumentError("index out of range"));
    }
    Tensor* patches = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                0, TensorShape({n, T, K, channels}), &patches));
    const float* in = x.flat<float>().data();
    float* out = patches->flat<float>().data();
    const size_t row_bytes = channels * sizeof(float);
    // One unit: one output position of one example (K rows of C floats).
    auto copy = [=](int64_t lo, int64_t hi) {
      for (int64_t unit = lo; unit < hi; unit++) {
        const int64_t i = unit / T, t = unit % T;
        const float* example = in + i * positions * channels;
        const int32_t* tap = taps + t * K;
        float* dst = out + unit * K * channels;
        for (int64_t k = 0; k < K; k++, dst += channels) {
          if (tap[k] < 0) {
            std::memset(dst, 0, row_bytes);
          } else {
            std::memcpy(dst, example + tap[k] * channels, row_bytes);
          }
        }
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers->num_threads, workers->workers, n * T,
                        /*cost_per_unit=*/2 * K * channels, copy);
  }
};

class ConvKernelGradsOp : public OpKernel {
 public:
  explicit ConvKernelGradsOp(OpKernelConstruction* context)
      : OpKernel(context) {
    const char* names[4] = {"kernel_size", "strides", "dilations", "pads"};
    for (int k = 0; k < 4; k++) {
      std::vector<int32_t> values;
      OP_REQUIRES_OK(context, context->GetAttr(names[k], &values));
      OP_REQUIRES(context, values.size() == 2,
                  absl::InvalidArgumentError(
                      "kernel_size, strides, dilations and pads need one "
                      "value per spatial axis (2)"));
      attributes_[2 * k] = values[0];
      attributes_[2 * k + 1] = values[1];
    }
    OP_REQUIRES_OK(context, context->GetAttr("keep_grads", &keep_grads_));
    int vector_width;
    OP_REQUIRES_OK(context, context->GetAttr("vector_width", &vector_width));
    width_ = ConvGradsVectorWidth(vector_width);
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& dy = context->input(1);
    OP_REQUIRES(context, x.dims() == 4 && dy.dims() == 4,
                absl::InvalidArgumentError(
                    "x must be (n, H, W, C) and dy (n, Ho, Wo, F)"));
    int64_t x_dims[4], dy_dims[4];
    for (int i = 0; i < 4; i++) {
      x_dims[i] = x.dim_size(i);
      dy_dims[i] = dy.dim_size(i);
    }
    ConvGeometry g;
    const char* error = SetConvGeometry(attributes_, x_dims, dy_dims, &g);
    OP_REQUIRES(context, error == nullptr, absl::InvalidArgumentError(error));
    const int64_t n = x_dims[0];
    const int64_t columns = g.kernel_h * g.kernel_w * g.channels;
    Tensor* squared_norms = nullptr;
    Tensor* grads = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({n}),
                                                     &squared_norms));
    OP_REQUIRES_OK(context,
                   context->allocate_output(
                       1, TensorShape({keep_grads_ ? n : 0, g.filters, columns}),
                       &grads));
    const float* in = x.flat<float>().data();
    const float* out_grads = dy.flat<float>().data();
    float* norms = squared_norms->flat<float>().data();
    float* kernel_grads = keep_grads_ ? grads->flat<float>().data() : nullptr;
    const int width = width_;
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(
        workers->num_threads, workers->workers, n,
        /*cost_per_unit=*/g.out_h * g.out_w * columns * g.filters,
        [&](int64_t lo, int64_t hi) {
          ConvKernelGradsOfExamples(g, width, in, out_grads, norms,
                                    kernel_grads, lo, hi);
        });
  }

 private:
  int64_t attributes_[8];
  bool keep_grads_;
  int width_;
};

REGISTER_KERNEL_BUILDER(
    Name("KerasDpConvKernelGrads").Device(::tensorflow::DEVICE_CPU),
    ConvKernelGradsOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasDpConvPatches").Device(::tensorflow::DEVICE_CPU),
    ConvPatchesOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasDpSquaredNorms").Device(::tensorflow::DEVICE_CPU),
    SquaredNormsOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasDpStandardNormal").Device(::tensorflow::DEVICE_CPU),
    StandardNormalOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasDpNoisyGradients").Device(::tensorflow::DEVICE_CPU),
    NoisyGradientsOp);

}  // namespace
}  // namespace keras_dp
