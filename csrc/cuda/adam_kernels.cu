// The CUDA kernel of fastclip::adam_step_: global gradient norm, then
// Adam/AdamW's update with the clip coefficient applied as each grad is read,
// in one cooperative launch. Only CUDA headers here; the glue is adam_cuda.cpp.
//
// fused_adam_kernel, one block per co-resident slot, as clip_kernels.cu's
// fused_kernel (whose structure it follows, with tiles.cuh's helpers):
//   phase 0  block 0 reads each param's step, writes step + 1 back and the
//            param's scalars of this step (adam_math.h: adam_scalars) to the
//            workspace. No other block reads a step tensor, so there is no
//            race; the grid barrier publishes the scalars.
//   phase 1  blocks walk the grads' tiles (grid-stride): one partial per tile.
//   barrier  cooperative_groups grid sync.
//   reduce   the partials in tile order, by every block when they are few,
//            else by block 0 and a second barrier publishes the coefficient
//            (and always so when the fast sum needs the one-block rescue):
//            the norm fastclip's clip computes, bitwise.
//   phase 2  blocks walk the tiles again: grad, param and moments loaded
//            (16-byte vectors when all are aligned), updated, stored.
// GradScaler's found_inf skips phases 0 and 2 (the norm is still written).
// Small sets take small_adam_kernel: one ordinary block, partials and scalars
// in shared memory, no barrier across blocks. Without cooperative launch the
// phases run as three ordinary launches. Nothing is read back to the host.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "adam_kernels.h"
#include "tiles.cuh"

namespace fastclip::gpu {
namespace {

// Descriptors in the kernel parameter space (an AdamTensorDesc is 128 bytes):
// a small array for small models, one of ~25 KB, then a device table.
constexpr int kAdamInlineSmall = 16;
#if CUDART_VERSION >= 12010
constexpr int kAdamInlineLarge = 200;
#else
constexpr int kAdamInlineLarge = 24;  // 4 KB parameter limit
#endif

template <int Cap>
using AdamDescs = Descs<Cap, AdamTensorDesc>;

// The launch's device scratch (none for the small kernel).
struct Work {
  int n;
  int64_t num_tiles;
  double* partials;      // [num_tiles]
  double* factor_slot;   // the grad factor, from the reducing block to the others
  AdamScalars* scalars;  // [n]
};

template <int Cap>
struct AdamArgs {
  AdamDescs<Cap> t;
  AdamJob job;
  Work w;
};

// ---- where a tile is -------------------------------------------------------------

struct Place {
  int index;      // the param
  int64_t start;  // its first element in the tile
  int n;          // elements in the tile
};

// Tile `tile` of the grads: in the last param whose first_tile <= tile (a zero-size
// param owns no tile, so the next one, with the same first_tile, is taken).
template <typename D>
__device__ Place place(const D& t, int n, int64_t tile) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t[mid].grad.first_tile <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  const TensorDesc& g = t[lo].grad;
  const int64_t per_tile = kTileBytes / elem_size(g.dtype);
  const int64_t start = (tile - g.first_tile) * per_tile;
  return {lo, start, static_cast<int>(min(per_tile, g.numel - start))};
}

__device__ Tile grad_tile(const TensorDesc& g, const Place& pl) {
  return {static_cast<char*>(g.data) + pl.start * elem_size(g.dtype), pl.n, g.dtype};
}

__device__ bool skipped(const AdamJob& job) { return job.found_inf ? *job.found_inf != 0.0f : job.skip_value; }

__device__ double grad_scale(const AdamJob& job) {
  return job.grad_scale ? static_cast<double>(*job.grad_scale) : job.grad_scale_value;
}

// ---- phase 0: the steps and each param's scalars -----------------------------------

template <typename D>
__device__ void prepare(const D& t, const AdamJob& job, int n, AdamScalars* scalars) {
  const bool skip = skipped(job);
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const AdamTensorDesc& d = t[i];
    const double step = static_cast<double>(*d.step) + 1.0;
    AdamHyper h = d.hyper;
    if (d.lr != nullptr) {
      h.lr = d.lr_double ? *static_cast<const double*>(d.lr) : static_cast<double>(*static_cast<const float*>(d.lr));
    }
    scalars[i] = adam_scalars(h, step, job.flags.decoupled);
    if (!skip) *d.step = static_cast<float>(step);
  }
}

