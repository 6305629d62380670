"""One expert's matrix replaced inside a 3-D experts parameter without copying the others.

transformers 5 stores a mixture-of-experts layer's experts as one (experts, out, in) parameter, and
its forward takes ``param[expert]`` for each expert it runs. :class:`ExpertOverrides` is that
parameter's stand-in in a compressed model: it shares the dense parameter's memory, answers
``param[e]`` with a compressed copy for the overridden experts (and the dense matrix for the
others), and for anything else (another experts kernel, saving, printing) behaves as the full tensor
with the overrides in place, built on demand. So compressing one expert costs one expert matrix.
"""
from __future__ import annotations

import torch

# metadata reads answered by the dense parameter itself (no full tensor is built for them)
_META = {"__get__", "size", "dim", "numel", "nelement", "element_size", "data_ptr",
         "untyped_storage", "is_contiguous", "stride", "storage_offset", "__len__",
         "requires_grad_", "get_device", "is_floating_point", "is_complex"}


class ExpertOverrides(torch.nn.Parameter):
    """A 3-D experts parameter with some experts' matrices replaced."""

    def __new__(cls, dense: torch.Tensor):
        p = torch.Tensor._make_subclass(cls, dense.detach(), False)
        p._dense = dense.detach()
        p._over = {}
        return p

    def override(self, e: int) -> torch.Tensor:
        """Expert ``e``'s own matrix (a copy of the dense one the first time), to change."""
        e = int(e)
        if e not in self._over:
            self._over[e] = self._dense[e].clone(memory_format=torch.contiguous_format)
        return self._over[e]

    def extra_tensors(self) -> list[torch.Tensor]:
        return list(self._over.values())

    def full(self) -> torch.Tensor:
        """The whole (experts, out, in) tensor with the overrides in place (a new tensor)."""
        out = self._dense.clone()
        for e, m in self._over.items():
            out[e] = m
        return out

    def __deepcopy__(self, memo):
        new = ExpertOverrides(self._dense)
        new._over = {e: m.clone() for e, m in self._over.items()}
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, proto):
        return (torch.Tensor.clone, (self.full(),))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        me = args[0] if args and isinstance(args[0], ExpertOverrides) else None
        name = getattr(func, "__name__", "")
        if me is not None and func is torch.Tensor.__getitem__:
            idx = args[1]
            if isinstance(idx, torch.Tensor) and idx.dim() == 0 and not idx.is_floating_point():
                idx = int(idx)
            if isinstance(idx, int) and not isinstance(idx, bool):
                e = idx % me._dense.shape[0]
                return me._over[e] if e in me._over else me._dense[e]
        if me is not None and name in _META:
            with torch._C.DisableTorchFunctionSubclass():
                return func(me._dense, *args[1:], **kwargs)

        def plain(x):
            return x.full() if isinstance(x, ExpertOverrides) else x
        args = tuple(plain(a) for a in args)
        kwargs = {k: plain(v) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
