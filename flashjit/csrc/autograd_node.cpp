// flash_attn_func's autograd node in C++ (flashjit/native.py builds, loads and calls this module).
//
// A call with grad-requiring inputs whose forward has a launch plan (interface._Plan: the kernel and
// its params packed once for a shape) runs here: the outputs' allocation, the params copy with this
// call's pointers, the launch on torch's current stream, and a C++ autograd node, with no Python frame
// between the call and the kernel. The Python autograd.Function this replaces cost about 13 us a call on
// an H200's host before doing anything (docs/perf-log.md, 2026-12-03). The backward, where the kernels
// run for far longer than their launch, calls back into Python (interface.backward).
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

using RunFn = int (*)(const void* params, void* stream);  // a kernel library's flashjit_run
using ErrorFn = const char* (*)(int);                      // its flashjit_error_string

// A forward plan: the params bytes with every size, stride and score value in, where a call's five
// pointers go, the library's entry points, the outputs' shapes (no lse_shape: no lse).
struct Plan {
  std::string params;
  int64_t at_q, at_k, at_v, at_o, at_lse;  // byte offsets of the pointer fields in params
  RunFn run;
  ErrorFn error;
  std::vector<int64_t> out_shape, lse_shape;
};

// What the backward is told: interface.backward's arguments besides the tensors.
struct Flags {
  bool causal;
  double softmax_scale;  // NaN: None (the default 1/sqrt(d))
  int64_t window_left, window_right;
  double softcap;
  bool deterministic;
};

py::object* backward_fn = nullptr;  // native.py's: (dout, q, k, v, out, lse, *flags) -> (dq, dk, dv); never freed

void put_pointer(std::string& params, int64_t at, const void* pointer) {
  std::memcpy(&params[static_cast<size_t>(at)], &pointer, sizeof(pointer));
}

bool aligned(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {  // the kernels' vector loads
  const auto address = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); };
  return ((address(q) | address(k) | address(v)) & 15) == 0;
}

// The planned launch on torch's current stream of the tensors' device: (out, lse or undefined).
std::pair<at::Tensor, at::Tensor> run_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const Plan& plan) {
  const c10::DeviceGuard guard(q.device());  // the tensors' device, not the current one
  at::Tensor out = at::empty(plan.out_shape, q.options());
  at::Tensor lse;
  std::string params = plan.params;
  put_pointer(params, plan.at_q, q.data_ptr());
  put_pointer(params, plan.at_k, k.data_ptr());
  put_pointer(params, plan.at_v, v.data_ptr());
  put_pointer(params, plan.at_o, out.data_ptr());
  if (!plan.lse_shape.empty()) {
    lse = at::empty(plan.lse_shape, q.options().dtype(at::kFloat));
    put_pointer(params, plan.at_lse, lse.data_ptr());
  }
  void* stream = q.is_cuda() ? static_cast<void*>(c10::cuda::getCurrentCUDAStream(q.device().index()).stream())
                             : nullptr;  // a CPU "kernel": tests/test_native_autograd.py
  const int err = plan.run(params.data(), stream);
  TORCH_CHECK(err == 0, "flashjit: the forward kernel failed to launch: CUDA error ", err, " (", plan.error(err),
              ")");
  return {out, lse};
}

struct FlashAttn : public torch::autograd::Function<FlashAttn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const Plan* plan, const Flags& flags) {
    TORCH_CHECK(!plan->lse_shape.empty(), "flashjit: the autograd node needs a plan with the lse");
    auto [out, lse] = run_plan(q, k, v, *plan);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = flags.causal;
    ctx->saved_data["softmax_scale"] = flags.softmax_scale;
    ctx->saved_data["window_left"] = flags.window_left;
    ctx->saved_data["window_right"] = flags.window_right;
    ctx->saved_data["softcap"] = flags.softcap;
    ctx->saved_data["deterministic"] = flags.deterministic;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // no zeros for lse's gradient: never read
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const auto& data = ctx->saved_data;
    const double scale = data.at("softmax_scale").toDouble();
    py::gil_scoped_acquire gil;  // the autograd engine's thread holds no GIL
    py::object grads_in = (*backward_fn)(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                         data.at("causal").toBool(), std::isnan(scale) ? py::object(py::none()) : py::object(py::float_(scale)),
                                         data.at("window_left").toInt(), data.at("window_right").toInt(),
                                         data.at("softcap").toDouble(), data.at("deterministic").toBool());
    const auto result = grads_in.cast<std::vector<at::Tensor>>();
    TORCH_CHECK(result.size() == 3, "flashjit: the backward returned ", result.size(), " gradients, not 3");
    return {result[0], result[1], result[2], at::Tensor(), at::Tensor()};
  }
};

// (out, lse) of the planned forward with autograd, or None where this call cannot use the plan (an
// input not 16-byte aligned; the Python path copies).
py::object attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Plan& plan, bool causal,
                py::object softmax_scale, int64_t window_left, int64_t window_right, double softcap,
                bool deterministic) {
  if (!aligned(q, k, v)) return py::none();
  const Flags flags{causal, softmax_scale.is_none() ? std::nan("") : softmax_scale.cast<double>(), window_left,
                    window_right, softcap, deterministic};
  const variable_list result = FlashAttn::apply(q, k, v, &plan, flags);
  return py::make_tuple(result[0], result[1]);
}

// (out, lse or None) of the planned forward without autograd (interface._Plan.launch), or None for an
// unaligned input.
py::object launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Plan& plan) {
  if (!aligned(q, k, v)) return py::none();
  auto [out, lse] = run_plan(q, k, v, plan);
  return py::make_tuple(out, lse.defined() ? py::cast(lse) : py::none());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashjit's C++ autograd node for planned flash_attn_func calls (flashjit/native.py)";
  py::class_<Plan>(m, "Plan")
      .def(py::init([](py::bytes params, std::vector<int64_t> offsets, uintptr_t run, uintptr_t error,
                       std::vector<int64_t> out_shape, std::vector<int64_t> lse_shape) {
             TORCH_CHECK(offsets.size() == 5, "Plan: five pointer offsets (q, k, v, o, lse)");
             Plan plan{std::string(params), offsets[0], offsets[1], offsets[2], offsets[3], offsets[4],
                       reinterpret_cast<RunFn>(run), reinterpret_cast<ErrorFn>(error), std::move(out_shape),
                       std::move(lse_shape)};
             for (const int64_t at : offsets)
               TORCH_CHECK(at >= 0 && static_cast<size_t>(at) + sizeof(void*) <= plan.params.size(),
                           "Plan: a pointer offset outside the params");
             return plan;
           }),
           py::arg("params"), py::arg("offsets"), py::arg("run"), py::arg("error"), py::arg("out_shape"),
           py::arg("lse_shape"));
  m.def("set_backward", [](py::object fn) {
    if (backward_fn == nullptr) backward_fn = new py::object();  // outlives the interpreter's teardown
    *backward_fn = std::move(fn);
  });
  m.def("attn", &attn, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("plan"), py::arg("causal"),
        py::arg("softmax_scale"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("deterministic"));
  m.def("launch", &launch, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("plan"));
}