// ---- phase 1 and the norm -------------------------------------------------------------

template <typename D>
__device__ void norm_partials(const D& t, const Work& w, const AdamJob& job, double* partials) {
  uint4 v[kVecsPerThread];
  for (int64_t tile = blockIdx.x; tile < w.num_tiles; tile += gridDim.x) {
    const Place pl = place(t, w.n, tile);
    const double partial = tile_partial(grad_tile(t[pl.index].grad, pl), job.kind, job.p, v);
    if (threadIdx.x == 0) partials[tile] = partial;
  }
}

// The partials combined in tile order (global ones read from L2: other blocks wrote them).
template <bool kShared>
__device__ double reduce_partials(const double* partials, int64_t num_tiles, NormKind kind) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < num_tiles; i += kThreads)
    acc = combine(acc, kShared ? partials[i] : __ldcg(partials + i), kind);
  return block_reduce(acc, kind);
}

template <typename D, typename F>
__device__ double fold_grads(const D& t, const Work& w, const F& f) {
  double acc = 0;  // neutral for the sum and for max |x|
  for (int64_t tile = 0; tile < w.num_tiles; ++tile) {
    const Place pl = place(t, w.n, tile);
    const Tile g = grad_tile(t[pl.index].grad, pl);
    switch (g.dtype) {
      case DType::F32: acc = tile_fold<float>(g, acc, f); break;
      case DType::F64: acc = tile_fold<double>(g, acc, f); break;
      case DType::F16: acc = tile_fold<__half>(g, acc, f); break;
      default: acc = tile_fold<__nv_bfloat16>(g, acc, f); break;
    }
  }
  return acc;
}

// The norm again by this block alone, when the fast sum left its range: max |g|, then the
// sum of (|g| / max)^p in double (clip_kernels.cu). Rare (an exploding set): out of line,
// so its registers do not crowd the update's.
template <typename D>
__device__ __noinline__ double rescued_norm_block(const D& t, const Work& w, const AdamJob& job, double acc) {
  const double max_abs =
      block_reduce(fold_grads(t, w, [](double a, double x) { return nan_max(a, fabs(x)); }), NormKind::Inf);
  if (!(max_abs > 0.0 && max_abs <= 1.7976931348623157e308)) return finish_norm(acc, job.kind, job.p);
  const NormKind kind = job.kind;
  const double p = job.p;
  const double scaled = fold_grads(t, w, [&](double a, double x) { return a + scaled_term(x, max_abs, kind, p); });
  return rescued_norm(max_abs, block_reduce(scaled, kind), kind, p);
}

template <typename D>
__device__ double norm_from(const D& t, const Work& w, const AdamJob& job, double acc) {
  return needs_rescue(acc, job.kind, job.float_acc) ? rescued_norm_block(t, w, job, acc)
                                                    : finish_norm(acc, job.kind, job.p);
}

__device__ void write_norm(const AdamJob& job, double norm) {
  switch (job.norm_out_dtype) {
    case DType::F64: *static_cast<double*>(job.norm_out) = norm; break;
    case DType::F32: *static_cast<float*>(job.norm_out) = static_cast<float>(norm); break;
    case DType::F16: *static_cast<__half*>(job.norm_out) = __float2half_rn(static_cast<float>(norm)); break;
    default: *static_cast<__nv_bfloat16*>(job.norm_out) = __float2bfloat16_rn(static_cast<float>(norm)); break;
  }
}

// The unscaled norm (written out by thread 0 of block 0) and the factor the grads are
// multiplied by.
template <typename D>
__device__ double norm_and_factor(const D& t, const Work& w, const AdamJob& job, double acc) {
  const double scale = grad_scale(job);
  const double norm = norm_from(t, w, job, acc) / scale;
  if (blockIdx.x == 0 && threadIdx.x == 0) write_norm(job, norm);
  return adam_grad_factor(job.clip, job.max_norm, norm, scale);
}

// ---- phase 2: the update ------------------------------------------------------------------

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Scalars another block wrote in this launch: read from L2.
__device__ AdamScalars load_scalars(const AdamScalars* p, bool shared) {
  if (shared) return *p;
  const double* d = reinterpret_cast<const double*>(p);
  AdamScalars s;
  double* out = reinterpret_cast<double*>(&s);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(AdamScalars) / sizeof(double)); ++i) out[i] = __ldcg(d + i);
  return s;
}

