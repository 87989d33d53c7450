// fastclip._C: importing it registers the ops; it also holds the eager hot
// paths' entries (csrc/eager_params.h), which read and check every .grad in
// C++ instead of per-tensor Python work.
#include <torch/extension.h>

#include "eager_adam.h"
#include "eager_params.h"

PYBIND11_MODULE(_C, m) {
  m.def(
      "cuda_built",
      []() {
#ifdef FASTCLIP_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this build.");
  fastclip::eager::register_functions(m);  // clip_params, tensor_norms, per_layer_params, agc_params
  fastclip::eager::register_adam(m);       // adam_groups
}
