// Device and launch helpers shared by fastclip's CUDA kernels files
// (clip_kernels.cu: the fused global-norm clip; norms_kernels.cu: per-tensor
// norms, local clipping and AGC): the tile geometry and 16-byte element
// access, block_reduce, the per-tile partial and in-place scale, the
// descriptor arrays in the parameter space and their upload, and the
// occupancy / cooperative-launch helpers. Anonymous namespace: each kernels
// file gets its own copy (and its own caches). Only CUDA headers: builds with
// plain nvcc.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "clip_kernels.h"

namespace fastclip::gpu {

// Clears the CUDA runtime's last error after a failed launch (clip_kernels.cu).
cudaError_t cleared(cudaError_t e);

namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kVecsPerThread = 4;                                        // 16-byte loads in flight per thread per tile
constexpr int64_t kTileBytes = int64_t{kThreads} * kVecsPerThread * 16;  // 32 KiB
// Co-resident blocks per SM we ask for: one. A 512-thread block takes a
// quarter of an SM's thread slots and, at the fused kernel's 80 registers a
// thread (ptxas -v, sm_90, no spills), 40K of its 64K registers, so kernels on
// other streams (NCCL, the next layer's backward) keep running beside us; two
// blocks would not fit. Its 32 KiB of loads in flight per SM is about what
// HBM's latency x bandwidth asks (~15 KB per SM on an H100). Not measured
// on a GPU: choose by measurement there (bench/gpu_check.sh).
constexpr int kMaxBlocksPerSM = 1;
// Descriptors travel in the kernel parameter space: a small array for the
// common case (cheap launches), a ~32 KB one (CUDA >= 12.1 allows 32764 bytes
// of parameters), and beyond that a device table filled by upload_kernel.
constexpr int kInlineSmall = 16;
#if CUDART_VERSION >= 12010
constexpr int kInlineLarge = 1000;
#else
constexpr int kInlineLarge = 120;  // 4 KB parameter limit
#endif

// Cap descriptors by value, or (Cap 0) a pointer to the device table. Desc:
// TensorDesc, or another kernel's descriptor (adam_kernels.cu).
template <int Cap, typename Desc = TensorDesc>
struct Descs {
  Desc d[Cap];
  __device__ const Desc& operator[](int i) const { return d[i]; }
};
template <typename Desc>
struct Descs<0, Desc> {
  const Desc* d;
  __device__ const Desc& operator[](int i) const { return d[i]; }
};

template <typename Desc, int Count>
struct UploadArgs {
  Desc d[Count];
  int count;
  Desc* dst;
};

// Up to this many partials, each block re-reduces them (<= 32 KiB from L2)
// rather than waiting at a second grid barrier.
constexpr int64_t kRedundantReduceMax = 4096;

__host__ __device__ constexpr int elem_size(DType t) { return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2; }

// ---- element access: raw 16-byte vectors <-> accumulator type ------------
// Explicit intrinsics only: torch builds with __CUDA_NO_HALF_CONVERSIONS__ etc.

__device__ __forceinline__ unsigned word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ void set_word(uint4& v, int i, unsigned w) {
  if (i == 0)
    v.x = w;
  else if (i == 1)
    v.y = w;
  else if (i == 2)
    v.z = w;
  else
    v.w = w;
}
__device__ __forceinline__ unsigned short half_bits(const uint4& v, int i) {
  return static_cast<unsigned short>(word(v, i / 2) >> (16 * (i % 2)));
}
__device__ __forceinline__ void set_half_bits(uint4& v, int i, unsigned short b) {
  const int s = 16 * (i % 2);
  set_word(v, i / 2, (word(v, i / 2) & ~(0xffffu << s)) | (unsigned{b} << s));
}

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using acc = float;
  static constexpr int kPerVec = 4;
  __device__ static float get(const uint4& v, int i) { return __uint_as_float(word(v, i)); }
  __device__ static void put(uint4& v, int i, float x) { set_word(v, i, __float_as_uint(x)); }
  __device__ static float load(const float* p) { return *p; }
  __device__ static void store(float* p, float x) { *p = x; }
};

