// Launching a family's kernels from code that two compilers read.
//
// A kernel library is built in two halves at once (flashjit/jit.py): nvcc compiles the rendered TU
// to a cubin (device code only), and the host C++ compiler compiles the same TU into the launcher
// library, which loads that cubin (handed over by flashjit/launch.py) through the runtime's library
// API. The host compiler never sees device code: every header keeps it inside `#ifdef __CUDACC__`,
// and a launcher names its kernels with FLASHJIT_KERNEL(kernel, Config), which is the kernel itself
// under nvcc (taking its address instantiates it into the cubin) and, in the launcher, the cubin's
// kernel of that name. nvcc alone never has to parse the host runtime's headers for the launcher,
// which is most of a small kernel's build time (docs/perf-log.md, issue 17).
#pragma once
#include <cstddef>
#include <cuda_runtime_api.h>

// The launcher is built with hidden visibility (flashjit/jit.py: host_flags): each library keeps its
// own image and statics, where default visibility would merge the inline functions' statics of every
// kernel library in the process into one. Only the C ABI is exported.
#define FLASHJIT_EXPORT extern "C" __attribute__((visibility("default")))

#ifdef __CUDACC__
#define FLASHJIT_KERNEL(kernel, ...) reinterpret_cast<const void*>(&kernel<__VA_ARGS__>)
#else
#include <cstdio>
#include <cstring>
#include <vector>
// One lookup per launch site (a function-local static of the launcher's instantiation).
#define FLASHJIT_KERNEL(kernel, ...) [] {                                     \
  static const void* const found = ::flashjit::image::kernel_named(#kernel); \
  return found;                                                              \
}()
#endif

namespace flashjit {

#ifndef __CUDACC__
namespace image {

// The cubin, given by flashjit_set_image before the first launch (the caller keeps the bytes alive),
// loaded on first use: the runtime loads its module into each device's context when a kernel is
// first launched there.
struct Loaded {
  const void* data = nullptr;
  cudaError_t status = cudaSuccess;
  std::vector<std::pair<const char*, const void*>> kernels;  // mangled name, cudaKernel_t
};

inline Loaded& loaded() {
  static Loaded image;
  return image;
}

inline void set(const void* data) { loaded().data = data; }

inline cudaError_t load() {
  static const cudaError_t status = [] {  // once, thread-safe (a static's initialisation)
    Loaded& image = loaded();
    if (image.data == nullptr) return cudaErrorInvalidResourceHandle;
    cudaLibrary_t library = nullptr;
    cudaError_t err = cudaLibraryLoadData(&library, image.data, nullptr, nullptr, 0, nullptr, nullptr, 0);
    unsigned count = 0;
    if (err == cudaSuccess) err = cudaLibraryGetKernelCount(&count, library);
    std::vector<cudaKernel_t> all(count);
    if (err == cudaSuccess && count > 0) err = cudaLibraryEnumerateKernels(all.data(), count, library);
    for (unsigned i = 0; err == cudaSuccess && i < count; ++i) {
      const char* name = nullptr;
      err = cudaFuncGetName(&name, reinterpret_cast<const void*>(all[i]));
      if (err == cudaSuccess) image.kernels.emplace_back(name, reinterpret_cast<const void*>(all[i]));
    }
    return err;
  }();
  return status;
}

// The cubin's kernel whose template is `name` (a TU instantiates each kernel template once, for its
// Config): the Itanium-mangled name holds it as <length><name>I. nullptr if there is none or more
// than one; launch() then reports why.
inline const void* kernel_named(const char* name) {
  if (load() != cudaSuccess) return nullptr;
  char key[128];
  const int n = std::snprintf(key, sizeof key, "%zu%sI", std::strlen(name), name);
  if (n <= 0 || n >= int(sizeof key)) return nullptr;
  const void* found = nullptr;
  for (const auto& [mangled, kernel] : loaded().kernels) {
    if (std::strstr(mangled, key) == nullptr) continue;
    if (found != nullptr) return nullptr;
    found = kernel;
  }
  return found;
}

// Why a kernel is missing: the image's load error, or a name the cubin does not hold once.
inline cudaError_t missing() {
  const cudaError_t err = load();
  return err != cudaSuccess ? err : cudaErrorSymbolNotFound;
}

}  // namespace image
#endif

inline cudaError_t missing_kernel() {
#ifdef __CUDACC__
  return cudaErrorInvalidDeviceFunction;
#else
  return image::missing();
#endif
}

// kernel<<<grid, block, smem_bytes, stream>>>(arg) for a FLASHJIT_KERNEL handle; its launch error.
template <class Arg>
cudaError_t launch_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          const Arg& arg) {
  if (kernel == nullptr) return missing_kernel();
  void* args[] = {const_cast<Arg*>(&arg)};
  return cudaLaunchKernel(kernel, grid, block, args, smem_bytes, stream);
}

// The opt-in a kernel needs above 48 KiB of dynamic shared memory. With `done` (per device, set here)
// once per device, a driver call kept off the per-launch path; devices past the 64th opt in every time.
inline cudaError_t opt_in_smem(const void* kernel, int bytes, bool (*done)[64] = nullptr) {
  if (kernel == nullptr) return missing_kernel();
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  if (done != nullptr) {
    const cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess || (device < 64 && (*done)[device])) return err;
  }
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && done != nullptr && device < 64) (*done)[device] = true;
  return err;
}

}  // namespace flashjit
