// CPU implementation of fastclip::adam_step_ (schema in csrc/ops.cpp): the
// global gradient norm, then Adam/AdamW's update with the clip coefficient
// applied to each gradient as it is read, so the grads are never scaled in
// memory.
//
// Pass 1 is fastclip::total_norm's own pass (chunks.h: grads_norm): the same
// chunked index space, the same partials in the same order, so the norm is
// bitwise the one fastclip.clip_grad_norm_ computes. Pass 2 walks the
// params' chunks (chunks.h) on the same thread split and updates each chunk's
// params and moments in one vectorised sweep (csrc/adam_math.h). Bytes: the
// grads are read twice, params and moments read and written once.
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "../adam_checks.h"
#include "../adam_layout.h"
#include "chunks.h"

namespace fastclip {
namespace {

using namespace cpu;

// One param's tensors as flat runs in the param's memory order (chunks.h's
// span of the param gives that order), with its scalars for this step.
struct Entry {
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_sq;  // amsgrad only
  AdamScalars scalars;
};

// ---- pass 2: the update of one run ------------------------------------------------

// Loader's counterpart (chunks.h): accumulator vectors back to storage.
template <typename scalar_t>
void store_from(const Vectorized<acc_type<scalar_t>>* in, scalar_t* out) {
  if constexpr (Loader<scalar_t>::kVecs == 1) {
    in[0].store(out);
  } else {
    at::vec::convert_from_float<scalar_t>(in[0], in[1]).store(out);
  }
}

// AdamScalars as vectors, built once per run.
template <typename V>
struct VecScalars {
  V neg_step_size, bias2_sqrt, decay, lerp_weight, lerp_weight_m1, beta2, grad_sq_weight, eps, weight_decay;
  bool small_weight;  // |1 - beta1| < 0.5: which form of torch's lerp
  explicit VecScalars(const AdamScalars& s)
      : neg_step_size(-s.step_size),
        bias2_sqrt(s.bias2_sqrt),
        decay(s.decay),
        lerp_weight(s.lerp_weight),
        lerp_weight_m1(s.lerp_weight - 1.0),
        beta2(s.beta2),
        grad_sq_weight(s.grad_sq_weight),
        eps(s.eps),
        weight_decay(s.weight_decay),
        small_weight(std::fabs(static_cast<float>(s.lerp_weight)) < 0.5f) {}
};

// adam_element (adam_math.h) on a vector of elements. Inlined: called as a
// function, its vectors would go through the stack on every step.
template <typename V>
C10_ALWAYS_INLINE void vec_update(V& p, V g, V& m, V& v, V* mx, const VecScalars<V>& c, const AdamScalars& s,
                                  AdamFlags f) {
  if (f.maximize) g = g.neg();
  if (s.weight_decay != 0) {
    if (f.decoupled) {
      p = p * c.decay;
    } else {
      g = g + p * c.weight_decay;
    }
  }
  m = c.small_weight ? at::vec::fmadd(c.lerp_weight, g - m, m) : at::vec::fmadd(c.lerp_weight_m1, g - m, g);
  v = v * c.beta2 + c.grad_sq_weight * g * g;
  V second = v;
  if (f.amsgrad) {
    *mx = at::vec::maximum(*mx, v);
    second = *mx;
  }
  const V denom = second.sqrt() / c.bias2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;
}

// How a grad is multiplied: by `factor` for fp64, by hi * lo in float otherwise
// (clip_math.h: coef_factors), as fastclip's clip scales it in memory.
struct GradFactor {
  double factor;
  CoefFactors f;
};

template <typename acc_t>
acc_t scaled(acc_t g, const GradFactor& k) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return g * k.factor;
  } else {
    return k.f.lo == 1.0f ? g * k.f.hi : g * k.f.hi * k.f.lo;
  }
}

template <typename scalar_t>
void update_run(void* param_data, const Entry& e, int64_t offset, int64_t n, const GradFactor& k, AdamFlags f) {
  using L = Loader<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using V = Vectorized<acc_t>;
  auto* param = static_cast<scalar_t*>(param_data) + offset;
  const auto* grad = static_cast<const scalar_t*>(e.grad) + offset;
  auto* exp_avg = static_cast<scalar_t*>(e.exp_avg) + offset;
  auto* exp_avg_sq = static_cast<scalar_t*>(e.exp_avg_sq) + offset;
  auto* max_sq = f.amsgrad ? static_cast<scalar_t*>(e.max_sq) + offset : nullptr;
  const AdamScalars& s = e.scalars;
  int64_t i = 0;
  if (n >= L::kStep) {
    const VecScalars<V> c(s);
    const V hi(static_cast<acc_t>(k.factor)), f_hi(k.f.hi), f_lo(k.f.lo);
    const bool tiny = k.f.lo != 1.0f;
    for (; i + L::kStep <= n; i += L::kStep) {
      V p[L::kVecs], g[L::kVecs], m[L::kVecs], v[L::kVecs], mx[L::kVecs];
      L::load(param + i, p);
      L::load(grad + i, g);
      L::load(exp_avg + i, m);
      L::load(exp_avg_sq + i, v);
      if (f.amsgrad) L::load(max_sq + i, mx);
      for (int j = 0; j < L::kVecs; ++j) {
        if constexpr (std::is_same_v<acc_t, double>) {
          g[j] = g[j] * hi;
        } else {
          g[j] = tiny ? g[j] * f_hi * f_lo : g[j] * f_hi;
        }
        vec_update(p[j], g[j], m[j], v[j], mx + j, c, s, f);
      }
      store_from(p, param + i);
      store_from(m, exp_avg + i);
      store_from(v, exp_avg_sq + i);
      if (f.amsgrad) store_from(mx, max_sq + i);
    }
  }
  for (; i < n; ++i) {
    acc_t p = param[i], m = exp_avg[i], v = exp_avg_sq[i], mx = f.amsgrad ? acc_t(max_sq[i]) : acc_t(0);
    adam_element(p, scaled(static_cast<acc_t>(grad[i]), k), m, v, &mx, s, f);
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (f.amsgrad) max_sq[i] = mx;
  }
}