template <>
struct Elem<double> {
  using acc = double;
  static constexpr int kPerVec = 2;
  __device__ static double get(const uint4& v, int i) {
    return __hiloint2double(static_cast<int>(word(v, 2 * i + 1)), static_cast<int>(word(v, 2 * i)));
  }
  __device__ static void put(uint4& v, int i, double x) {
    set_word(v, 2 * i, static_cast<unsigned>(__double2loint(x)));
    set_word(v, 2 * i + 1, static_cast<unsigned>(__double2hiint(x)));
  }
  __device__ static double load(const double* p) { return *p; }
  __device__ static void store(double* p, double x) { *p = x; }
};

template <>
struct Elem<__half> {
  using acc = float;
  static constexpr int kPerVec = 8;
  __device__ static float get(const uint4& v, int i) { return __half2float(__ushort_as_half(half_bits(v, i))); }
  __device__ static void put(uint4& v, int i, float x) { set_half_bits(v, i, __half_as_ushort(__float2half_rn(x))); }
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static void store(__half* p, float x) { *p = __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  using acc = float;
  static constexpr int kPerVec = 8;
  __device__ static float get(const uint4& v, int i) { return __bfloat162float(__ushort_as_bfloat16(half_bits(v, i))); }
  __device__ static void put(uint4& v, int i, float x) {
    set_half_bits(v, i, __bfloat16_as_ushort(__float2bfloat16_rn(x)));
  }
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

// ---- tiles ---------------------------------------------------------------

struct Tile {
  char* data;  // first element
  int n;       // elements, 1 .. kTileBytes / elem_size
  DType dtype;
};

// The tile's elements as [head scalars][nvec aligned 16-byte vectors][tail
// scalars]; head + tail < 2 vectors' worth, so one scalar per thread covers them.
struct Split {
  int head, nvec, tail;
};

template <typename T>
__device__ __forceinline__ Split split(const Tile& t) {
  constexpr int kPerVec = Elem<T>::kPerVec;
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(t.data) % 16);
  const int head = min(t.n, (16 - misalign) % 16 / static_cast<int>(sizeof(T)));
  const int nvec = (t.n - head) / kPerVec;
  return {head, nvec, t.n - head - nvec * kPerVec};
}

// Index of the element this thread handles as a scalar, or -1.
__device__ __forceinline__ int scalar_index(const Split& s, int per_vec) {
  const int i = threadIdx.x;
  if (i < s.head) return i;
  if (i < s.head + s.tail) return s.head + s.nvec * per_vec + (i - s.head);
  return -1;
}

template <typename D>
__device__ Tile locate(const D& descs, int n, int64_t tile) {
  int lo = 0, hi = n - 1;  // last tensor whose first_tile <= tile (all threads agree)
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (descs[mid].first_tile <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  const TensorDesc& d = descs[lo];
  const int es = elem_size(d.dtype);
  const int64_t per_tile = kTileBytes / es;
  const int64_t start = (tile - d.first_tile) * per_tile;
  return {static_cast<char*>(d.data) + start * es, static_cast<int>(min(per_tile, d.numel - start)), d.dtype};
}

// ---- reductions (fixed shape: the result depends only on the inputs) -------

// Block-wide combine; every thread gets the result. Two __syncthreads, so
// back-to-back calls cannot overwrite scratch another thread still reads.
template <typename A>
__device__ A block_reduce(A x, NormKind kind) {
  __shared__ A scratch[kWarps + 1];
  for (int off = 16; off > 0; off /= 2) x = combine(x, __shfl_down_sync(0xffffffffu, x, off), kind);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? scratch[lane] : A(0);
    for (int off = 16; off > 0; off /= 2) x = combine(x, __shfl_down_sync(0xffffffffu, x, off), kind);
    if (lane == 0) scratch[kWarps] = x;
  }
  __syncthreads();
  return scratch[kWarps];
}

// f(acc, x) over the tile's elements this thread owns, x in double. Scalar
// loads: the rescue is rare, simple beats fast here.
template <typename T, typename F>
__device__ double tile_fold(const Tile& t, double acc, const F& f) {
  const T* x = reinterpret_cast<const T*>(t.data);
  for (int i = threadIdx.x; i < t.n; i += kThreads) acc = f(acc, static_cast<double>(Elem<T>::load(x + i)));
  return acc;
}

// Issues the tile's 16-byte loads into v; its scalar head and tail are loaded where they are
// used. Apart from the arithmetic so that a caller can have the next tile's loads in flight
// while it reduces this one: a barrier does not wait for loads, only a use of their registers.
template <typename T>
__device__ __forceinline__ void load_vectors(const Tile& t, uint4 (&v)[kVecsPerThread]) {
  const Split s = split<T>(t);
  const uint4* vec = reinterpret_cast<const uint4*>(t.data + s.head * sizeof(T));
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k) {
    const int j = threadIdx.x + k * kThreads;
    if (j < s.nvec) v[k] = vec[j];
  }
}

