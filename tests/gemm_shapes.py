"""`GemmShapes`: a dispatch mode that records the shapes of the GEMMs run while it is active, for tests that
check two code paths run the same GEMMs (a GPU may round a GEMM of another row count differently)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class GemmShapes(TorchDispatchMode):
    """Records the (M, K) x (K, N) shapes of the GEMMs (aten.mm / addmm) dispatched while active (`with`; it may
    be entered again)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            a, b = args[-2:] if name == "mm" else args[1:3]
            self.shapes.append((tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))