void update_span(const Span& s, const Entry& e, int64_t offset, int64_t n, const GradFactor& k, AdamFlags f) {
  switch (s.dtype) {
    case at::kFloat: return update_run<float>(s.data, e, offset, n, k, f);
    case at::kDouble: return update_run<double>(s.data, e, offset, n, k, f);
    case at::kHalf: return update_run<Half>(s.data, e, offset, n, k, f);
    default: return update_run<BFloat16>(s.data, e, offset, n, k, f);
  }
}

// ---- the op -------------------------------------------------------------------

// A one-element CPU tensor's value, read directly: item() would cost a
// dispatcher call per step tensor.
double read_double(const at::Tensor& t) {
  const void* d = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: return *static_cast<const float*>(d);
    case at::kDouble: return *static_cast<const double*>(d);
    case at::kHalf: return static_cast<float>(*static_cast<const Half*>(d));
    case at::kBFloat16: return static_cast<float>(*static_cast<const BFloat16*>(d));
    default: return t.item<double>();
  }
}

at::Tensor adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                         at::IntArrayRef groups, at::ArrayRef<double> lrs, at::ArrayRef<double> beta1s,
                         at::ArrayRef<double> beta2s, at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays,
                         at::TensorList lr_tensors, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                         std::optional<double> max_norm, double norm_type, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> norm_dtype_arg) {
  const AdamArgs a{params,
                   grads,
                   exp_avgs,
                   exp_avg_sqs,
                   max_exp_avg_sqs,
                   steps,
                   groups,
                   lrs,
                   beta1s,
                   beta2s,
                   epss,
                   weight_decays,
                   lr_tensors,
                   {amsgrad, maximize, decoupled_weight_decay},
                   max_norm,
                   norm_type,
                   grad_scale,
                   found_inf};
  check_adam_args(a);
  const at::ScalarType out_dtype = norm_dtype(grads, norm_dtype_arg, kAdamOp);
  if (params.empty()) return at::zeros({}, at::TensorOptions().dtype(out_dtype));

  const double scale = grad_scale ? read_double(*grad_scale) : 1.0;  // GradScaler's: the grads carry it
  const double norm = grads_norm(grads, norm_type, kAdamOp) / scale;
  const at::Tensor norm_out = norm_tensor(norm, out_dtype);
  if (found_inf && read_double(*found_inf) != 0.0) return norm_out;  // GradScaler: skip the step, count included

  std::vector<AdamHyper> hyper;
  for (size_t g = 0; g < a.num_groups(); ++g)
    hyper.push_back(a.hyper(g, lr_tensors.empty() ? lrs[g] : read_double(lr_tensors[g])));
  const double factor = adam_grad_factor(max_norm.has_value(), max_norm.value_or(0.0), norm, scale);
  const GradFactor k{factor, coef_factors(factor)};

  GradSet set;  // the params' chunks; entries[span] holds the rest of the param's tensors
  std::vector<Entry> entries;
  entries.reserve(params.size());
  AdamLayout layout;  // the params' own copies are the set's (add_span, copy_back)
  for (size_t i = 0; i < params.size(); ++i) {
    float* step = static_cast<float*>(steps[i].data_ptr());  // float32 (check_adam_args)
    const double t = static_cast<double>(*step) + 1.0;
    *step = static_cast<float>(t);
    const at::Tensor& p = params[i];
    if (add_span(set, p) < 0) continue;  // zero-size: only its step counts
    const at::Tensor& ref = p.is_non_overlapping_and_dense() ? p : set.copies.back().second;
    Entry e;
    e.grad = layout.flat(grads[i], ref, /*written=*/false);
    e.exp_avg = layout.flat(exp_avgs[i], ref, true);
    e.exp_avg_sq = layout.flat(exp_avg_sqs[i], ref, true);
    e.max_sq = amsgrad ? layout.flat(max_exp_avg_sqs[i], ref, true) : nullptr;
    e.scalars = adam_scalars(hyper[groups[i]], t, decoupled_weight_decay);
    entries.push_back(e);
  }
  over_chunks(set, [&](int64_t begin, int64_t end) {
    for_each_chunk(set, begin, end, Order::Forward, [&](const Span& s, int64_t off, int64_t n, int64_t) {
      update_span(s, entries[static_cast<size_t>(&s - set.spans.data())], off, n, k, a.flags);
    });
  });
  copy_back(set);
  layout.finish();
  return norm_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace fastclip
