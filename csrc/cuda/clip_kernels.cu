// fastclip's CUDA kernels: global gradient norm and in-place clipping in one
// cooperative launch. Only CUDA headers here; the glue in
// clip_cuda.cpp turns tensors into TensorDesc and picks the stream.
//
// Fused kernel, one block per co-resident slot (at most kMaxBlocksPerSM/SM):
//   phase 1  blocks walk tiles (grid-stride), 16-byte loads with a scalar head
//            for misaligned starts and a scalar tail; one partial per tile.
//   barrier  cooperative_groups grid sync: its state is per launch and owned
//            by the driver, so no counter to zero, no memset, and concurrent
//            calls on other streams or graph replays cannot share it. (A
//            single block, not launched cooperatively, uses __syncthreads.)
//   reduce   few partials: every block reduces them itself (same code, same
//            order, same bits), so one barrier suffices; many partials: block
//            0 reduces and a second barrier publishes the coefficient. If the
//            fast sum overflowed or underflowed (clip_math.h: needs_rescue),
//            block 0 alone redoes it scaled by max |g| and publishes the
//            coefficient the same way (rare: an exploding set).
//   phase 2  scale in place, tiles in reverse order (the most recently read
//            are the likeliest still in L2); when each block has at most one
//            tile the values loaded in phase 1 are still in registers and
//            are not read again. Nothing is stored when coef == 1.
// Without cooperative launch the same phases run as three ordinary launches.
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
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kVecsPerThread = 4;  // 16-byte loads in flight per thread per tile
constexpr int64_t kTileBytes = int64_t{kThreads} * kVecsPerThread * 16;  // 32 KiB
// Co-resident blocks per SM we ask for: one. A 512-thread block takes a
// quarter of an SM's thread slots and, at the fused kernel's 80 registers a
// thread (ptxas -v, sm_90, no spills), 40K of its 64K registers, so kernels on
// other streams (NCCL, the next layer's backward) keep running beside us; two
// blocks would not fit. Its 32 KiB of loads in flight per SM is about what
// HBM's latency x bandwidth asks (~15 KB per SM on an H100). Not measured
// on a GPU: choose by measurement there (bench/gpu_check.sh).
constexpr int kMaxBlocksPerSM = 1;
// Up to this many partials, each block re-reduces them (<= 32 KiB from L2)
// rather than waiting at a second grid barrier.
constexpr int64_t kRedundantReduceMax = 4096;
static_assert(kChunkElems % (kTileBytes / 2) == 0, "tiles must subdivide a CPU chunk");

// Descriptors travel in the kernel parameter space: a small array for the
// common case (cheap launches), a ~32 KB one (CUDA >= 12.1 allows 32764 bytes
// of parameters), and beyond that a device table filled by upload_kernel.
constexpr int kInlineSmall = 16;
#if CUDART_VERSION >= 12010
constexpr int kInlineLarge = 1000;
#else
constexpr int kInlineLarge = 120;  // 4 KB parameter limit
#endif

template <int Cap>
struct Descs {
  TensorDesc d[Cap];
  __device__ const TensorDesc& operator[](int i) const { return d[i]; }
};
template <>
struct Descs<0> {
  const TensorDesc* d;
  __device__ const TensorDesc& operator[](int i) const { return d[i]; }
};

// Everything but the descriptors: small enough to pass to the fallback's
// single-block reduction kernel on its own.
struct Job {
  int n;
  int64_t num_tiles;
  NormKind kind;
  double p;
  bool clip;
  double max_norm;
  bool float_acc;  // some tensor is accumulated in float: picks needs_rescue's threshold
  void* norm_out;
  DType norm_out_dtype;
  double* partials;   // [num_tiles]
  double* coef_slot;  // coefficient handed from the reducing block to the others
};

template <int Cap>
struct FusedArgs {
  Descs<Cap> descs;
  Job job;
};

template <int Cap>
struct ScaleArgs {
  Descs<Cap> descs;
  int n;
  int64_t num_tiles;
  const void* coef;
  bool coef_double;
};

struct UploadArgs {
  TensorDesc d[kInlineLarge];
  int count;
  TensorDesc* dst;
};

__host__ __device__ constexpr int elem_size(DType t) {
  return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2;
}

// ---- element access: raw 16-byte vectors <-> accumulator type ------------
// Explicit intrinsics only: torch builds with __CUDA_NO_HALF_CONVERSIONS__ etc.

