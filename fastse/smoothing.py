"""Teacher updates for student-teacher learning: EMA, Spatial Ensemble (SE) and Spatial-Temporal
Smoothing (STS) of Huang et al., NeurIPS 2021.

After each optimizer step every *fragment* j of the teacher ξ is updated from the student θ:

    ema:  ξ_j ← m·ξ_j + (1−m)·θ_j
    se:   keep ξ_j with probability keep_prob, else ξ_j ← θ_j
    sts:  keep ξ_j with probability keep_prob, else ξ_j ← m·ξ_j + (1−m)·θ_j

A fragment is a whole tensor, an output channel (slice along dim 0; 1-D tensors per element) or a
scalar, by `granularity`. Fragment j is kept when u_j < keep_prob, with u_j a Philox draw that depends
only on (key, j) (`fastse.philox`): all DDP ranks hold the same teacher without communication, and a
resumed run draws what the uninterrupted run would have.

Use it in three ways: `smooth_` (a pure function over two lists of tensors), `Smoother` (a stateful
helper with schedules, buffers, resume and stats), or the trainers in `fastse.methods`.
"""

from __future__ import annotations

import copy
import math
import struct
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastse import philox
from fastse.choices import BUFFER_MODES, GRANULARITIES, KERNELS, RULES  # re-exported: fastse.smoothing.RULES

Rule = Literal["ema", "se", "sts"]  # = RULES
Granularity = Literal["tensor", "channel", "element"]  # = GRANULARITIES
BufferMode = Literal["keep", "copy", "ema"]  # = BUFFER_MODES

