// flash_attn_func's autograd node in C++ (flashjit/native.py builds, loads and calls this module).
//
// A call with grad-requiring inputs whose forward has a launch plan (interface._Plan: the kernel and
// its params packed once for a shape) runs here: the outputs' allocation, the params copy with this
// call's pointers, the launch on torch's current stream, and a C++ autograd node, with no Python frame
// between the call and the kernel. The Python autograd.Function this replaces cost about 13 us a call on
// an H200's host before doing anything (docs/perf-log.md, 2026-12-03). The backward, where the kernels
// run for far longer than their launch, calls back into Python (interface.backward).
// Only the headers used, not torch/extension.h's whole C++ frontend: a quarter less of the one core the build takes
// (sixty-sixth session: its build 59 -> 44 s on a 2-core machine).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/python.h>

#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

using RunFn = int (*)(const void* params, void* stream);  // a kernel library's flashjit_run

// A forward plan: the params bytes with every size, stride and score value in, where a call's five
// pointers go, the library's launch entry point, the outputs' shapes (no lse_shape: no lse).
struct Plan {
  std::string params;
  int64_t at_q, at_k, at_v, at_o, at_lse;  // byte offsets of the pointer fields in params
  RunFn run;
  std::vector<int64_t> out_shape, lse_shape;
};

// A planned launch: its outputs (lse undefined without), or the CUDA error the library returned.
// No c10::Error leaves this module through pybind11: on the H200 machine's torch 2.11 (Python 3.12,
// the extension built by Ubuntu's g++ 13) a TORCH_CHECK thrown out of a binding crashed the process,
// where a pybind11 cast error did not (docs/perf-log.md, 2026-12-04). So a failed launch comes back as
// its number, any other failure (an allocation) as its message (guarded()), and the caller
// (interface._Plan.checked) raises them.
struct Launched {
  at::Tensor out, lse;
  int err = 0;
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

// The planned launch on torch's current stream of the tensors' device.
Launched run_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Plan& plan) {
  const c10::DeviceGuard guard(q.device());  // the tensors' device, not the current one
  Launched launched;
  launched.out = at::empty(plan.out_shape, q.options());
  std::string params = plan.params;
  put_pointer(params, plan.at_q, q.data_ptr());
  put_pointer(params, plan.at_k, k.data_ptr());
  put_pointer(params, plan.at_v, v.data_ptr());
  put_pointer(params, plan.at_o, launched.out.data_ptr());
  if (!plan.lse_shape.empty()) {
    launched.lse = at::empty(plan.lse_shape, q.options().dtype(at::kFloat));
    put_pointer(params, plan.at_lse, launched.lse.data_ptr());
  }
  void* stream = q.is_cuda() ? static_cast<void*>(c10::cuda::getCurrentCUDAStream(q.device().index()).stream())
                             : nullptr;  // a CPU "kernel": tests/test_native_autograd.py
  launched.err = plan.run(params.data(), stream);
  return launched;
}

struct FlashAttn : public torch::autograd::Function<FlashAttn> {
  // The kernel has run (attn(): its failure is returned, not thrown); this records the node.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const Launched* launched, const Flags& flags) {
    const at::Tensor &out = launched->out, &lse = launched->lse;
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
    if (result.size() != 3)  // inside the autograd engine, which raises it (no TORCH_CHECK here: see Launched)
      throw std::runtime_error("flashjit: the backward returned " + std::to_string(result.size()) +
                               " gradients, not 3");
    return {result[0], result[1], result[2], at::Tensor(), at::Tensor()};
  }
};

// f()'s result, or the message of what it threw ("OutOfMemoryError: ..." for an allocation that
// failed), the c10::Error's without its C++ backtrace. A Python exception raised inside (a saved-tensor
// hook's during save_for_backward, as torch.utils.checkpoint's early stop) leaves as itself.
template <class F>
py::object guarded(F f) {
  try {
    return f();
  } catch (py::error_already_set&) {
    throw;
  } catch (python_error& e) {  // torch's carrier of a Python exception: set it again and raise that
    e.restore();
    throw py::error_already_set();
  } catch (const c10::OutOfMemoryError& e) {
    return py::str(std::string("OutOfMemoryError: ") + e.what_without_backtrace());
  } catch (const c10::Error& e) {
    return py::str(std::string("RuntimeError: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    if (PyErr_Occurred()) throw py::error_already_set();  // a Python exception behind a C++ one
    return py::str(std::string("RuntimeError: ") + e.what());
  }
}

// (out, lse) of the planned forward with autograd; the CUDA error (an int) of a failed launch; a
// failure's message (guarded()); or None where this call cannot use the plan (an input not 16-byte
// aligned: the Python path copies; a plan without the lse, which the backward needs).
py::object attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Plan& plan, bool causal,
                py::object softmax_scale, int64_t window_left, int64_t window_right, double softcap,
                bool deterministic) {
  const Flags flags{causal, softmax_scale.is_none() ? std::nan("") : softmax_scale.cast<double>(), window_left,
                    window_right, softcap, deterministic};
  return guarded([&]() -> py::object {
    if (!aligned(q, k, v) || plan.lse_shape.empty()) return py::none();
    const Launched launched = run_plan(q, k, v, plan);
    if (launched.err != 0) return py::int_(launched.err);
    const variable_list result = FlashAttn::apply(q, k, v, &launched, flags);
    return py::make_tuple(result[0], result[1]);
  });
}

// (out, lse or None) of the planned forward without autograd (interface._Plan.launch), the CUDA
// error (an int) of a failed launch, a failure's message, or None for an unaligned input.
py::object launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Plan& plan) {
  return guarded([&]() -> py::object {
    if (!aligned(q, k, v)) return py::none();
    const Launched launched = run_plan(q, k, v, plan);
    if (launched.err != 0) return py::int_(launched.err);
    return py::make_tuple(launched.out, launched.lse.defined() ? py::cast(launched.lse) : py::none());
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashjit's C++ autograd node for planned flash_attn_func calls (flashjit/native.py)";
  py::class_<Plan>(m, "Plan")
      // The offsets are checked by the caller (flashjit/native.py: plan()), which raises: nothing
      // here throws.
      .def(py::init([](py::bytes params, std::array<int64_t, 5> offsets, uintptr_t run, std::vector<int64_t> out_shape,
                       std::vector<int64_t> lse_shape) {
             return Plan{std::string(params), offsets[0], offsets[1], offsets[2], offsets[3], offsets[4],
                         reinterpret_cast<RunFn>(run), std::move(out_shape), std::move(lse_shape)};
           }),
           py::arg("params"), py::arg("offsets"), py::arg("run"), py::arg("out_shape"), py::arg("lse_shape"));
  m.def("set_backward", [](py::object fn) {
    if (backward_fn == nullptr) backward_fn = new py::object();  // outlives the interpreter's teardown
    *backward_fn = std::move(fn);
  });
  m.def("attn", &attn, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("plan"), py::arg("causal"),
        py::arg("softmax_scale"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("deterministic"));
  m.def("launch", &launch, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("plan"));
}