__device__ __forceinline__ unsigned word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ void set_word(uint4& v, int i, unsigned w) {
  if (i == 0) v.x = w; else if (i == 1) v.y = w; else if (i == 2) v.z = w; else v.w = w;
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
  __device__ static float get(const uint4& v, int i) {
    return __bfloat162float(__ushort_as_bfloat16(half_bits(v, i)));
  }
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
    if (descs[mid].first_tile <= tile) lo = mid; else hi = mid - 1;
  }
  const TensorDesc& d = descs[lo];
  const int es = elem_size(d.dtype);
  const int64_t per_tile = kTileBytes / es;
  const int64_t start = (tile - d.first_tile) * per_tile;
  return {static_cast<char*>(d.data) + start * es,
          static_cast<int>(min(per_tile, d.numel - start)), d.dtype};
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

// The partials combined, in fp64 (the sum of |g|^p, or max |g|). L2 loads
// (__ldcg): the partials were written by other blocks of this grid.
__device__ double reduce_partials(const Job& job) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < job.num_tiles; i += kThreads)
    acc = combine(acc, __ldcg(job.partials + i), job.kind);
  return block_reduce(acc, job.kind);
}

__device__ void write_norm(const Job& job, double norm) {
  switch (job.norm_out_dtype) {
    case DType::F64: *static_cast<double*>(job.norm_out) = norm; break;
    case DType::F32: *static_cast<float*>(job.norm_out) = static_cast<float>(norm); break;
    case DType::F16: *static_cast<__half*>(job.norm_out) = __float2half_rn(static_cast<float>(norm)); break;
    default: *static_cast<__nv_bfloat16*>(job.norm_out) = __float2bfloat16_rn(static_cast<float>(norm)); break;
  }
}

// ---- the rescue pass (one block; clip_math.h: needs_rescue) ----------------

// f(acc, x) over the tile's elements this thread owns, x in double. Scalar
// loads: the rescue is rare, simple beats fast here.
template <typename T, typename F>
__device__ double tile_fold(const Tile& t, double acc, const F& f) {
  const T* x = reinterpret_cast<const T*>(t.data);
  for (int i = threadIdx.x; i < t.n; i += kThreads) acc = f(acc, static_cast<double>(Elem<T>::load(x + i)));
  return acc;
}

template <typename D, typename F>
__device__ double fold_all(const D& descs, const Job& job, const F& f) {
  double acc = 0;  // neutral for the sum and for max |x|
  for (int64_t t = 0; t < job.num_tiles; ++t) {
    const Tile tile = locate(descs, job.n, t);
    switch (tile.dtype) {
      case DType::F32: acc = tile_fold<float>(tile, acc, f); break;
      case DType::F64: acc = tile_fold<double>(tile, acc, f); break;
      case DType::F16: acc = tile_fold<__half>(tile, acc, f); break;
      default: acc = tile_fold<__nv_bfloat16>(tile, acc, f); break;
    }
  }
  return acc;
}

// The norm again, by every thread of one block: max |g|, then the sum of
// (|g| / max)^p in double. Same order on every run (bitwise reproducible).
template <typename D>
__device__ double rescued_norm_block(const D& descs, const Job& job, double fast_acc) {
  const NormKind kind = job.kind;
  const double p = job.p;
  const double max_abs = block_reduce(fold_all(descs, job, [](double acc, double x) { return nan_max(acc, fabs(x)); }),
                                      NormKind::Inf);
  if (!(max_abs > 0.0 && max_abs <= 1.7976931348623157e308)) {
    return finish_norm(fast_acc, kind, p);  // all zero, or an inf element: the fast result stands
  }
  const double scaled = fold_all(descs, job, [&](double acc, double x) { return acc + scaled_term(x, max_abs, kind, p); });
  return rescued_norm(max_abs, block_reduce(scaled, kind), kind, p);
}

// The norm from the combined partials, rescued if they left the range.
template <typename D>
__device__ double norm_from(const D& descs, const Job& job, double acc) {
  return needs_rescue(acc, job.kind, job.float_acc) ? rescued_norm_block(descs, job, acc)
                                                    : finish_norm(acc, job.kind, job.p);
}

// ---- phase 1: one partial per tile -----------------------------------------