// One tile of one param: grad, param and moments loaded (several 16-byte vectors
// of each first, so their loads are in flight together), updated, stored.
template <typename T>
__device__ void update_tile(const AdamTensorDesc& d, const Place& pl, const AdamScalars& s, double factor,
                            AdamFlags f) {
  using A = typename Elem<T>::acc;
  constexpr int kPerVec = Elem<T>::kPerVec;
  const Scaler<T> scale(factor);
  const T* grad = static_cast<const T*>(d.grad.data) + pl.start;
  T* param = static_cast<T*>(d.param) + pl.start;
  T* m = static_cast<T*>(d.exp_avg) + pl.start;
  T* v = static_cast<T*>(d.exp_avg_sq) + pl.start;
  T* mx = f.amsgrad ? static_cast<T*>(d.max_exp_avg_sq) + pl.start : nullptr;
  int first_scalar = 0;
  if (aligned16(grad) && aligned16(param) && aligned16(m) && aligned16(v) && (!f.amsgrad || aligned16(mx))) {
    const int nvec = pl.n / kPerVec;
    // kBatch vectors of each tensor in flight at a time: all kVecsPerThread would take more
    // than the 128 registers a thread has at kThreads (ptxas -v: spills).
    constexpr int kBatch = 2;
#pragma unroll
    for (int k0 = 0; k0 < kVecsPerThread; k0 += kBatch) {
      uint4 gv[kBatch], pv[kBatch], mv[kBatch], vv[kBatch], xv[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int j = threadIdx.x + (k0 + k) * kThreads;
        if (j < nvec) {
          gv[k] = reinterpret_cast<const uint4*>(grad)[j];
          pv[k] = reinterpret_cast<const uint4*>(param)[j];
          mv[k] = reinterpret_cast<const uint4*>(m)[j];
          vv[k] = reinterpret_cast<const uint4*>(v)[j];
          if (f.amsgrad) xv[k] = reinterpret_cast<const uint4*>(mx)[j];
        }
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int j = threadIdx.x + (k0 + k) * kThreads;
        if (j >= nvec) continue;
#pragma unroll
        for (int e = 0; e < kPerVec; ++e) {
          A p = Elem<T>::get(pv[k], e), mm = Elem<T>::get(mv[k], e), vs = Elem<T>::get(vv[k], e);
          A x = f.amsgrad ? Elem<T>::get(xv[k], e) : A(0);
          adam_element<A>(p, scale(Elem<T>::get(gv[k], e)), mm, vs, &x, s, f);
          Elem<T>::put(pv[k], e, p);
          Elem<T>::put(mv[k], e, mm);
          Elem<T>::put(vv[k], e, vs);
          if (f.amsgrad) Elem<T>::put(xv[k], e, x);
        }
        reinterpret_cast<uint4*>(param)[j] = pv[k];
        reinterpret_cast<uint4*>(m)[j] = mv[k];
        reinterpret_cast<uint4*>(v)[j] = vv[k];
        if (f.amsgrad) reinterpret_cast<uint4*>(mx)[j] = xv[k];
      }
    }
    first_scalar = nvec * kPerVec;
  }
  for (int j = first_scalar + threadIdx.x; j < pl.n; j += kThreads) {
    A p = Elem<T>::load(param + j), mm = Elem<T>::load(m + j), vs = Elem<T>::load(v + j);
    A x = f.amsgrad ? Elem<T>::load(mx + j) : A(0);
    adam_element<A>(p, scale(Elem<T>::load(grad + j)), mm, vs, &x, s, f);
    Elem<T>::store(param + j, p);
    Elem<T>::store(m + j, mm);
    Elem<T>::store(v + j, vs);
    if (f.amsgrad) Elem<T>::store(mx + j, x);
  }
}

template <typename D>
__device__ void update(const D& t, const Work& w, const AdamScalars* scalars, bool scalars_shared, double factor,
                       AdamFlags f) {
  for (int64_t tile = blockIdx.x; tile < w.num_tiles; tile += gridDim.x) {
    const Place pl = place(t, w.n, tile);
    const AdamTensorDesc& d = t[pl.index];
    const AdamScalars s = load_scalars(scalars + pl.index, scalars_shared);
    switch (d.grad.dtype) {
      case DType::F32: update_tile<float>(d, pl, s, factor, f); break;
      case DType::F64: update_tile<double>(d, pl, s, factor, f); break;
      case DType::F16: update_tile<__half>(d, pl, s, factor, f); break;
      default: update_tile<__nv_bfloat16>(d, pl, s, factor, f); break;
    }
  }
}

