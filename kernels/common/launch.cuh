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
#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>
// A lookup per launch site until one succeeds (a function-local static of the launcher's instantiation).
#define FLASHJIT_KERNEL(kernel, ...) [] {                                           \
  static std::atomic<const void*> found{nullptr};                                  \
  const void* handle = found.load(std::memory_order_acquire);                      \
  if (handle == nullptr && (handle = ::flashjit::image::kernel_named(#kernel)))    \
    found.store(handle, std::memory_order_release);                                \
  return handle;                                                                   \
}()
#endif

namespace flashjit {

#ifndef __CUDACC__
namespace image {

// The kernels' cubin and the mangled names of its entry kernels (flashjit/launch.py reads them from
// its ELF symbols), copied in by flashjit_set_image before any launch. Loaded with the runtime's
// library API (CUDA 12.0+) at the first launch, which is retried until it succeeds (an out-of-memory
// first load is not final); the runtime then loads the module into each device's context when a
// kernel is first launched there.
struct Loaded {
  std::mutex mutex;
  std::vector<char> cubin;
  std::vector<std::string> names;
  cudaLibrary_t library = nullptr;
  std::vector<std::pair<std::string, const void*>> kernels;  // mangled name, cudaKernel_t
  cudaError_t last_error = cudaErrorInvalidResourceHandle;   // of the last failed lookup: no image yet
};

inline Loaded& loaded() {
  static Loaded image;
  return image;
}

// names: '\n'-separated. A second call (another CompiledKernel of this library) keeps the first image.
inline void set(const char* data, size_t size, const char* names) {
  Loaded& image = loaded();
  const std::lock_guard<std::mutex> lock(image.mutex);
  if (!image.cubin.empty()) return;
  image.cubin.assign(data, data + size);
  for (const char* at = names; *at != '\0';) {
    const char* end = std::strchr(at, '\n');
    if (end == nullptr) end = at + std::strlen(at);
    if (end > at) image.names.emplace_back(at, end);
    at = *end == '\0' ? end : end + 1;
  }
}

inline cudaError_t load(Loaded& image) {  // image.mutex held
  if (image.library != nullptr) return cudaSuccess;
  if (image.cubin.empty()) return cudaErrorInvalidResourceHandle;
  cudaLibrary_t library = nullptr;
  cudaError_t err = cudaLibraryLoadData(&library, image.cubin.data(), nullptr, nullptr, 0, nullptr, nullptr, 0);
  std::vector<std::pair<std::string, const void*>> kernels;
  for (size_t i = 0; err == cudaSuccess && i < image.names.size(); ++i) {
    cudaKernel_t kernel = nullptr;
    err = cudaLibraryGetKernel(&kernel, library, image.names[i].c_str());
    kernels.emplace_back(image.names[i], reinterpret_cast<const void*>(kernel));
  }
  if (err != cudaSuccess) {
    if (library != nullptr) cudaLibraryUnload(library);
    return err;
  }
  image.library = library;
  image.kernels = std::move(kernels);
  return cudaSuccess;
}

// The cubin's kernel whose template is `name` (a TU instantiates each kernel template once, for its
// Config): the Itanium-mangled name holds it as <length><name>I. nullptr if the image does not load or
// holds no such kernel, or more than one; missing() then says which.
inline const void* kernel_named(const char* name) {
  Loaded& image = loaded();
  const std::lock_guard<std::mutex> lock(image.mutex);
  cudaError_t err = load(image);
  const std::string key = std::to_string(std::strlen(name)) + name + "I";
  const void* found = nullptr;
  for (size_t i = 0; err == cudaSuccess && i < image.kernels.size(); ++i) {
    if (image.kernels[i].first.find(key) == std::string::npos) continue;
    if (found != nullptr) err = cudaErrorSymbolNotFound;  // two kernels of that name: refuse both
    found = image.kernels[i].second;
  }
  if (err == cudaSuccess && found == nullptr) err = cudaErrorSymbolNotFound;
  if (err != cudaSuccess) {
    image.last_error = err;
    return nullptr;
  }
  return found;
}

// Why the last lookup found no kernel.
inline cudaError_t missing() {
  Loaded& image = loaded();
  const std::lock_guard<std::mutex> lock(image.mutex);
  return image.last_error;
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
