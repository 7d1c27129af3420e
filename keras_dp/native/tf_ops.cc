// TensorFlow CPU op around noise.h: KerasDpStandardNormal(key, n) -> z,
// float32 of shape (n,), with `key` two int32 words (read as uint32).
#include <cstdint>

#include "chunks.h"
#include "noise.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

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
    .Output("z: float")
    .SetShapeFn([](InferenceContext* c) {
      int64_t n;
      TF_RETURN_IF_ERROR(c->GetAttr("n", &n));
      c->set_output(0, c->Vector(n));
      return absl::OkStatus();
    });

class StandardNormalOp : public OpKernel {
 public:
  explicit StandardNormalOp(OpKernelConstruction* context)
      : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("n", &n_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& key = context->input(0);
    OP_REQUIRES(context, key.NumElements() == 2,
                absl::InvalidArgumentError("the key must have two words"));
    const uint32_t key0 = static_cast<uint32_t>(key.flat<int32_t>()(0));
    const uint32_t key1 = static_cast<uint32_t>(key.flat<int32_t>()(1));
    Tensor* z = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, TensorShape({n_}), &z));
    float* out = z->flat<float>().data();
    const int64_t n = n_;
    auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
    RunChunks(
        kdp_num_pairs(n), pool->NumThreads(),
        [pool](std::function<void()> task) { pool->Schedule(std::move(task)); },
        [=](int64_t lo, int64_t hi) {
          kdp_standard_normal_range(key0, key1, out, n, lo, hi);
        });
  }

 private:
  int64_t n_;
};

REGISTER_KERNEL_BUILDER(
    Name("KerasDpStandardNormal").Device(::tensorflow::DEVICE_CPU),
    StandardNormalOp);

}  // namespace
}  // namespace keras_dp