// ---- kernels ------------------------------------------------------------------------------

template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
    fused_adam_kernel(const __grid_constant__ AdamArgs<Cap> a) {
  const AdamJob& job = a.job;
  const Work& w = a.w;
  if (blockIdx.x == 0) prepare(a.t, job, w.n, w.scalars);
  norm_partials(a.t, w, job, w.partials);
  cg::grid_group grid = cg::this_grid();
  grid_barrier(grid);
  if (skipped(job)) {  // the same in every block: no second barrier, block 0 writes the norm
    if (blockIdx.x == 0) norm_and_factor(a.t, w, job, reduce_partials<false>(w.partials, w.num_tiles, job.kind));
    return;
  }
  // As clip_kernels.cu's fused_kernel: every block reduces few partials itself (same
  // code, same bits); block 0 alone reduces many, or rescues, and publishes.
  const bool redundant = w.num_tiles <= kRedundantReduceMax || gridDim.x == 1;
  bool publish = !redundant;
  double factor = 1.0;
  if (blockIdx.x == 0 || redundant) {
    const double acc = reduce_partials<false>(w.partials, w.num_tiles, job.kind);
    const bool rescue = needs_rescue(acc, job.kind, job.float_acc);
    publish = publish || rescue;
    if (!rescue || blockIdx.x == 0) {
      factor = norm_and_factor(a.t, w, job, acc);
      if (blockIdx.x == 0 && threadIdx.x == 0 && publish) *w.factor_slot = factor;
    }
  }
  if (publish) {
    grid_barrier(grid);
    factor = __ldcg(w.factor_slot);
  }
  update(a.t, w, w.scalars, false, factor, job.flags);
}

// Small sets: the whole job in one ordinary block, partials and scalars in shared memory.
template <int Cap>
__global__ void __launch_bounds__(kThreads) small_adam_kernel(const __grid_constant__ AdamArgs<Cap> a) {
  __shared__ double partials[kSmallMaxTiles];
  __shared__ AdamScalars scalars[Cap];
  const AdamJob& job = a.job;
  const Work& w = a.w;
  prepare(a.t, job, w.n, scalars);
  norm_partials(a.t, w, job, partials);
  __syncthreads();  // thread 0 wrote the partials, other threads the scalars
  const double factor = norm_and_factor(a.t, w, job, reduce_partials<true>(partials, w.num_tiles, job.kind));
  if (!skipped(job)) update(a.t, w, scalars, true, factor, job.flags);
}

// Fallback, launch 1 of 3: scalars, steps and partials.
template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
    adam_partials_kernel(const __grid_constant__ AdamArgs<Cap> a) {
  if (blockIdx.x == 0) prepare(a.t, a.job, a.w.n, a.w.scalars);
  norm_partials(a.t, a.w, a.job, a.w.partials);
}

// Fallback, launch 2 of 3 (one block): the norm and the factor.
template <int Cap>
__global__ void __launch_bounds__(kThreads) adam_finish_kernel(const __grid_constant__ AdamArgs<Cap> a) {
  const double factor =
      norm_and_factor(a.t, a.w, a.job, reduce_partials<false>(a.w.partials, a.w.num_tiles, a.job.kind));
  if (threadIdx.x == 0) *a.w.factor_slot = factor;
}

// Fallback, launch 3 of 3: the update.
template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
    adam_update_kernel(const __grid_constant__ AdamArgs<Cap> a) {
  if (skipped(a.job)) return;
  update(a.t, a.w, a.w.scalars, false, __ldcg(a.w.factor_slot), a.job.flags);
}

// ---- host side ------------------------------------------------------------------------------

// Workspace layout: [partials: num_tiles doubles][factor slot][scalars: n][desc table].
size_t partials_bytes(int64_t num_tiles) { return round16(sizeof(double) * static_cast<size_t>(num_tiles + 1)); }
size_t scalars_bytes(int n) { return round16(sizeof(AdamScalars) * static_cast<size_t>(n)); }

