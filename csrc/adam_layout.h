// The tensors of one param (grad, exp_avg, exp_avg_sq, max_exp_avg_sq) read
// and written in the param's memory order, for adam_step_'s CPU operator and
// CUDA glue: a tensor laid out otherwise (other strides, not dense, not
// element-aligned) is worked on through a copy in the param's layout, written
// back at the end if it was updated. CPU-side torch only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace fastclip {

struct AdamLayout {
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (tensor, its copy)
  std::vector<at::Tensor> keep;                               // read-only copies, alive until the end

  static bool flat_as(const at::Tensor& t, const at::Tensor& ref) {
    return t.is_non_overlapping_and_dense() && t.strides() == ref.strides() &&
           reinterpret_cast<uintptr_t>(t.data_ptr()) % t.element_size() == 0;
  }

  // The param as one dense run: itself, or a contiguous copy written back at the end.
  at::Tensor param(const at::Tensor& p) {
    if (p.numel() == 0 || flat_as(p, p)) return p;
    at::Tensor copy = p.clone(at::MemoryFormat::Contiguous);
    write_back.emplace_back(p, copy);
    return copy;
  }

  // t's data in the memory order of ref (the param as param() gives it).
  void* flat(const at::Tensor& t, const at::Tensor& ref, bool written) {
    if (t.numel() == 0 || flat_as(t, ref)) return t.data_ptr();
    at::Tensor copy = at::empty_like(ref, t.options()).copy_(t);
    if (written) {
      write_back.emplace_back(t, copy);
    } else {
      keep.push_back(copy);
    }
    return copy.data_ptr();
  }

  void finish() {
    for (const auto& [t, copy] : write_back) t.copy_(copy);
  }
};

}  // namespace fastclip
