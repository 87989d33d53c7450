"""torchtitan's clip_grad_norm_ (torchtitan/distributed/utils.py, without pipeline
parallelism), as it calls torch: torch.nn.utils.get_total_norm over the grads, the full
norm of a DTensor one, then torch.nn.utils.clip_grads_with_norm_, both looked up at call
time. Used by tests/test_patch.py and tests/distributed_cases.py."""

import torch


def titan_clip(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, None)
    if hasattr(total_norm, "full_tensor"):  # torchtitan: isinstance(total_norm, DTensor)
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, None)
    return total_norm
