"""What a clipping step costs, counted at torch's dispatcher: fastclip's fused ops (one
pass over the grads each) and host reads of a tensor's value
(aten::_local_scalar_dense: .item(), bool(), float(); on a GPU, a host sync). Ops that a tensor subclass (DTensor)
runs inside its own dispatch are not seen, only those called on plain tensors (torch.distributed.tensor.debug.CommDebugMode
counts collectives, DTensor's included)."""

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    @property
    def fused(self):
        """The names of fastclip's ops, in order."""
        return [op._opname for op in self.ops if op.namespace == "fastclip"]

    @property
    def host_reads(self):
        return sum(op._opname == "_local_scalar_dense" for op in self.ops)