__all__ = [
    "Smoother", "smooth_", "make_teacher", "cosine_momentum", "unwrap",
    "RULES", "GRANULARITIES", "BUFFER_MODES",
]


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / `torch.compile` wrappers (any nesting)."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def make_teacher(student: nn.Module) -> nn.Module:
    """A full deep copy of `student` (unwrapped) with `requires_grad_(False)`: the initial teacher."""
    teacher = copy.deepcopy(unwrap(student))
    return teacher.requires_grad_(False)


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """BYOL's schedule: final − (final − base)·(cos(π·k/K) + 1)/2; `base` at step 0, `final` at K."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    k = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * k / total_steps) + 1) / 2


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_prob(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")


def _fragment_counts(t: Tensor, granularity: str) -> int:
    if granularity == "tensor":
        return 1
    if granularity == "channel" and t.dim() >= 2:
        return t.shape[0]
    return t.numel()


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in memory order (works for channels_last and other dense layouts)."""
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class _Plan:
    """Fragment layout, (device, dtype) groups and kernel tables for two aligned lists of tensors."""

    def __init__(self, teacher: Sequence[Tensor], student: Sequence[Tensor], granularity: str, kernel: str,
                 names: Sequence[str] | None = None):
        _check_choice("granularity", granularity, GRANULARITIES)
        _check_choice("kernel", kernel, KERNELS)
        teacher, student = list(teacher), list(student)
        if len(teacher) != len(student):
            raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
        names = list(names) if names is not None else [f"tensor {i}" for i in range(len(teacher))]
        for name, t, s in zip(names, teacher, student):
            what = None
            if t.shape != s.shape:
                what = f"shape {tuple(t.shape)} vs {tuple(s.shape)}"
            elif t.dtype != s.dtype:
                what = f"dtype {t.dtype} vs {s.dtype}"
            elif t.device != s.device:
                what = f"device {t.device} vs {s.device}"
            elif not t.dtype.is_floating_point:
                what = f"dtype {t.dtype} is not floating point"
            elif t.stride() != s.stride() or not (t.is_contiguous() or _is_dense(t)):
                what = f"memory layout strides {t.stride()} vs {s.stride()} (convert both to one layout)"
            elif granularity == "channel" and t.dim() >= 2 and t.stride(0) * t.shape[0] != t.numel():
                what = f"stride {t.stride()}: channel granularity needs dim 0 outermost"
            if what:
                raise ValueError(f"teacher and student differ at {name}: {what}")
        self.teacher, self.student, self.names = teacher, student, names
        self._all = teacher + student
        self.granularity = granularity
        counts = [_fragment_counts(t, granularity) for t in teacher]
        self.frag_counts = counts
        # element fragments of each tensor start 8-aligned, so one Philox counter serves 8 of its elements
        spans = [-(-c // 8) * 8 for c in counts] if granularity == "element" else counts
        self.frag_bases = [0] * len(counts)
        for i in range(1, len(counts)):
            self.frag_bases[i] = self.frag_bases[i - 1] + spans[i - 1]
        self.n_frag = sum(counts)
        self.n_index = self.frag_bases[-1] + spans[-1] if counts else 0  # fragment indices in use
        self.kernel = kernel
        self._build()

    def _build(self) -> None:
        self._signature = self._current_signature()
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(self.teacher):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.groups = []
        for (device, dtype), idx in groups.items():
            use_triton = self.kernel != "torch" and device.type == "cuda" and _triton_dtype(dtype) is not None
            if use_triton and not _triton_available():
                if self.kernel == "triton":
                    raise RuntimeError("kernel='triton' needs the triton package (it ships with CUDA builds of torch)")
                use_triton = False
            if self.kernel == "triton" and not use_triton:
                raise RuntimeError(f"kernel='triton' needs CUDA tensors of a float dtype, got {device} {dtype}")
            group = _TritonGroup(self, idx, device, dtype) if use_triton else _TorchGroup(self, idx, device)
            self.groups.append(group)
        # channel masks: one flag per channel and one partial count per pre-pass program, per device
        self.channel_masks: dict[torch.device, tuple[Tensor, Tensor]] = {}
        if self.granularity == "channel":
            for g in self.groups:
                if isinstance(g, _TritonGroup) and g.device not in self.channel_masks:
                    programs = _cdiv(self.n_frag, 8 * _CHANNEL_BLOCK8)
                    self.channel_masks[g.device] = (torch.zeros(self.n_frag, dtype=torch.int8, device=g.device),
                                                    torch.zeros(programs, dtype=torch.int32, device=g.device))
        self._last_counts: list[Any] = []

    def _current_signature(self) -> list[int]:
        return list(map(Tensor.data_ptr, self._all))

    def bind(self, teacher: list[Tensor], student: list[Tensor]) -> None:
        """Update `teacher` from `student` from now on: tensors at the addresses, of the shapes, that the plan was
        made for (`smooth_`'s cached plans hold no tensor between calls: `unbind`)."""
        self.teacher, self.student, self._all = teacher, student, teacher + student
        for g in self.groups:
            if isinstance(g, _TorchGroup):
                g.bind()

    def unbind(self) -> None:
        """Let go of the tensors, keeping the rest (groups, kernel tables, flat buffers) for `bind`."""
        self.teacher = self.student = self._all = None
        for g in self.groups:
            if isinstance(g, _TorchGroup):
                g.t = g.s = None

    @torch.no_grad()
    def run(self, rule: str, key: int, keep_prob: float, weight: float) -> None:
        """One update: `weight` = 1 − momentum, `key` = this step's 64-bit Philox key."""
        if self._current_signature() != self._signature:  # a tensor was moved or re-allocated
            self._build()
        masked = rule != "ema"
        host_update = None
        if masked and self.granularity == "tensor" and any(isinstance(g, _TorchGroup) for g in self.groups):
            host_update = (philox.uniform(key, 0, self.n_frag) >= keep_prob).tolist()
        if masked and self.channel_masks:
            from fastse import _smooth_triton as kt

            for update, partial in self.channel_masks.values():
                kt.channel_mask_kernel[(partial.numel(),)](update, partial, self.n_frag, key, float(keep_prob),
                                                           BLOCK8=_CHANNEL_BLOCK8)
        counts = [g.run(rule, key, keep_prob, weight, host_update) for g in self.groups]
        if masked and self.channel_masks:  # every device's pre-pass counted every channel: one is the answer
            counts = [next(iter(self.channel_masks.values()))[1]]
        self._last_counts = counts if masked else [self.n_frag]

    def updated_count(self) -> int:
        """Fragments updated by the last `run` (synchronises with the device: call it only to log)."""
        if not self._last_counts:
            return 0
        return int(sum(int(c.sum()) if isinstance(c, Tensor) else int(c) for c in self._last_counts))


def _is_dense(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.is_contiguous()


def _triton_dtype(dtype: torch.dtype):
    if not _triton_available():
        return None
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}.get(dtype)


_TRITON: bool | None = None


def _triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = torch.cuda.is_available()
        except ImportError:
            _TRITON = False
    return _TRITON


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _TorchGroup:
    """Torch ops for one (device, dtype) group: CPU, or CUDA without Triton. A fixed number of ops per step,
    whatever the number of tensors: EMA and tensor granularity run `torch._foreach_*` over the tensors; channel and
    element granularity run on flat buffers (`_FlatUpdate`)."""

    def __init__(self, plan: _Plan, idx: list[int], device: torch.device):
        self.plan, self.idx, self.device = plan, idx, device
        self.bind()
        self.flat: _FlatUpdate | _JitUpdate | None = None  # built at the first masked channel/element step

    def bind(self) -> None:
        """Flat views of this group's tensors of the plan (the update's flat paths read them at each step)."""
        self.t = [_flat(self.plan.teacher[i]) for i in self.idx]
        self.s = [_flat(self.plan.student[i]) for i in self.idx]

    def run(self, rule, key, keep_prob, weight, host_update):
        plan = self.plan
        if rule == "ema":
            torch._foreach_lerp_(self.t, self.s, weight)
            return None
        if plan.granularity == "tensor":
            sel = [k for k, i in enumerate(self.idx) if host_update[i]]
            ts, ss = [self.t[k] for k in sel], [self.s[k] for k in sel]
            if ts:
                if rule == "se":
                    torch._foreach_copy_(ts, ss)
                else:
                    torch._foreach_lerp_(ts, ss, weight)
            return len(sel)
        if self.flat is None:
            fn = _philox_weights_kernel(self.device) if self.t and self.t[0].dtype == torch.float32 else None
            use_jit = fn is not None and plan.n_index <= _JIT_MAX_FRAGMENTS
            self.flat = _JitUpdate(self, fn) if use_jit else _FlatUpdate(self)
        return self.flat.run(self, rule, key, keep_prob, weight)


class _FlatUpdate:
    """The masked channel/element update of a torch group on one flat teacher and one flat student buffer.

    Per step: one `_foreach_copy_` gathers teacher and student, one batched Philox pass (`philox.draws_at_least`)
    flags every fragment, one `torch.where` (after one `torch.lerp` for sts) updates the flagged elements and one
    `_foreach_copy_` writes the teacher back. No host-device sync. Element granularity lays the tensors out as
    the fragment index space does (each starts 8-aligned), so the flags of the group's Philox counters are the
    element mask as drawn; channel granularity packs the tensors and expands channel flags to elements as the
    prefix sum of their changes. Holds two flat copies of the group's tensors."""

    def __init__(self, group: _TorchGroup):
        plan, device = group.plan, group.device
        self.granularity = plan.granularity
        sizes = [t.numel() for t in group.t]
        bases = [plan.frag_bases[i] for i in group.idx]
        frags = [plan.frag_counts[i] for i in group.idx]
        if self.granularity == "element":  # one counter per 8 elements of a tensor, each tensor 8-aligned
            counters = [torch.arange(b // 8, b // 8 + _cdiv(n, 8), dtype=torch.int64) for b, n in zip(bases, sizes)]
            offsets = [0]
            for n in sizes:
                offsets.append(offsets[-1] + 8 * _cdiv(n, 8))
        else:  # channel: the counters spanning the group's fragments; flags picked at frag_pos, packed tensors
            first, end = bases[0], bases[-1] + frags[-1]
            counters = [torch.arange(first // 8, _cdiv(end, 8), dtype=torch.int64)]
            offsets = [0]
            for n in sizes:
                offsets.append(offsets[-1] + n)
            # every fragment holds an element (_Plan refuses empty channels), so the fragments' first elements
            # are distinct and tile the flat buffer in order
            ks = range(len(sizes))
            pos = torch.cat([torch.arange(bases[k], bases[k] + frags[k]) for k in ks]) - first // 8 * 8
            starts = torch.cat([offsets[k] + torch.arange(frags[k]) * (sizes[k] // max(frags[k], 1)) for k in ks])
            self.frag_pos, self.starts = pos.to(device), starts.to(device)
            self.change = torch.zeros(offsets[-1], dtype=torch.int8, device=device)  # nonzero only at starts
            self.mask = torch.empty(offsets[-1], dtype=torch.int8, device=device)
        self.counters = torch.cat(counters).to(device)
        self.flags = torch.empty(8 * self.counters.numel(), dtype=torch.bool, device=device)
        dtype = group.t[0].dtype
        self.ft = torch.zeros(offsets[-1], dtype=dtype, device=device)
        self.fs = torch.zeros(offsets[-1], dtype=dtype, device=device)
        self.ft_views = [self.ft[a : a + n] for a, n in zip(offsets, sizes)]
        fs_views = [self.fs[a : a + n] for a, n in zip(offsets, sizes)]
        self.views = self.ft_views + fs_views  # gathered from the group's teacher + student tensors at each step
        self.element_flags = [self.flags[a : a + n] for a, n in zip(offsets, sizes)]  # per tensor, at element

    def run(self, group: _TorchGroup, rule: str, key: int, keep_prob: float, weight: float) -> _Deferred:
        philox.draws_at_least(key, self.counters, _threshold16(keep_prob), out=self.flags)
        if self.granularity == "element":
            mask, flagged = self.flags, self.element_flags
        else:
            frag = self.flags[self.frag_pos]  # bool [fragments]
            d = frag.to(torch.int8)
            self.change[self.starts] = torch.diff(d, prepend=d.new_zeros(1))
            mask, flagged = torch.cumsum(self.change, 0, dtype=torch.int8, out=self.mask).view(torch.bool), [frag]
        torch._foreach_copy_(self.views, group.t + group.s)
        if rule == "sts":
            torch.lerp(self.ft, self.fs, weight, out=self.fs)
        torch.where(mask, self.fs, self.ft, out=self.ft)
        torch._foreach_copy_(group.t, self.ft_views)
        return _Deferred(lambda: int(sum(f.sum() for f in flagged)))  # one sync, when asked


# One CUDA C++ function compiled at run time by torch's jiterator (NVRTC), for CUDA without Triton: fragment index
# (a uint32 carried in a float32's bits: jiterator promotes its inputs to one dtype) -> the fragment's lerp weight,
# `weight` where its Philox draw (`fastse.philox`: word (f % 8) // 2 of Philox4x32-10 at counter f // 8, low or
# high 16 bits) is >= `threshold`, else 0.
_PHILOX_WEIGHT_CODE = r"""
template <typename T> T fastse_philox_weight(T fragment, long long key_lo, long long key_hi, long long threshold,
                                              double weight) {
  unsigned int f = __float_as_uint(fragment);
  unsigned int c0 = f >> 3, c1 = 0u, c2 = 0u, c3 = 0u;
  unsigned int k0 = (unsigned int)key_lo, k1 = (unsigned int)key_hi;
  #pragma unroll
  for (int round = 0; round < 10; ++round) {
    unsigned int hi_a = __umulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    unsigned int hi_b = __umulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    c0 = hi_b ^ c1 ^ k0; c1 = lo_b; c2 = hi_a ^ c3 ^ k1; c3 = lo_a;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  unsigned int lane = (f & 7u) >> 1;
  unsigned int word = lane == 0u ? c0 : lane == 1u ? c1 : lane == 2u ? c2 : c3;
  unsigned int draw = (f & 1u) ? (word >> 16) : (word & 0xFFFFu);
  return draw >= (unsigned int)threshold ? (T)weight : (T)0;
}
"""
_JIT_MAX_FRAGMENTS = 0x7F800000  # fragment indices whose float32 bits are finite numbers (no NaN payloads)
_JIT_KERNELS: dict[torch.device, Callable | None] = {}


def _philox_weights_kernel(device: torch.device) -> Callable | None:
    """The jiterator kernel of `_PHILOX_WEIGHT_CODE` on this CUDA device, once it has drawn what `fastse.philox`
    draws for fragments at both ends of its range; None (with a warning) where it cannot be compiled (no NVRTC,
    ROCm) or disagrees, and on CPUs."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    if device not in _JIT_KERNELS:
        _JIT_KERNELS[device] = None
        try:
            fn = torch.cuda.jiterator._create_jit_fn(_PHILOX_WEIGHT_CODE, key_lo=0, key_hi=0, threshold=0, weight=0.0)
            key, threshold = philox.step_key(2021, 7), _threshold16(0.5)
            ends = (0, _JIT_MAX_FRAGMENTS - 4096)
            ids = torch.cat([torch.arange(a, a + 4096, dtype=torch.int64, device=device) for a in ends])
            got = fn(ids.to(torch.int32).view(torch.float32), key_lo=key & 0xFFFFFFFF, key_hi=key >> 32,
                     threshold=threshold, weight=1.0) != 0
            want = philox.draws_at_least(key, ids[::8] >> 3, threshold).view(-1)
            if not torch.equal(got, want):
                raise RuntimeError("its Philox draws differ from fastse.philox's")
            _JIT_KERNELS[device] = fn
        except Exception as e:  # noqa: BLE001  (NVRTC or driver errors of any kind: the plain torch ops still work)
            warnings.warn(f"fastse: the jiterator teacher-update kernel is unavailable on {device} ({e}); "
                          "channel/element updates without Triton fall back to plain torch ops (slower)", stacklevel=3)
    return _JIT_KERNELS[device]


class _JitUpdate:
    """The masked channel/element update of a float32 CUDA torch group (CUDA without Triton): one jiterator kernel
    turns each element's fragment index into its lerp weight (1 − momentum for sts, 1 for se, 0 where the fragment
    is kept), then one `torch._foreach_lerp_` with those weights updates the teacher in place. 24 B a parameter
    (the floor is 12); holds one int32 fragment index per element. The same elements as the CPU path, and the
    same values for finite tensors (a weight-0 lerp leaves the teacher, a weight-1 lerp gives the student)."""

    def __init__(self, group: _TorchGroup, fn: Callable):
        plan, device = group.plan, group.device
        ids, fragments = [], []
        for k, i in enumerate(group.idx):
            n, base, count = group.t[k].numel(), plan.frag_bases[i], plan.frag_counts[i]
            first = torch.arange(base, base + count, dtype=torch.int64, device=device)
            fragments.append(first)
            ids.append(first.repeat_interleave(n // count) if count and count != n else first)
        # fragment index of each element in memory order (a channel's elements are contiguous: dim 0 outermost)
        self.element_fragments = torch.cat(ids).to(torch.int32).view(torch.float32)
        self.fragments = (self.element_fragments if plan.granularity == "element"
                          else torch.cat(fragments).to(torch.int32).view(torch.float32))
        self.sizes, self.fn = [t.numel() for t in group.t], fn

    def run(self, group: _TorchGroup, rule: str, key: int, keep_prob: float, weight: float) -> _Deferred:
        args = dict(key_lo=key & 0xFFFFFFFF, key_hi=key >> 32, threshold=_threshold16(keep_prob))
        weights = self.fn(self.element_fragments, weight=1.0 if rule == "se" else weight, **args)
        torch._foreach_lerp_(group.t, group.s, weights.split(self.sizes))
        return _Deferred(lambda: int((self.fn(self.fragments, weight=1.0, **args) != 0).sum()))  # one sync, when asked


def _threshold16(keep_prob: float) -> int:
    """The least 16-bit draw d that updates its fragment: u = d / 65536 >= keep_prob compared in float32, as the
    Triton kernel and torch's float32 comparison do."""
    return math.ceil(struct.unpack("f", struct.pack("f", keep_prob))[0] * 65536)


class _TritonGroup:
    """One fused Triton launch per step over all tensors of a (CUDA device, float dtype) group."""

    def __init__(self, plan: _Plan, idx: list[int], device: torch.device, dtype: torch.dtype):
        from fastse import _smooth_triton as kt

        self.plan, self.idx, self.device, self.dtype = plan, idx, device, dtype
        teacher = [plan.teacher[i] for i in idx]
        student = [plan.student[i] for i in idx]
        self.block, self.warps = kt.LAUNCH[plan.granularity]
        rows = []  # one row per program: teacher ptr, student ptr, numel, first fragment, offset, per fragment
        for i, t, st in zip(idx, teacher, student):
            n = t.numel()
            per_frag = n // plan.frag_counts[i] if plan.frag_counts[i] else 1
            rows += [(t.data_ptr(), st.data_ptr(), n, plan.frag_bases[i], start, per_frag)
                     for start in range(0, n, self.block)]
        self.chunks = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 6)
        self.n_chunks = len(rows)
        self.partial = torch.zeros(self.n_chunks, dtype=torch.int32, device=device)  # updated per program
        self.aligned = all(x.data_ptr() % 16 == 0 for x in teacher + student)
        self.tl_dtype = _triton_dtype(dtype)
        self.kt = kt

    def run(self, rule, key, keep_prob, weight, host_update, count_only=False):
        plan = self.plan
        if self.n_chunks == 0:
            return None
        masks = plan.channel_masks.get(self.device)
        update = masks[0] if masks else self.partial  # the flag table is read only at channel granularity
        self.kt.smooth_kernel[(self.n_chunks,)](
            self.chunks, update, self.partial, key, float(keep_prob), float(weight),
            RULE=_RULE_IDS[rule], GRAN=_GRAN_IDS[plan.granularity], DTYPE=self.tl_dtype, BLOCK=self.block,
            ALIGNED=self.aligned, COUNT_ONLY=count_only, num_warps=self.warps,
        )
        if plan.granularity == "tensor":
            return self.partial
        if plan.granularity == "element":  # counted on demand, by a draw-only pass: see _Plan.updated_count
            return _Deferred(lambda: self.count_only(rule, key, keep_prob, weight, host_update))
        return None

    def count_only(self, rule, key, keep_prob, weight, host_update) -> int:
        self.run(rule, key, keep_prob, weight, host_update, count_only=True)
        return int(self.partial.sum())


class _Deferred:
    """A fragment count computed only when asked (`int()`, a device sync): `stats()` reads it to log."""

    def __init__(self, count: Callable[[], int]):
        self.count = count

    def __int__(self) -> int:
        return self.count()


_RULE_IDS = {"ema": 0, "se": 1, "sts": 2}
_CHANNEL_BLOCK8 = 512  # Philox counters (8 channels each) per program of the channel pre-pass
_GRAN_IDS = {"tensor": 0, "channel": 1, "element": 2}


# smooth_'s plans by (granularity, kernel, addresses, shapes), the 8 latest. Between calls a plan holds no tensor
# (`_Plan.unbind`), and it is forgotten once the memory of any of its tensors is freed (a finalizer on each storage),
# so it neither keeps a model alive nor meets a later model at the same addresses.
_PLANS: dict[tuple, _Plan] = {}
_PLAN_FINALIZERS: dict[tuple, list[weakref.finalize]] = {}


def _forget_plan(sig: tuple) -> None:
    _PLANS.pop(sig, None)
    for finalizer in _PLAN_FINALIZERS.pop(sig, ()):
        finalizer.detach()


@torch.no_grad()
def smooth_(
    teacher_params: Iterable[Tensor],
    student_params: Iterable[Tensor],
    *,
    rule: Rule = "sts",
    keep_prob: float = 0.7,
    momentum: float = 0.99,
    granularity: Granularity = "tensor",
    generator: torch.Generator | int | None = None,
    kernel: str = "auto",
) -> None:
    """Update `teacher_params` in place from `student_params` (two aligned sequences of tensors).

    `keep_prob` is the probability of keeping each teacher fragment (ignored by rule 'ema');
    `momentum` m weights the teacher in the moving average. `generator` gives this call's mask key:
    an int key, or a CPU `torch.Generator` (one 63-bit draw on the host, so no device sync);
    None draws from torch's default CPU generator.
    """
    _check_choice("rule", rule, RULES)
    _check_prob("keep_prob", keep_prob)
    _check_prob("momentum", momentum)
    teacher_params, student_params = list(teacher_params), list(student_params)
    if isinstance(generator, int):
        key = generator & 0xFFFFFFFFFFFFFFFF
    else:
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (the mask key is drawn on the host)")
        key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
    sig = (granularity, kernel, tuple(t.data_ptr() for t in teacher_params),
           tuple(s.data_ptr() for s in student_params), tuple(t.shape for t in teacher_params))
    plan = _PLANS.get(sig)
    if plan is None:
        plan = _Plan(teacher_params, student_params, granularity, kernel)
        while len(_PLANS) >= 8:
            _forget_plan(next(iter(_PLANS)))
        storages = {id(st): st for st in (t.untyped_storage() for t in teacher_params + student_params)}
        _PLAN_FINALIZERS[sig] = [weakref.finalize(st, _forget_plan, sig) for st in storages.values()]
        for finalizer in _PLAN_FINALIZERS[sig]:
            finalizer.atexit = False
        _PLANS[sig] = plan
    else:
        plan.bind(teacher_params, student_params)
    try:
        plan.run(rule, key, keep_prob, 1.0 - momentum)
    finally:
        plan.unbind()


def _pairs(teacher: Iterable[tuple[str, Tensor]], student: Iterable[tuple[str, Tensor]], kind: str):
    teacher, student = list(teacher), list(student)
    for (tn, _), (sn, _) in zip(teacher, student):
        if tn != sn:
            raise ValueError(f"teacher and student differ: {kind} {tn!r} vs {sn!r}")
    if len(teacher) != len(student):
        longer, extra = ("teacher", teacher) if len(teacher) > len(student) else ("student", student)
        name = extra[min(len(teacher), len(student))][0]
        raise ValueError(f"teacher and student differ: only the {longer} has {kind} {name!r}")
    return [n for n, _ in teacher], [t for _, t in teacher], [s for _, s in student]


class Smoother:
    """Keeps a teacher smoothed from a student, one `.step()` after each optimizer step.

    rule: 'ema' | 'se' | 'sts'; keep_prob: P(keep a teacher fragment); momentum: m of the moving
    average (override per step for schedules: `.step(cosine_momentum(k, K))`); granularity: 'tensor'
    | 'channel' | 'element'; buffers: 'keep' (teacher's own, e.g. BN running stats from its forwards),
    'copy' (from the student) or 'ema' (float buffers averaged with m, integer buffers copied); seed:
    with the step count, fixes every mask. DDP / compiled modules are unwrapped. No host-device sync.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        rule: Rule = "sts",
        keep_prob: float = 0.7,
        momentum: float = 0.99,
        granularity: Granularity = "tensor",
        buffers: BufferMode = "keep",
        seed: int = 0,
        kernel: str = "auto",
    ):
        _check_choice("rule", rule, RULES)
        _check_choice("buffers", buffers, BUFFER_MODES)
        _check_prob("keep_prob", keep_prob)
        _check_prob("momentum", momentum)
        self.rule, self.keep_prob, self.momentum = rule, float(keep_prob), float(momentum)
        self.granularity, self.buffers, self.seed, self.kernel = granularity, buffers, int(seed), kernel
        self.student, self.teacher = unwrap(student), unwrap(teacher)
        names, t, s = _pairs(self.teacher.named_parameters(), self.student.named_parameters(), "parameter")
        self._plan = _Plan(t, s, granularity, kernel, names)
        self._buffer_pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] = ([], [], [], [])
        if buffers != "keep":
            bnames, tb, sb = _pairs(self.teacher.named_buffers(), self.student.named_buffers(), "buffer")
            for name, a, b in zip(bnames, tb, sb):
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise ValueError(f"teacher and student differ at buffer {name}: "
                                     f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            floats = [(a, b) for a, b in zip(tb, sb) if a.dtype.is_floating_point]
            others = [(a, b) for a, b in zip(tb, sb) if not a.dtype.is_floating_point]
            self._buffer_pairs = ([a for a, _ in floats], [b for _, b in floats],
                                  [a for a, _ in others], [b for _, b in others])
        self.steps = 0
        self._last_momentum: float | None = None

    @torch.no_grad()
    def step(self, momentum: float | None = None) -> None:
        """One teacher update; `momentum` overrides the constructor's for this step only."""
        m = self.momentum if momentum is None else float(momentum)
        self._plan.run(self.rule, philox.step_key(self.seed, self.steps), self.keep_prob, 1.0 - m)
        tf, sf, ti, si = self._buffer_pairs
        if self.buffers == "copy":
            if tf:
                torch._foreach_copy_(tf, sf)
        elif self.buffers == "ema" and tf:
            torch._foreach_lerp_(tf, sf, 1.0 - m)
        if ti:
            torch._foreach_copy_(ti, si)
        self.steps += 1
        self._last_momentum = m

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (the tensors live in the teacher's own state)."""
        return {"steps": self.steps, "seed": self.seed, "rule": self.rule, "keep_prob": self.keep_prob,
                "momentum": self.momentum, "granularity": self.granularity, "buffers": self.buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("granularity", self.granularity) != self.granularity:
            raise ValueError(f"checkpoint smoother granularity {state['granularity']!r} != {self.granularity!r}")
        if state.get("buffers", self.buffers) != self.buffers:
            raise ValueError(f"checkpoint smoother buffers {state['buffers']!r} != {self.buffers!r}")
        self.steps, self.seed = int(state["steps"]), int(state["seed"])
        self.rule, self.keep_prob = state.get("rule", self.rule), float(state.get("keep_prob", self.keep_prob))
        self.momentum = float(state.get("momentum", self.momentum))

    @torch.no_grad()
    def stats(self, distance: bool = False) -> dict[str, float]:
        """`updated_fraction`: fragments updated by the last step; with distance=True also
        `distance`: ‖ξ − θ‖ / ‖θ‖ over all parameters. Reads device values (a sync): call it to log."""
        out: dict[str, float] = {"steps": float(self.steps)}
        if self.steps:
            out["updated_fraction"] = self._plan.updated_count() / max(self._plan.n_frag, 1)
            out["momentum"] = float(self._last_momentum)
        if distance:
            t, s = self._plan.teacher, self._plan.student
            num = sum(float(n) ** 2 for n in torch._foreach_norm(torch._foreach_sub(s, t)))
            den = sum(float(n) ** 2 for n in torch._foreach_norm(s))
            out["distance"] = math.sqrt(num / max(den, 1e-24))
        return out
