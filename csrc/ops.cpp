// The arcana op library: every schema in one place, and the Python module whose import registers them.
//
// `import csrc` loads this shared library (csrc/arcana_kernels*.so); its static initializers run the
// TORCH_LIBRARY blocks below and the TORCH_LIBRARY_IMPL(arcana, CUDA, ...) block of each .cu file, and
// torch.ops.arcana.* exist from then on. The module itself is empty: the ops are called through torch.ops, and
// csrc/__init__.py adds their Python half (fake implementations for torch.compile, autograd).
//
// Conventions: rows are the last dimension of a contiguous tensor; every op computes in fp32 and accepts
// float32, bfloat16 and float16; mean/rstd are fp32; see the .cu file of each op for the kernels. Two test-only
// switches act on every op: _set_poison and _set_variant (the plain kernels, for telling a fast-path bug from a
// binding or layout one on a GPU).

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

namespace arcana {
namespace {

std::atomic<bool> g_poison{false};
std::atomic<int> g_variant{1};

void set_poison(bool enabled) { g_poison = enabled; }

void set_variant(int64_t variant) {
  TORCH_CHECK(variant >= 0 && variant <= 2, "arcana::_set_variant: variant must be 0 (plain kernels), 1 (fast "
              "kernels) or 2 (fast kernels, cross-entropy rows re-read from L2), got ", variant);
  g_variant = static_cast<int>(variant);
}

// The CPU kernel of every op: the kernels run on CUDA tensors only, and without this a CPU call stops in the
// dispatcher with "Could not run 'arcana::...' with arguments from the 'CPU' backend". This names the argument
// and the way out.
void cpu_tensor_error(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto values = torch::jit::last(*stack, args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    if (values[i].isTensor() && !values[i].toTensor().is_cuda()) {
      TORCH_CHECK(false, op.schema().name(), ": ", args[i].name(), " must be a CUDA tensor, got ",
                  values[i].toTensor().device(), "; move it with .cuda() or use --kernels torch");
    }
  }
  TORCH_CHECK(false, op.schema().name(), ": the arcana kernels run on CUDA tensors only; move the inputs with "
              ".cuda() or use --kernels torch");
}

// The ops of the namespace that are declared now (Python code may add its own with torch.library before this
// library loads). Only names with a schema count: the TORCH_LIBRARY_IMPL blocks of the .cu files, whose static
// initializers run first when their objects come first at link time, leave schema-less entries for their ops.
std::vector<std::string> arcana_op_names() {
  std::vector<std::string> names;
  for (const c10::OperatorName& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind("arcana::", 0) == 0 && c10::Dispatcher::singleton().findSchema(op).has_value()) {
      names.push_back(op.name.substr(8));
    }
  }
  return names;
}

// The ops TORCH_LIBRARY below declares, but those whose names start with "_" (no tensor arguments). Not a
// function-local static: in the CPU emulation of the kernels those of namespace arcana are shared memory.
std::vector<std::string> declared_ops;

}  // namespace

bool poison_enabled() { return g_poison.load(std::memory_order_relaxed); }
int kernel_variant() { return g_variant.load(std::memory_order_relaxed); }

}  // namespace arcana