__device__ __forceinline__ void load_vectors(const Tile& t, uint4 (&v)[kVecsPerThread]) {
  switch (t.dtype) {
    case DType::F32: return load_vectors<float>(t, v);
    case DType::F64: return load_vectors<double>(t, v);
    case DType::F16: return load_vectors<__half>(t, v);
    default: return load_vectors<__nv_bfloat16>(t, v);
  }
}

// The tile's partial, from its vectors in v (load_vectors) and its scalar elements.
template <typename T, NormKind K>
__device__ double partial_of(const Tile& t, double p, const uint4 (&v)[kVecsPerThread]) {
  using A = typename Elem<T>::acc;
  constexpr int kPerVec = Elem<T>::kPerVec;
  const Split s = split<T>(t);
  const A pa = static_cast<A>(p);
  A acc = 0;
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k) {
    if (threadIdx.x + k * kThreads < s.nvec) {
#pragma unroll
      for (int e = 0; e < kPerVec; ++e) acc = combine(acc, norm_term<A>(Elem<T>::get(v[k], e), K, pa), K);
    }
  }
  const int i = scalar_index(s, kPerVec);
  if (i >= 0) acc = combine(acc, norm_term<A>(Elem<T>::load(reinterpret_cast<const T*>(t.data) + i), K, pa), K);
  return static_cast<double>(block_reduce(acc, K));
}

template <typename T>
__device__ double partial_of(const Tile& t, NormKind kind, double p, const uint4 (&v)[kVecsPerThread]) {
  switch (kind) {
    case NormKind::L1: return partial_of<T, NormKind::L1>(t, p, v);
    case NormKind::L2: return partial_of<T, NormKind::L2>(t, p, v);
    case NormKind::Inf: return partial_of<T, NormKind::Inf>(t, p, v);
    default: return partial_of<T, NormKind::P>(t, p, v);
  }
}

__device__ double partial_of(const Tile& t, NormKind kind, double p, const uint4 (&v)[kVecsPerThread]) {
  switch (t.dtype) {
    case DType::F32: return partial_of<float>(t, kind, p, v);
    case DType::F64: return partial_of<double>(t, kind, p, v);
    case DType::F16: return partial_of<__half>(t, kind, p, v);
    default: return partial_of<__nv_bfloat16>(t, kind, p, v);
  }
}

// Loads the tile's vectors into v (kept by the caller for phase 2) and returns its partial.
__device__ double tile_partial(const Tile& t, NormKind kind, double p, uint4 (&v)[kVecsPerThread]) {
  load_vectors(t, v);
  return partial_of(t, kind, p, v);
}

// x * coef: in double for fp64, else in float as x * hi * lo (clip_math.h:
// coef_factors; lo is 1 unless the coefficient is below FLT_MIN).
template <typename T>
struct Scaler {
  float hi, lo;
  explicit __device__ Scaler(double coef) {
    const CoefFactors f = coef_factors(coef);
    hi = f.hi;
    lo = f.lo;
  }
  __device__ float operator()(float x) const { return x * hi * lo; }
};
template <>
struct Scaler<double> {
  double c;
  explicit __device__ Scaler(double coef) : c(coef) {}
  __device__ double operator()(double x) const { return x * c; }
};