// Loads the tile's vectors into v (kept by the caller for phase 2) and returns
// the tile's partial.
template <typename T, NormKind K>
__device__ double tile_partial(const Tile& t, double p, uint4 (&v)[kVecsPerThread]) {
  using A = typename Elem<T>::acc;
  constexpr int kPerVec = Elem<T>::kPerVec;
  const Split s = split<T>(t);
  const uint4* vec = reinterpret_cast<const uint4*>(t.data + s.head * sizeof(T));
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k) {
    const int j = threadIdx.x + k * kThreads;
    if (j < s.nvec) v[k] = vec[j];
  }
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
__device__ double tile_partial(const Tile& t, NormKind kind, double p, uint4 (&v)[kVecsPerThread]) {
  switch (kind) {
    case NormKind::L1: return tile_partial<T, NormKind::L1>(t, p, v);
    case NormKind::L2: return tile_partial<T, NormKind::L2>(t, p, v);
    case NormKind::Inf: return tile_partial<T, NormKind::Inf>(t, p, v);
    default: return tile_partial<T, NormKind::P>(t, p, v);
  }
}

__device__ double tile_partial(const Tile& t, NormKind kind, double p, uint4 (&v)[kVecsPerThread]) {
  switch (t.dtype) {
    case DType::F32: return tile_partial<float>(t, kind, p, v);
    case DType::F64: return tile_partial<double>(t, kind, p, v);
    case DType::F16: return tile_partial<__half>(t, kind, p, v);
    default: return tile_partial<__nv_bfloat16>(t, kind, p, v);
  }
}

template <int Cap>
__device__ void phase1(const Descs<Cap>& descs, const Job& job, uint4 (&v)[kVecsPerThread]) {
  for (int64_t t = blockIdx.x; t < job.num_tiles; t += gridDim.x) {
    const double partial = tile_partial(locate(descs, job.n, t), job.kind, job.p, v);
    if (threadIdx.x == 0) job.partials[t] = partial;
  }
}

// ---- phase 2: scale in place -----------------------------------------------

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

// v holds the tile's vectors already when `cached` (loaded by phase 1).
template <typename T>
__device__ void tile_scale(const Tile& t, double coef, bool cached, uint4 (&v)[kVecsPerThread]) {
  constexpr int kPerVec = Elem<T>::kPerVec;
  const Scaler<T> c(coef);
  const Split s = split<T>(t);
  uint4* vec = reinterpret_cast<uint4*>(t.data + s.head * sizeof(T));
  if (!cached) {
#pragma unroll
    for (int k = 0; k < kVecsPerThread; ++k) {
      const int j = threadIdx.x + k * kThreads;
      if (j < s.nvec) v[k] = vec[j];
    }
  }
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

__device__ void tile_scale(const Tile& t, double coef, bool cached, uint4 (&v)[kVecsPerThread]) {
  switch (t.dtype) {
    case DType::F32: return tile_scale<float>(t, coef, cached, v);
    case DType::F64: return tile_scale<double>(t, coef, cached, v);
    case DType::F16: return tile_scale<__half>(t, coef, cached, v);
    default: return tile_scale<__nv_bfloat16>(t, coef, cached, v);
  }
}

// cached: this block's only tile is still in v from phase 1.
template <int Cap>
__device__ void phase2(const Descs<Cap>& descs, int n, int64_t num_tiles, double coef, bool cached,
                       uint4 (&v)[kVecsPerThread]) {
  if (coef == 1.0) return;  // bitwise no-op: skip the stores (NaN != 1 scales, as torch does)
  const int64_t b = blockIdx.x, g = gridDim.x;
  for (int64_t t = b + (num_tiles - 1 - b) / g * g; t >= b; t -= g)
    tile_scale(locate(descs, n, t), coef, cached, v);
}

// ---- kernels -----------------------------------------------------------------

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

template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
fused_kernel(const __grid_constant__ FusedArgs<Cap> a) {
  const Job& job = a.job;
  uint4 v[kVecsPerThread];
  phase1(a.descs, job, v);
  cg::grid_group grid = cg::this_grid();
  grid_barrier(grid);

  const bool redundant = job.num_tiles <= kRedundantReduceMax || gridDim.x == 1;
  const bool reducer = blockIdx.x == 0 || (job.clip && redundant);
  // Block 0 hands the coefficient to the others through coef_slot when it
  // alone reduced, or when the sum needs the (one-block) rescue. Reducers all
  // see the same acc, so they all take the same branch: every block reaches
  // the second barrier, or none does.
  bool publish = !redundant;
  double coef = 1.0;
  if (reducer) {
    const double acc = reduce_partials(job);
    const bool rescue = needs_rescue(acc, job.kind, job.float_acc);
    publish = publish || rescue;
    if (!rescue || blockIdx.x == 0) {
      const double norm = norm_from(a.descs, job, acc);
      coef = clip_coef(job.max_norm, norm);
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        write_norm(job, norm);
        if (publish) *job.coef_slot = coef;
      }
    }
  }
  if (!job.clip) return;
  if (publish) {
    grid_barrier(grid);
    coef = __ldcg(job.coef_slot);
  }
  phase2(a.descs, job.n, job.num_tiles, coef, job.num_tiles <= gridDim.x, v);
}