TORCH_LIBRARY(arcana, m) {
  const std::vector<std::string> before = arcana::arcana_op_names();

  // LayerNorm over the last dimension (layernorm.cu). out has out_dtype, by default x's (any kernel dtype when x
  // is float32: under autocast, the matmul's, so no cast runs before the next Linear); weight and bias are (C,) of
  // any float dtype; mean and rstd are fp32 with x's shape minus the last dimension.
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps, ScalarType? out_dtype=None)"
        " -> (Tensor out, Tensor mean, Tensor rstd)");
  // r = x + y (the residual stream plus a branch output), out = LayerNorm(r). y has x's dtype, or x is
  // float32 and y any float dtype (bf16 attention/MLP outputs under autocast); r has x's dtype, out as above.
  m.def("add_layer_norm_fwd(Tensor x, Tensor y, Tensor weight, Tensor bias, float eps, ScalarType? out_dtype=None)"
        " -> (Tensor r, Tensor out, Tensor mean, Tensor rstd)");
  // The backward of both: x is the normalized input (r for the fused op), dout has out's dtype, dr (the incoming
  // gradient of r, x's dtype) is added into dx. dweight and dbias have weight's dtype. With dy_dtype, dy is dx
  // rounded to it, written in the same pass: the gradient of the fused op's y when y's dtype is not x's; else
  // dy is an empty (0,) tensor.
  m.def("layer_norm_bwd(Tensor dout, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor? dr=None,"
        " ScalarType? dy_dtype=None) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dy)");

  // GELU, tanh approximation, of x [+ bias] (gelu.cu); bias is (C,) with C = x.size(-1).
  m.def("gelu_fwd(Tensor x, Tensor? bias=None) -> Tensor");
  // dx has x's dtype; dbias is (C,) in bias's dtype, or an empty (0,) float32 tensor without bias.
  m.def("gelu_bwd(Tensor dout, Tensor x, Tensor? bias=None) -> (Tensor dx, Tensor dbias)");

  // causal attention (attention.cu)
  // softmax(Q K^T / sqrt(D), causal) V. qkv is c_attn's output viewed as (B, T, 3, H, D), bf16 or fp16, D 64 or
  // 128, any strides with a contiguous last dimension; out is (B, T, H, D) in qkv's dtype and lse (B, H, T) fp32
  // the log-sum-exp of each row's scaled scores.
  m.def("attention_fwd(Tensor qkv) -> (Tensor out, Tensor lse)");
  // dqkv is (B, T, 3, H, D) contiguous, dQ, dK and dV in the slots of Q, K and V (c_attn's output gradient).
  m.def("attention_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse) -> Tensor");
  // Tests only: the kernels' mma/ldmatrix fragment helpers on x = (X, Y, Z), three 16 x 16 bf16/fp16 matrices;
  // returns (4, 16, 16) fp32: X Y^T, X Z, X^T Z and (X Y^T rounded to x's dtype) Z.
  m.def("attention_selftest(Tensor x) -> Tensor");

  // cross-entropy and its gradient (cross_entropy.cu), for the chunked lm_head loss
  // logits (rows, V) contiguous, targets (rows,) int64 with -1 for rows without a target. losses (rows,) fp32:
  // logsumexp(row) - row[target], 0 where the target is -1, NaN where it is outside [-1, V). dlogits (rows, V) in
  // logits' dtype: (softmax(row) - onehot(target)) * grad_scale, 0 for -1 rows, where grad_scale is a
  // one-element fp32 tensor on the logits' GPU (read by the kernel, no host sync); an empty (0,) tensor when
  // compute_grad is false. dlogits is a new tensor rather than written over logits: an in-place op would need an
  // aliasing schema for one chunk of memory (824 MB at 8192 x 50304 bf16).
  m.def("cross_entropy_fwd_bwd(Tensor logits, Tensor targets, Tensor grad_scale, bool compute_grad)"
        " -> (Tensor losses, Tensor dlogits)");

  // Tests only: while enabled, every output and scratch buffer is filled with NaN before the kernels run, so
  // an element a kernel forgets to write shows up.
  m.def("_set_poison(bool enabled) -> ()", &arcana::set_poison);
  // Tests and benchmarks only: the kernels every op runs from now on (0 plain, 1 fast, 2 fast with cross-entropy
  // rows re-read from L2); see kernel_variant() in common.cuh.
  m.def("_set_variant(int variant) -> ()", &arcana::set_variant);

  for (const std::string& name : arcana::arcana_op_names()) {
    if (name[0] != '_' && std::find(before.begin(), before.end(), name) == before.end()) {
      arcana::declared_ops.push_back(name);
    }
  }
}

// Every op declared above gets the CPU kernel with the clear error, so a new op needs only its m.def line.
// This block runs after TORCH_LIBRARY above (the static initializers of one file run in order). Not in the
// emulated library (tests/emu_ops.cpp), whose CPU kernels are the emulated ones.
#ifndef ARCANA_EMULATE_OPS
TORCH_LIBRARY_IMPL(arcana, CPU, m) {
  for (const std::string& name : arcana::declared_ops) {
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&arcana::cpu_tensor_error>());
  }
}
#endif

// The Python module: empty, importing it is what registers the ops.
PyMODINIT_FUNC PyInit_arcana_kernels(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "arcana_kernels",
      "ArcanaGPT's CUDA kernels; loading this module declares torch.ops.arcana.* (see csrc/ops.cpp).",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