// Scales the tile in place: its vectors from v (load_vectors), its scalars loaded here.
template <typename T>
__device__ void scale_loaded(const Tile& t, double coef, uint4 (&v)[kVecsPerThread]) {
  constexpr int kPerVec = Elem<T>::kPerVec;
  const Scaler<T> c(coef);
  const Split s = split<T>(t);
  uint4* vec = reinterpret_cast<uint4*>(t.data + s.head * sizeof(T));
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k) {
    const int j = threadIdx.x + k * kThreads;
    if (j < s.nvec) {
#pragma unroll
      for (int e = 0; e < kPerVec; ++e) Elem<T>::put(v[k], e, c(Elem<T>::get(v[k], e)));
      vec[j] = v[k];
    }
  }
  const int i = scalar_index(s, kPerVec);
  if (i >= 0) {
    T* x = reinterpret_cast<T*>(t.data) + i;
    Elem<T>::store(x, c(Elem<T>::load(x)));
  }
}

__device__ void scale_loaded(const Tile& t, double coef, uint4 (&v)[kVecsPerThread]) {
  switch (t.dtype) {
    case DType::F32: return scale_loaded<float>(t, coef, v);
    case DType::F64: return scale_loaded<double>(t, coef, v);
    case DType::F16: return scale_loaded<__half>(t, coef, v);
    default: return scale_loaded<__nv_bfloat16>(t, coef, v);
  }
}

// v holds the tile's vectors already when `cached` (loaded by phase 1).
__device__ void tile_scale(const Tile& t, double coef, bool cached, uint4 (&v)[kVecsPerThread]) {
  if (!cached) load_vectors(t, v);
  scale_loaded(t, coef, v);
}

// A barrier over the whole grid. A single block is launched without the
// cooperative attribute (grid.sync() is not allowed there) and needs only
// __syncthreads: e.g. thread 0's store of the last tile's partial must be
// visible to the thread that reads it in reduce_partials.
__device__ __forceinline__ void grid_barrier(cg::grid_group& grid) {
  if (gridDim.x > 1) {
    grid.sync();
  } else {
    __syncthreads();
  }
}

template <typename Desc, int Count>
__global__ void upload_kernel(const __grid_constant__ UploadArgs<Desc, Count> a) {
  for (int i = threadIdx.x; i < a.count; i += blockDim.x) a.dst[i] = a.d[i];
}

size_t round16(size_t b) { return (b + 15) / 16 * 16; }

// Sets of at most this many bytes (and kSmallMaxTiles tiles) take one ordinary block: no grid
// barrier, no workspace (clip_kernels.cu: small_kernel).
constexpr int64_t kSmallMaxBytes = int64_t{128} << 10;
constexpr int kSmallMaxTiles = 16;

struct DeviceInfo {
  int sms = 0;
  bool coop = false;
  int64_t max_grid = INT_MAX;
  int64_t force_grid = 0;
  int64_t small_max_bytes = kSmallMaxBytes;
  bool fail_launches = false;
};

// Knobs, read once per device. FASTCLIP_CUDA_NO_COOP=1 takes the three-launch
// fallback (also the way to capture a graph under MPS, where a cooperative
// launch may be refused only at replay). Test knobs: FASTCLIP_CUDA_MAX_GRID=N
// caps the grid and FASTCLIP_CUDA_SMALL_BYTES=N moves the one-block
// threshold (0: never; the tests check that neither changes a single bit of
// the result); FASTCLIP_CUDA_FORCE_GRID=N sets the grid past the occupancy
// cap, so a cooperative launch is refused (TooLarge) and the fallback path,
// its bookkeeping and the cleared last error can be tested on any GPU;
// FASTCLIP_CUDA_FAIL_LAUNCHES=1 makes every launch fail as an out-of-resources
// launch would, so the error's way to the user is tested on a GPU.
inline void apply_knobs(DeviceInfo* info) {
  const char* no_coop = std::getenv("FASTCLIP_CUDA_NO_COOP");
  if (no_coop && no_coop[0] == '1') info->coop = false;
  const char* max_grid = std::getenv("FASTCLIP_CUDA_MAX_GRID");
  if (max_grid && std::atoll(max_grid) > 0) info->max_grid = std::atoll(max_grid);
  const char* force_grid = std::getenv("FASTCLIP_CUDA_FORCE_GRID");
  if (force_grid && std::atoll(force_grid) > 0) info->force_grid = std::atoll(force_grid);
  const char* small = std::getenv("FASTCLIP_CUDA_SMALL_BYTES");
  if (small && small[0] != '\0') info->small_max_bytes = std::atoll(small);
  const char* fail = std::getenv("FASTCLIP_CUDA_FAIL_LAUNCHES");
  if (fail && fail[0] == '1') info->fail_launches = true;
}