template <int Cap>
cudaError_t adam_impl(const AdamTensorDesc* descs, int n, const Plan& plan, const AdamJob& job, void* workspace,
                      const void* table, cudaStream_t stream) {
  AdamArgs<Cap> args;
  if constexpr (Cap == 0) {
    args.t.d = static_cast<const AdamTensorDesc*>(table);
  } else {
    std::copy(descs, descs + n, args.t.d);
  }
  args.job = job;
  int grid = 0;
  bool coop = false;
  if (plan.workspace_bytes == 0) {  // a small set (adam_plan: no workspace)
    if constexpr (Cap == kAdamInlineSmall) {
      args.w = {n, plan.num_tiles, nullptr, nullptr, nullptr};
      const cudaError_t e = grid_for(small_adam_kernel<Cap>, 1, &grid, &coop);
      return e == cudaSuccess ? launch(small_adam_kernel<Cap>, 1, false, stream, args) : e;
    }
    return cudaErrorInvalidValue;  // adam_plan gives no workspace only to small sets
  }
  auto* partials = static_cast<double*>(workspace);
  auto* scalars = reinterpret_cast<AdamScalars*>(static_cast<char*>(workspace) + partials_bytes(plan.num_tiles));
  args.w = {n, plan.num_tiles, partials, partials + plan.num_tiles, scalars};
  // One block at least: block 0 writes the steps and the scalars even with no tile.
  const int64_t blocks = std::max<int64_t>(plan.num_tiles, 1);
  cudaError_t e = grid_for(fused_adam_kernel<Cap>, blocks, &grid, &coop);
  if (e != cudaSuccess) return e;
  if (grid == 1 || coop) {
    e = launch(fused_adam_kernel<Cap>, grid, grid > 1, stream, args);
    if (e != cudaErrorCooperativeLaunchTooLarge) return e;
    (void)cudaGetLastError();  // an MPS or green-context SM limit (clip_kernels.cu)
    remember_coop_refused(reinterpret_cast<const void*>(fused_adam_kernel<Cap>));
  }
  e = grid_for(adam_partials_kernel<Cap>, blocks, &grid, &coop);
  if (e == cudaSuccess) e = launch(adam_partials_kernel<Cap>, grid, false, stream, args);
  if (e == cudaSuccess) e = launch(adam_finish_kernel<Cap>, 1, false, stream, args);
  if (e == cudaSuccess) e = grid_for(adam_update_kernel<Cap>, blocks, &grid, &coop);
  return e == cudaSuccess ? launch(adam_update_kernel<Cap>, grid, false, stream, args) : e;
}

}  // namespace

Plan adam_plan(AdamTensorDesc* descs, int n) {
  int64_t tiles = 0, bytes = 0;
  for (int i = 0; i < n; ++i) {
    TensorDesc& g = descs[i].grad;
    const int64_t per_tile = kTileBytes / elem_size(g.dtype);
    g.first_tile = tiles;
    tiles += (g.numel + per_tile - 1) / per_tile;
    bytes += g.numel * elem_size(g.dtype);
  }
  DeviceInfo info;
  const bool small = n <= kAdamInlineSmall && tiles <= kSmallMaxTiles && current_device_info(&info) == cudaSuccess &&
                     bytes <= info.small_max_bytes;
  if (small) return {tiles, 0};
  const size_t table = n > kAdamInlineLarge ? sizeof(AdamTensorDesc) * static_cast<size_t>(n) : 0;
  return {tiles, partials_bytes(tiles) + scalars_bytes(n) + table};
}

cudaError_t adam_step(const AdamTensorDesc* descs, int n, const Plan& plan, const AdamJob& job, void* workspace,
                      cudaStream_t stream) {
  if (n <= kAdamInlineSmall)
    return cleared(adam_impl<kAdamInlineSmall>(descs, n, plan, job, workspace, nullptr, stream));
  if (n <= kAdamInlineLarge)
    return cleared(adam_impl<kAdamInlineLarge>(descs, n, plan, job, workspace, nullptr, stream));
  void* table = static_cast<char*>(workspace) + partials_bytes(plan.num_tiles) + scalars_bytes(n);
  const cudaError_t e = upload<kAdamInlineLarge>(descs, n, table, stream);
  return cleared(e == cudaSuccess ? adam_impl<0>(descs, n, plan, job, workspace, table, stream) : e);
}

}  // namespace fastclip::gpu
