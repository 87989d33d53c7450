// fastclip's CUDA kernels: global gradient norm and in-place clipping in one
// cooperative launch. Only CUDA headers here; the glue in
// clip_cuda.cpp turns tensors into TensorDesc and picks the stream.
//
// Fused kernel, one block per co-resident slot (at most kMaxBlocksPerSM/SM):
//   phase 1  blocks walk tiles (grid-stride), 16-byte loads with a scalar head
//            for misaligned starts and a scalar tail; one partial per tile. The
//            next tile's loads are issued before this tile is reduced, so the
//            reduction's barriers do not leave the memory system idle.
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
//            are the likeliest still in L2), two tiles' loads in flight; when
//            each block has at most one tile the values loaded in phase 1 are
//            still in registers and are not read again. Nothing is stored when
//            coef == 1.
// Small sets (kSmallMaxBytes) take small_kernel: one ordinary block, the same
// phases with the partials in shared memory: no barrier across blocks, no
// workspace, and the cheaper launch. Without cooperative launch the phases of
// a larger set run as three ordinary launches. Every path computes the same
// partials and combines them in the same order: the same bits.
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
#include "tiles.cuh"

namespace fastclip::gpu {
namespace {

static_assert(kChunkElems % (kTileBytes / 2) == 0, "tiles must subdivide a CPU chunk");

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

// The partials combined, in fp64 (the sum of |g|^p, or max |g|). Global
// partials are read from L2 (__ldcg): other blocks of this grid wrote them.
template <bool kShared = false>
__device__ double reduce_partials(const Job& job, const double* partials) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < job.num_tiles; i += kThreads)
    acc = combine(acc, kShared ? partials[i] : __ldcg(partials + i), job.kind);
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
  const double max_abs =
      block_reduce(fold_all(descs, job, [](double acc, double x) { return nan_max(acc, fabs(x)); }), NormKind::Inf);
  if (!(max_abs > 0.0 && max_abs <= 1.7976931348623157e308)) {
    return finish_norm(fast_acc, kind, p);  // all zero, or an inf element: the fast result stands
  }
  const double scaled =
      fold_all(descs, job, [&](double acc, double x) { return acc + scaled_term(x, max_abs, kind, p); });
  return rescued_norm(max_abs, block_reduce(scaled, kind), kind, p);
}

// The norm from the combined partials, rescued if they left the range.
template <typename D>
__device__ double norm_from(const D& descs, const Job& job, double acc) {
  return needs_rescue(acc, job.kind, job.float_acc) ? rescued_norm_block(descs, job, acc)
                                                    : finish_norm(acc, job.kind, job.p);
}

// ---- phase 1: one partial per tile -----------------------------------------

// Partials of this block's tiles (grid-stride) into partials[]. On return v
// holds the vectors of the block's last tile.
template <int Cap>
__device__ void phase1(const Descs<Cap>& descs, const Job& job, double* partials, uint4 (&v)[kVecsPerThread]) {
  int64_t t = blockIdx.x;
  if (t >= job.num_tiles) return;
  Tile tile = locate(descs, job.n, t);
  load_vectors(tile, v);
  for (;;) {
    const int64_t next = t + gridDim.x;
    Tile next_tile{};
    uint4 w[kVecsPerThread];
    if (next < job.num_tiles) {
      next_tile = locate(descs, job.n, next);
      load_vectors(next_tile, w);  // in flight while this tile is reduced
    }
    const double partial = partial_of(tile, job.kind, job.p, v);
    if (threadIdx.x == 0) partials[t] = partial;
    if (next >= job.num_tiles) return;
    t = next;
    tile = next_tile;
#pragma unroll
    for (int k = 0; k < kVecsPerThread; ++k) v[k] = w[k];
  }
}

// ---- phase 2: scale in place -----------------------------------------------

// cached: this block's only tile is still in v from phase 1.
template <int Cap>
__device__ void phase2(const Descs<Cap>& descs, int n, int64_t num_tiles, double coef, bool cached,
                       uint4 (&v)[kVecsPerThread]) {
  if (coef == 1.0) return;  // bitwise no-op: skip the stores (NaN != 1 scales, as torch does)
  const int64_t b = blockIdx.x, g = gridDim.x;
  if (cached) {
    if (b < num_tiles) tile_scale(locate(descs, n, b), coef, true, v);
    return;
  }
  // This block's tiles from the last down, two at a time: both tiles' loads are issued first.
  for (int64_t t = b + (num_tiles - 1 - b) / g * g; t >= b; t -= 2 * g) {
    const Tile first = locate(descs, n, t);
    load_vectors(first, v);
    if (t - g >= b) {
      const Tile second = locate(descs, n, t - g);
      uint4 w[kVecsPerThread];
      load_vectors(second, w);
      scale_loaded(first, coef, v);
      scale_loaded(second, coef, w);
    } else {
      scale_loaded(first, coef, v);
    }
  }
}

// ---- kernels -----------------------------------------------------------------