// Attribute queries cost microseconds; a training step calls us every step.
cudaError_t device_info(int dev, DeviceInfo* out) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it == cache.end()) {
    DeviceInfo info;
    int coop = 0;
    cudaError_t e = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
    if (e != cudaSuccess) return e;
    info.coop = coop != 0;
    apply_knobs(&info);
    it = cache.emplace(dev, info).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// What we know of one kernel on one device: co-resident blocks per SM
// (capped at kMaxBlocksPerSM), and whether a cooperative launch of it was
// refused (cudaErrorCooperativeLaunchTooLarge: MPS or green contexts give us
// fewer SMs than the attribute says). A refusal is remembered so later calls
// go straight to the fallback instead of failing a launch every step.
struct KernelInfo {
  int per_sm = 0;
  bool coop_refused = false;
};

std::mutex kernel_info_mu;
std::map<std::pair<int, const void*>, KernelInfo> kernel_info_cache;

cudaError_t kernel_info(const void* kernel, int dev, KernelInfo* out) {
  std::lock_guard<std::mutex> lock(kernel_info_mu);
  auto it = kernel_info_cache.find({dev, kernel});
  if (it == kernel_info_cache.end()) {
    int n = 0;
    const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0);
    if (e != cudaSuccess) return e;
    if (n == 0) return cudaErrorInvalidConfiguration;  // cannot run at kThreads on this device
    it = kernel_info_cache.emplace(std::make_pair(dev, kernel), KernelInfo{std::min(n, kMaxBlocksPerSM), false}).first;
  }
  *out = it->second;
  return cudaSuccess;
}

void remember_coop_refused(const void* kernel) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return;
  std::lock_guard<std::mutex> lock(kernel_info_mu);
  kernel_info_cache[{dev, kernel}].coop_refused = true;
}

// The current device's info (knobs applied).
cudaError_t current_device_info(DeviceInfo* info) {
  int dev = 0;
  const cudaError_t e = cudaGetDevice(&dev);
  return e == cudaSuccess ? device_info(dev, info) : e;
}

// Grid for `kernel`: one block per tile, at most what can be co-resident.
template <typename Kernel>
cudaError_t grid_for(Kernel kernel, int64_t num_tiles, int* grid, bool* coop) {
  int dev = 0;
  DeviceInfo info;
  KernelInfo kinfo;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = device_info(dev, &info);
  if (e == cudaSuccess && info.fail_launches) e = cudaErrorLaunchOutOfResources;
  if (e == cudaSuccess) e = kernel_info(reinterpret_cast<const void*>(kernel), dev, &kinfo);
  if (e != cudaSuccess) return e;
  const int64_t resident = info.force_grid > 0 ? info.force_grid : int64_t{kinfo.per_sm} * info.sms;
  *grid = static_cast<int>(std::min({num_tiles, resident, info.max_grid}));
  *coop = info.coop && !kinfo.coop_refused;
  return cudaSuccess;
}

template <typename Arg>
cudaError_t launch(void (*kernel)(Arg), int grid, bool cooperative, cudaStream_t stream, const Arg& arg) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = cooperative ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, arg);
}

template <int Cap>
void fill_descs(Descs<Cap>* out, const TensorDesc* descs, int n, void* table) {
  if constexpr (Cap == 0) {
    out->d = static_cast<const TensorDesc*>(table);
  } else {
    std::copy(descs, descs + n, out->d);
  }
}

// Copies descs to the device table in parameter-sized pieces: kernel
// parameters, unlike a host buffer, are captured by value in a CUDA graph, so
// no pinned staging buffer has to outlive the call. Count: descriptors per piece.
template <int Count = kInlineLarge, typename Desc>
cudaError_t upload(const Desc* descs, int n, void* table, cudaStream_t stream) {
  UploadArgs<Desc, Count> args;
  for (int begin = 0; begin < n; begin += Count) {
    args.count = std::min(Count, n - begin);
    std::copy(descs + begin, descs + begin + args.count, args.d);
    args.dst = static_cast<Desc*>(table) + begin;
    const cudaError_t e = launch(upload_kernel<Desc, Count>, 1, false, stream, args);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace fastclip::gpu
