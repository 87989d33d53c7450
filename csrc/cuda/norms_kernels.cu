// fastclip's per-tensor CUDA kernels (C API: norms_kernels.h): per-tensor
// norms, local clipping, AGC. Built on tiles.cuh (the fused clip's tiles,
// block_reduce, tile_partial, tile_scale and launch helpers), so norms are
// accumulated exactly as the global norm is.
//
// Per-tensor norms and local clipping: one cooperative launch, three phases.
//   phase 1  blocks walk tiles (grid-stride), one partial per tile
//   barrier
//   reduce   block b reduces tensors b, b + grid, ...: its tiles' partials in
//            tile order (a fixed-shape block reduction), the rescue pass if
//            the fast sum left the range, then norm and coefficient
//   barrier  (local clipping only)
//   phase 2  tiles scaled by their tensor's coefficient; when each block has
//            one tile, from the registers phase 1 loaded
// A cooperative barrier rather than one block per tensor: a model's tensors
// are few and unequal (a GPT-2 block has 12, one of 2.4M elements), so one
// block per tensor would leave most SMs idle and run the big ones at one SM's
// bandwidth. Without cooperative launch the phases are three launches.
//
// AGC: one block per unit (a row), grid-stride over all units of all tensors,
// one ordinary launch with no barrier: a unit's norms, coefficient and scale
// need only that block, and the units of usual models are many (every output
// channel) and short (a row of a weight: a tile or a few), so the grid fills.
// The grad row's vectors stay in registers from the norm to the scale when
// the row fits one tile. A very long unit (a huge 1-D tensor) runs at one
// block's bandwidth: correct, not fast.
#include "norms_kernels.h"
#include "tiles.cuh"