// Fallback, launch 1 of 3: the partials.
template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
partials_kernel(const __grid_constant__ FusedArgs<Cap> a) {
  uint4 v[kVecsPerThread];
  phase1(a.descs, a.job, v);
}

// Fallback, launch 2 of 3 (one block): norm and coefficient.
template <int Cap>
__global__ void __launch_bounds__(kThreads) finish_kernel(const __grid_constant__ FusedArgs<Cap> a) {
  const Job& job = a.job;
  const double norm = norm_from(a.descs, job, reduce_partials(job));
  if (threadIdx.x == 0) {
    write_norm(job, norm);
    *job.coef_slot = clip_coef(job.max_norm, norm);
  }
}

// The scale_ operator, and launch 3 of 3 of the fallback.
template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
scale_kernel(const __grid_constant__ ScaleArgs<Cap> a) {
  const double coef = a.coef_double ? *static_cast<const double*>(a.coef)
                                    : static_cast<double>(*static_cast<const float*>(a.coef));
  uint4 v[kVecsPerThread];
  phase2(a.descs, a.n, a.num_tiles, coef, false, v);
}

__global__ void upload_kernel(const __grid_constant__ UploadArgs a) {
  for (int i = threadIdx.x; i < a.count; i += blockDim.x) a.dst[i] = a.d[i];
}

// ---- host side -------------------------------------------------------------

size_t round16(size_t b) { return (b + 15) / 16 * 16; }

// Workspace layout: [partials: num_tiles doubles][coef slot][desc table].
size_t partials_bytes(int64_t num_tiles, bool reduce) {
  return reduce ? round16(sizeof(double) * static_cast<size_t>(num_tiles + 1)) : 0;
}

struct DeviceInfo {
  int sms = 0;
  bool coop = false;
  int64_t max_grid = INT_MAX;
  int64_t force_grid = 0;
};

