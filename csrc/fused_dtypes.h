// The grad dtypes the fused ops take; fastclip/clip.py's _FUSED_DTYPES is the
// Python twin. (The CUDA kernels have their own enum: they see no torch types.)
#pragma once

#include <c10/core/ScalarType.h>

namespace fastclip {

inline bool is_fused_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

}  // namespace fastclip