namespace fastclip::gpu {
namespace {

// Index of the tensor holding tile (or unit) `t`: the last i with
// descs[i].first_tile <= t (all threads agree).
template <typename D>
__device__ int tensor_of(const D& descs, int n, int64_t t) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (descs[mid].first_tile <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// f(acc, x) over n elements from data, this thread's share, x in double.
template <typename F>
__device__ double fold_span(const char* data, int64_t n, DType dtype, double acc, const F& f) {
  const int64_t per_tile = kTileBytes / elem_size(dtype);
  for (int64_t off = 0; off < n; off += per_tile) {
    const Tile t{const_cast<char*>(data) + off * elem_size(dtype), static_cast<int>(min(per_tile, n - off)), dtype};
    switch (dtype) {
      case DType::F32: acc = tile_fold<float>(t, acc, f); break;
      case DType::F64: acc = tile_fold<double>(t, acc, f); break;
      case DType::F16: acc = tile_fold<__half>(t, acc, f); break;
      default: acc = tile_fold<__nv_bfloat16>(t, acc, f); break;
    }
  }
  return acc;
}

// The norm of n elements from their fast accumulator, redone by the whole
// block scaled by max |x| (in double) when the fast sum left the range
// (clip_math.h: needs_rescue). Block-uniform: every thread gets the result.
__device__ double finished_norm(const char* data, int64_t n, DType dtype, double acc, NormKind kind, double p) {
  if (!needs_rescue(acc, kind, dtype != DType::F64)) return finish_norm(acc, kind, p);
  const double max_abs = block_reduce(
      fold_span(data, n, dtype, 0.0, [](double a, double x) { return nan_max(a, fabs(x)); }), NormKind::Inf);
  if (!(max_abs > 0.0 && max_abs <= 1.7976931348623157e308)) return finish_norm(acc, kind, p);
  const double scaled =
      fold_span(data, n, dtype, 0.0, [&](double a, double x) { return a + scaled_term(x, max_abs, kind, p); });
  return rescued_norm(max_abs, block_reduce(scaled, kind), kind, p);
}

// ---- per-tensor norms and local clipping -------------------------------------

enum class Phases : int32_t { All = 0, Partials = 1, Reduce = 2, Scale = 3 };

struct PerTensorJob {
  int n;
  int64_t num_tiles;
  NormKind kind;
  double p;
  bool clip;
  double max_norm;
  void* norms_out;  // nullptr: coefficients only (scale_each's coefs are given)
  bool norms_double;
  double* partials;  // [num_tiles]
  double* coefs;     // [n]
  Phases phases;
};

template <int Cap>
struct PerTensorArgs {
  Descs<Cap> descs;
  PerTensorJob job;
};

template <int Cap>
__device__ void reduce_tensors(const Descs<Cap>& descs, const PerTensorJob& job) {
  for (int i = blockIdx.x; i < job.n; i += gridDim.x) {
    const int64_t first = descs[i].first_tile;
    const int64_t end = i + 1 < job.n ? descs[i + 1].first_tile : job.num_tiles;
    double acc = 0;  // neutral for the sums and for max |x|
    for (int64_t t = first + threadIdx.x; t < end; t += kThreads)
      acc = combine(acc, __ldcg(job.partials + t), job.kind);
    acc = block_reduce(acc, job.kind);
    const double norm =
        finished_norm(static_cast<const char*>(descs[i].data), descs[i].numel, descs[i].dtype, acc, job.kind, job.p);
    if (threadIdx.x == 0) {
      if (job.norms_double) {
        static_cast<double*>(job.norms_out)[i] = norm;
      } else {
        static_cast<float*>(job.norms_out)[i] = static_cast<float>(norm);
      }
      job.coefs[i] = clip_coef(job.max_norm, norm);
    }
  }
}

// Tiles in reverse order per block (the most recently read first), each by
// its tensor's coefficient. cached: this block's only tile is still in v.
template <int Cap>
__device__ void scale_tiles(const Descs<Cap>& descs, const PerTensorJob& job, bool cached, uint4 (&v)[kVecsPerThread]) {
  const int64_t b = blockIdx.x, g = gridDim.x;
  for (int64_t t = b + (job.num_tiles - 1 - b) / g * g; t >= b; t -= g) {
    const double coef = __ldcg(job.coefs + tensor_of(descs, job.n, t));
    if (coef != 1.0) tile_scale(locate(descs, job.n, t), coef, cached, v);  // 1: bitwise untouched
  }
}

template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
    per_tensor_kernel(const __grid_constant__ PerTensorArgs<Cap> a) {
  const PerTensorJob& job = a.job;
  uint4 v[kVecsPerThread];
  const bool all = job.phases == Phases::All;
  if (all || job.phases == Phases::Partials) {
    for (int64_t t = blockIdx.x; t < job.num_tiles; t += gridDim.x) {
      const double partial = tile_partial(locate(a.descs, job.n, t), job.kind, job.p, v);
      if (threadIdx.x == 0) job.partials[t] = partial;
    }
  }
  cg::grid_group grid = cg::this_grid();
  if (all) grid_barrier(grid);
  if (all || job.phases == Phases::Reduce) reduce_tensors(a.descs, job);
  if (!job.clip || !(all || job.phases == Phases::Scale)) return;
  if (all) grid_barrier(grid);
  scale_tiles(a.descs, job, all && job.num_tiles <= gridDim.x, v);
}

// ---- AGC -----------------------------------------------------------------------

struct AgcJob {
  int n;  // tensors; descs[0, n) grads, descs[n, 2n) params
  int64_t num_units;
  NormKind kind;
  double p, clip_factor, eps;
};

template <int Cap>
struct AgcArgs {
  Descs<Cap> descs;
  AgcJob job;
};

// The fast accumulator of a unit's n elements from data, tile by tile in
// order; v keeps the last tile's vectors.
__device__ double unit_acc(char* data, int64_t n, DType dtype, NormKind kind, double p, uint4 (&v)[kVecsPerThread]) {
  const int64_t per_tile = kTileBytes / elem_size(dtype);
  double acc = 0;
  for (int64_t off = 0; off < n; off += per_tile) {
    const Tile t{data + off * elem_size(dtype), static_cast<int>(min(per_tile, n - off)), dtype};
    acc = combine(acc, tile_partial(t, kind, p, v), kind);
  }
  return acc;
}

template <int Cap>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM) agc_kernel(const __grid_constant__ AgcArgs<Cap> a) {
  const AgcJob& job = a.job;
  uint4 vp[kVecsPerThread], vg[kVecsPerThread];
  for (int64_t u = blockIdx.x; u < job.num_units; u += gridDim.x) {
    const int i = tensor_of(a.descs, job.n, u);
    const TensorDesc& g = a.descs[i];
    const TensorDesc& w = a.descs[job.n + i];
    const int64_t units = (i + 1 < job.n ? a.descs[i + 1].first_tile : job.num_units) - g.first_tile;
    const int64_t len = g.numel / units, row = (u - g.first_tile) * len;
    char* gdata = static_cast<char*>(g.data) + row * elem_size(g.dtype);
    char* wdata = static_cast<char*>(w.data) + row * elem_size(w.dtype);
    const double wn =
        finished_norm(wdata, len, w.dtype, unit_acc(wdata, len, w.dtype, job.kind, job.p, vp), job.kind, job.p);
    const double gn =
        finished_norm(gdata, len, g.dtype, unit_acc(gdata, len, g.dtype, job.kind, job.p, vg), job.kind, job.p);
    const double coef = agc_coef(wn, gn, job.clip_factor, job.eps);
    if (coef == 1.0) continue;  // block-uniform: every thread computed the same norms
    const int64_t per_tile = kTileBytes / elem_size(g.dtype);
    const bool cached = len <= per_tile;  // vg holds the row's only tile
    for (int64_t off = 0; off < len; off += per_tile) {
      const Tile t{gdata + off * elem_size(g.dtype), static_cast<int>(min(per_tile, len - off)), g.dtype};
      tile_scale(t, coef, cached, vg);
    }
  }
}

// ---- host side -------------------------------------------------------------

size_t table_bytes(int count) { return count > kInlineLarge ? sizeof(TensorDesc) * static_cast<size_t>(count) : 0; }

struct PerTensorLayout {
  double* partials;
  double* coefs;
  void* table;
};

PerTensorLayout layout(const Plan& plan, int n, void* workspace) {
  char* w = static_cast<char*>(workspace);
  const size_t partials = round16(sizeof(double) * static_cast<size_t>(plan.num_tiles));
  const size_t coefs = round16(sizeof(double) * static_cast<size_t>(n));
  return {reinterpret_cast<double*>(w), reinterpret_cast<double*>(w + partials), w + partials + coefs};
}

template <int Cap>
cudaError_t per_tensor_impl(const TensorDesc* descs, const PerTensorJob& job, void* table, cudaStream_t stream) {
  PerTensorArgs<Cap> args;
  fill_descs(&args.descs, descs, job.n, table);
  args.job = job;
  const auto kernel = per_tensor_kernel<Cap>;
  int grid = 0;
  bool coop = false;
  cudaError_t e = grid_for(kernel, std::max<int64_t>(job.num_tiles, job.n), &grid, &coop);
  if (e != cudaSuccess) return e;
  if (job.phases == Phases::All && (grid == 1 || coop)) {
    e = launch(kernel, grid, grid > 1, stream, args);
    if (e != cudaErrorCooperativeLaunchTooLarge) return e;
    (void)cudaGetLastError();  // an MPS / green-context SM limit: the fallback below
    remember_coop_refused(reinterpret_cast<const void*>(kernel));
  }
  for (const Phases ph : {Phases::Partials, Phases::Reduce, Phases::Scale}) {
    if ((job.phases != Phases::All && job.phases != ph) || (ph == Phases::Scale && !job.clip)) continue;
    args.job.phases = ph;
    e = launch(kernel, grid, false, stream, args);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t per_tensor_dispatch(const TensorDesc* descs, const PerTensorJob& job, void* table, cudaStream_t stream) {
  if (job.n <= kInlineSmall) return per_tensor_impl<kInlineSmall>(descs, job, nullptr, stream);
  if (job.n <= kInlineLarge) return per_tensor_impl<kInlineLarge>(descs, job, nullptr, stream);
  const cudaError_t e = upload(descs, job.n, table, stream);
  return e == cudaSuccess ? per_tensor_impl<0>(descs, job, table, stream) : e;
}

template <int Cap>
cudaError_t agc_impl(const TensorDesc* descs, const AgcJob& job, void* table, cudaStream_t stream) {
  AgcArgs<Cap> args;
  fill_descs(&args.descs, descs, 2 * job.n, table);
  args.job = job;
  int grid = 0;
  bool coop = false;  // not used: no barrier
  const cudaError_t e = grid_for(agc_kernel<Cap>, job.num_units, &grid, &coop);
  return e == cudaSuccess ? launch(agc_kernel<Cap>, grid, false, stream, args) : e;
}

}  // namespace

size_t per_tensor_workspace(const Plan& plan, int n) {
  return round16(sizeof(double) * static_cast<size_t>(plan.num_tiles)) +
         round16(sizeof(double) * static_cast<size_t>(n)) + table_bytes(n);
}

cudaError_t per_tensor(const TensorDesc* descs, int n, const Plan& plan, NormKind kind, double p, bool clip,
                       double max_norm, void* norms_out, bool norms_double, void* workspace, cudaStream_t stream) {
  const PerTensorLayout w = layout(plan, n, workspace);
  const PerTensorJob job{n,         plan.num_tiles, kind,       p,       clip,       max_norm,
                         norms_out, norms_double,   w.partials, w.coefs, Phases::All};
  return cleared(per_tensor_dispatch(descs, job, w.table, stream));
}

cudaError_t scale_each(const TensorDesc* descs, int n, const Plan& plan, const double* coefs, void* workspace,
                       cudaStream_t stream) {
  const PerTensorLayout w = layout(plan, n, workspace);
  const PerTensorJob job{n,
                         plan.num_tiles,
                         NormKind::L2,
                         2.0,
                         true,
                         0.0,
                         nullptr,
                         false,
                         w.partials,
                         const_cast<double*>(coefs),
                         Phases::Scale};
  return cleared(per_tensor_dispatch(descs, job, w.table, stream));
}

size_t agc_workspace(int n) { return table_bytes(2 * n); }

cudaError_t agc(const TensorDesc* descs, int n, int64_t num_units, NormKind kind, double p, double clip_factor,
                double eps, void* workspace, cudaStream_t stream) {
  const AgcJob job{n, num_units, kind, p, clip_factor, eps};
  if (2 * n <= kInlineSmall) return cleared(agc_impl<kInlineSmall>(descs, job, nullptr, stream));
  if (2 * n <= kInlineLarge) return cleared(agc_impl<kInlineLarge>(descs, job, nullptr, stream));
  const cudaError_t e = upload(descs, 2 * n, workspace, stream);
  return cleared(e == cudaSuccess ? agc_impl<0>(descs, job, workspace, stream) : e);
}

}  // namespace fastclip::gpu