// Knobs, read once per device. FASTCLIP_CUDA_NO_COOP=1 takes the three-launch
// fallback (also the way to capture a graph under MPS, where a cooperative
// launch may be refused only at replay). Test knobs: FASTCLIP_CUDA_MAX_GRID=N
// caps the grid (the tests check that neither changes a single bit of the
// result); FASTCLIP_CUDA_FORCE_GRID=N sets it past the occupancy cap, so a
// cooperative launch is refused (TooLarge) and the fallback path, its
// bookkeeping and the cleared last error can be tested on any GPU.
void apply_knobs(DeviceInfo* info) {
  const char* no_coop = std::getenv("FASTCLIP_CUDA_NO_COOP");
  if (no_coop && no_coop[0] == '1') info->coop = false;
  const char* max_grid = std::getenv("FASTCLIP_CUDA_MAX_GRID");
  if (max_grid && std::atoll(max_grid) > 0) info->max_grid = std::atoll(max_grid);
  const char* force_grid = std::getenv("FASTCLIP_CUDA_FORCE_GRID");
  if (force_grid && std::atoll(force_grid) > 0) info->force_grid = std::atoll(force_grid);
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

// Grid for `kernel`: one block per tile, at most what can be co-resident.
template <typename Kernel>
cudaError_t grid_for(Kernel kernel, int64_t num_tiles, int* grid, bool* coop) {
  int dev = 0;
  DeviceInfo info;
  KernelInfo kinfo;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = device_info(dev, &info);
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

template <int Cap>
cudaError_t norm_and_clip_impl(const TensorDesc* descs, const Job& job, void* table, cudaStream_t stream) {
  FusedArgs<Cap> args;
  fill_descs(&args.descs, descs, job.n, table);
  args.job = job;
  int grid = 0;
  bool coop = false;
  cudaError_t e = grid_for(fused_kernel<Cap>, job.num_tiles, &grid, &coop);
  if (e != cudaSuccess) return e;
  if (grid == 1 || coop) {
    e = launch(fused_kernel<Cap>, grid, grid > 1, stream, args);
    if (e != cudaErrorCooperativeLaunchTooLarge) return e;
    // An MPS or green-context SM limit. Under stream capture this error may
    // only surface at replay: set FASTCLIP_CUDA_NO_COOP=1 to capture there.
    (void)cudaGetLastError();
    remember_coop_refused(reinterpret_cast<const void*>(fused_kernel<Cap>));
  }
  e = grid_for(partials_kernel<Cap>, job.num_tiles, &grid, &coop);
  if (e == cudaSuccess) e = launch(partials_kernel<Cap>, grid, false, stream, args);
  if (e == cudaSuccess) e = launch(finish_kernel<Cap>, 1, false, stream, args);
  if (e != cudaSuccess || !job.clip) return e;
  ScaleArgs<Cap> sargs;
  sargs.descs = args.descs;
  sargs.n = job.n;
  sargs.num_tiles = job.num_tiles;
  sargs.coef = job.coef_slot;
  sargs.coef_double = true;
  e = grid_for(scale_kernel<Cap>, job.num_tiles, &grid, &coop);
  return e == cudaSuccess ? launch(scale_kernel<Cap>, grid, false, stream, sargs) : e;
}

template <int Cap>
cudaError_t scale_impl(const TensorDesc* descs, int n, int64_t num_tiles, const void* coef, bool coef_double,
                       void* table, cudaStream_t stream) {
  ScaleArgs<Cap> args;
  fill_descs(&args.descs, descs, n, table);
  args.n = n;
  args.num_tiles = num_tiles;
  args.coef = coef;
  args.coef_double = coef_double;
  int grid = 0;
  bool coop = false;
  const cudaError_t e = grid_for(scale_kernel<Cap>, num_tiles, &grid, &coop);
  return e == cudaSuccess ? launch(scale_kernel<Cap>, grid, false, stream, args) : e;
}

// Copies descs to the device table in parameter-sized pieces: kernel
// parameters, unlike a host buffer, are captured by value in a CUDA graph, so
// no pinned staging buffer has to outlive the call.
cudaError_t upload(const TensorDesc* descs, int n, void* table, cudaStream_t stream) {
  UploadArgs args;
  for (int begin = 0; begin < n; begin += kInlineLarge) {
    args.count = std::min(kInlineLarge, n - begin);
    std::copy(descs + begin, descs + begin + args.count, args.d);
    args.dst = static_cast<TensorDesc*>(table) + begin;
    const cudaError_t e = launch(upload_kernel, 1, false, stream, args);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

// A failed launch leaves the runtime's last error set, and torch's next
// unrelated kernel check would report it as its own: clear it, and return it.
cudaError_t cleared(cudaError_t e) {
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e;
}

Plan plan(TensorDesc* descs, int n, bool reduce) {
  int64_t tiles = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t per_tile = kTileBytes / elem_size(descs[i].dtype);
    descs[i].first_tile = tiles;
    tiles += (descs[i].numel + per_tile - 1) / per_tile;
  }
  const size_t table = n > kInlineLarge ? sizeof(TensorDesc) * static_cast<size_t>(n) : 0;
  return {tiles, partials_bytes(tiles, reduce) + table};
}

cudaError_t norm_and_clip(const TensorDesc* descs, int n, const Plan& plan, NormKind kind, double p,
                          bool clip, double max_norm, bool float_acc, void* norm_out,
                          DType norm_out_dtype, void* workspace, cudaStream_t stream) {
  double* partials = static_cast<double*>(workspace);
  const Job job{n, plan.num_tiles, kind, p, clip, max_norm, float_acc, norm_out, norm_out_dtype,
                partials, partials + plan.num_tiles};
  if (n <= kInlineSmall) return cleared(norm_and_clip_impl<kInlineSmall>(descs, job, nullptr, stream));
  if (n <= kInlineLarge) return cleared(norm_and_clip_impl<kInlineLarge>(descs, job, nullptr, stream));
  void* table = static_cast<char*>(workspace) + partials_bytes(plan.num_tiles, true);
  const cudaError_t e = upload(descs, n, table, stream);
  return cleared(e == cudaSuccess ? norm_and_clip_impl<0>(descs, job, table, stream) : e);
}

cudaError_t scale(const TensorDesc* descs, int n, const Plan& plan, const void* coef, bool coef_double,
                  void* workspace, cudaStream_t stream) {
  if (n <= kInlineSmall)
    return cleared(scale_impl<kInlineSmall>(descs, n, plan.num_tiles, coef, coef_double, nullptr, stream));
  if (n <= kInlineLarge)
    return cleared(scale_impl<kInlineLarge>(descs, n, plan.num_tiles, coef, coef_double, nullptr, stream));
  const cudaError_t e = upload(descs, n, workspace, stream);
  return cleared(e == cudaSuccess ? scale_impl<0>(descs, n, plan.num_tiles, coef, coef_double, workspace, stream) : e);
}

}  // namespace fastclip::gpu