template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM) fused_kernel(const __grid_constant__ FusedArgs<Cap> a) {
  const Job& job = a.job;
  uint4 v[kVecsPerThread];
  phase1(a.descs, job, job.partials, v);
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
    const double acc = reduce_partials(job, job.partials);
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

// Small sets: the whole job in one ordinary block, the partials in shared
// memory. Same partials, same reduction order as fused_kernel.
template <int Cap>
__global__ void __launch_bounds__(kThreads) small_kernel(const __grid_constant__ FusedArgs<Cap> a) {
  __shared__ double partials[kSmallMaxTiles];
  const Job& job = a.job;
  uint4 v[kVecsPerThread];
  phase1(a.descs, job, partials, v);
  __syncthreads();  // thread 0 wrote the partials every thread reads
  const double norm = norm_from(a.descs, job, reduce_partials<true>(job, partials));
  if (threadIdx.x == 0) write_norm(job, norm);
  if (job.clip) phase2(a.descs, job.n, job.num_tiles, clip_coef(job.max_norm, norm), job.num_tiles == 1, v);
}

// Fallback, launch 1 of 3: the partials.
template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM) partials_kernel(const __grid_constant__ FusedArgs<Cap> a) {
  uint4 v[kVecsPerThread];
  phase1(a.descs, a.job, a.job.partials, v);
}

// Fallback, launch 2 of 3 (one block): norm and coefficient.
template <int Cap>
__global__ void __launch_bounds__(kThreads) finish_kernel(const __grid_constant__ FusedArgs<Cap> a) {
  const Job& job = a.job;
  const double norm = norm_from(a.descs, job, reduce_partials(job, job.partials));
  if (threadIdx.x == 0) {
    write_norm(job, norm);
    *job.coef_slot = clip_coef(job.max_norm, norm);
  }
}

// The scale_ operator, and launch 3 of 3 of the fallback.
template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM) scale_kernel(const __grid_constant__ ScaleArgs<Cap> a) {
  const double coef =
      a.coef_double ? *static_cast<const double*>(a.coef) : static_cast<double>(*static_cast<const float*>(a.coef));
  uint4 v[kVecsPerThread];
  phase2(a.descs, a.n, a.num_tiles, coef, false, v);
}

// ---- host side -------------------------------------------------------------

// Workspace layout: [partials: num_tiles doubles][coef slot][desc table].
size_t partials_bytes(int64_t num_tiles, bool reduce) {
  return reduce ? round16(sizeof(double) * static_cast<size_t>(num_tiles + 1)) : 0;
}

template <int Cap>
cudaError_t norm_and_clip_impl(const TensorDesc* descs, const Job& job, void* table, cudaStream_t stream) {
  FusedArgs<Cap> args;
  fill_descs(&args.descs, descs, job.n, table);
  args.job = job;
  int grid = 0;
  bool coop = false;
  if (job.partials == nullptr) {  // a small set (plan(): no workspace)
    const cudaError_t e = grid_for(small_kernel<Cap>, 1, &grid, &coop);
    return e == cudaSuccess ? launch(small_kernel<Cap>, 1, false, stream, args) : e;
  }
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

}  // namespace

// A failed launch leaves the runtime's last error set, and torch's next
// unrelated kernel check would report it as its own: clear it, and return it.
cudaError_t cleared(cudaError_t e) {
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e;
}

Plan plan(TensorDesc* descs, int n, bool reduce) {
  int64_t tiles = 0, bytes = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t per_tile = kTileBytes / elem_size(descs[i].dtype);
    descs[i].first_tile = tiles;
    tiles += (descs[i].numel + per_tile - 1) / per_tile;
    bytes += descs[i].numel * elem_size(descs[i].dtype);
  }
  DeviceInfo info;
  const bool small = reduce && n <= kInlineSmall && tiles <= kSmallMaxTiles &&
                     current_device_info(&info) == cudaSuccess && bytes <= info.small_max_bytes;
  const size_t table = n > kInlineLarge ? sizeof(TensorDesc) * static_cast<size_t>(n) : 0;
  return {tiles, small ? 0 : partials_bytes(tiles, reduce) + table};
}

cudaError_t norm_and_clip(const TensorDesc* descs, int n, const Plan& plan, NormKind kind, double p, bool clip,
                          double max_norm, bool float_acc, void* norm_out, DType norm_out_dtype, void* workspace,
                          cudaStream_t stream) {
  // No workspace: a small set, whose partials live in the kernel's shared memory.
  double* partials = plan.workspace_bytes == 0 ? nullptr : static_cast<double*>(workspace);
  double* coef_slot = partials == nullptr ? nullptr : partials + plan.num_tiles;
  const Job job{n, plan.num_tiles, kind, p, clip, max_norm, float_acc, norm_out, norm_out_dtype, partials, coef_slot};
  if (n <= kInlineSmall) return cleared(norm_and_clip_impl<kInlineSmall>(descs, job, nullptr, stream));
  if (n <= kInlineLarge) return cleared(norm_and_clip_impl<kInlineLarge>(descs, job, nullptr, stream));
  void* table = static_cast<char*>(workspace) + partials_bytes(plan.num_tiles, true);
  const cudaError_t e = upload(descs, n, table, stream);
  return cleared(e == cudaSuccess ? norm_and_clip_impl<0>(descs, job, table, stream) : e);
}

cudaError_t scale(const TensorDesc* descs, int n, const Plan& plan, const void* coef, bool coef_double, void* workspace,
                  cudaStream_t stream) {
  if (n <= kInlineSmall)
    return cleared(scale_impl<kInlineSmall>(descs, n, plan.num_tiles, coef, coef_double, nullptr, stream));
  if (n <= kInlineLarge)
    return cleared(scale_impl<kInlineLarge>(descs, n, plan.num_tiles, coef, coef_double, nullptr, stream));
  const cudaError_t e = upload(descs, n, workspace, stream);
  return cleared(e == cudaSuccess ? scale_impl<0>(descs, n, plan.num_tiles, coef, coef_double, workspace, stream) : e);
}

}  // namespace fastclip::gpu
