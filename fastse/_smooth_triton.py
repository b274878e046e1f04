"""Fused CUDA kernels for the teacher update: one launch over every tensor of a (device, dtype) group.

A chunk table (per program: teacher and student data pointers, size, first fragment, element offset)
is built once; each program streams one block of one tensor. Masks come from Philox4x32-10 with the
counters of `fastse.philox`, so the result is bit-identical to the torch path. Imported only where a
CUDA group exists.
"""

from __future__ import annotations

import triton
import triton.language as tl

# (elements per program, warps) by granularity, tuned on an H100 (docs/BENCHMARKS.md): larger blocks
# at tensor granularity mean fewer programs that only find their tensor kept and exit.
LAUNCH = {"tensor": (2048, 4), "channel": (1024, 4), "element": (1024, 4)}


@triton.jit
def _philox(key, ctr):
    """Philox4x32-10 of counters (ctr low 32 bits, ctr high 32 bits, 0, 0) with a 64-bit key."""
    c0 = ctr.to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    zero = c0 * 0
    return tl.philox(key, c0, c1, zero, zero)


@triton.jit
def _u16(x):
    return (x & 0xFFFF).to(tl.float32) * (1.0 / 65536.0)


@triton.jit(do_not_specialize=["n_frag", "key", "keep_prob"])
def channel_mask_kernel(update_ptr, partial_ptr, n_frag, key, keep_prob, BLOCK8: tl.constexpr):
    """update[f] = (u_f >= keep_prob) for fragments f < n_frag (int8); partial[pid] = #updated here."""
    pid = tl.program_id(0)
    ctr = pid.to(tl.int64) * BLOCK8 + tl.arange(0, BLOCK8)
    r0, r1, r2, r3 = _philox(key, ctr)
    f = ctr * 8
    total = _mark(update_ptr, f, r0, n_frag, keep_prob) + _mark(update_ptr, f + 2, r1, n_frag, keep_prob)
    total += _mark(update_ptr, f + 4, r2, n_frag, keep_prob) + _mark(update_ptr, f + 6, r3, n_frag, keep_prob)
    tl.store(partial_ptr + pid, total)


@triton.jit
def _mark(update_ptr, f, word, n_frag, keep_prob):
    """Store the update flags of fragments f (low half of word) and f + 1 (high half); count them."""
    lo = (_u16(word) >= keep_prob) & (f < n_frag)
    hi = (_u16(word >> 16) >= keep_prob) & (f + 1 < n_frag)
    tl.store(update_ptr + f, lo.to(tl.int8), mask=f < n_frag)
    tl.store(update_ptr + f + 1, hi.to(tl.int8), mask=f + 1 < n_frag)
    return tl.sum(lo.to(tl.int32)) + tl.sum(hi.to(tl.int32))


@triton.jit
def _draw(key, f, keep_prob):
    """True where fragment f (int64) is updated: u_f >= keep_prob, u_f from half f % 8 of Philox(f // 8)."""
    r0, r1, r2, r3 = _philox(key, f >> 3)
    h = f & 7
    word = tl.where(h < 4, tl.where(h < 2, r0, r1), tl.where(h < 6, r2, r3))
    return _u16(word >> (16 * (h & 1)).to(tl.uint32)) >= keep_prob


@triton.jit(do_not_specialize=["key", "keep_prob", "weight"])
def smooth_kernel(
    chunk_ptr, update_ptr, partial_ptr, key, keep_prob, weight,
    RULE: tl.constexpr, GRAN: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COUNT_ONLY: tl.constexpr,
):
    """One program = BLOCK elements of one tensor (a row of the chunk table). weight = 1 - momentum.

    Chunk row pid (6 x int64): teacher ptr, student ptr, numel, first fragment, element offset,
    elements per fragment; one level of indirection, so a program's loads start early. Tensor and
    element masks are drawn in-kernel (the Philox work hides under the memory traffic); channel masks
    come from `channel_mask_kernel`. Kept tensors and channels are neither read nor written; kept
    elements are rewritten with their old value (full vector stores beat predicated ones). partial[pid]
    gets the fragments this program updated: at tensor granularity always, at element granularity only
    in the COUNT_ONLY variant, which moves no data (run on demand by `stats()`)."""
    pid = tl.program_id(0)
    row = chunk_ptr + pid.to(tl.int64) * 6
    t_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    s_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    n = tl.load(row + 2)
    fb = tl.load(row + 3)
    start = tl.multiple_of(tl.load(row + 4), BLOCK)
    if GRAN == 2:
        fb = tl.multiple_of(fb, 8)  # element fragments of a tensor start 8-aligned: one counter per 8
    if ALIGNED:
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    if RULE != 0 and GRAN == 0:  # the whole tensor is one fragment: skip it if kept
        update = _draw(key, fb, keep_prob)
        tl.store(partial_ptr + pid, (update & (start == 0)).to(tl.int32))
        if not update:
            return
    offs = start + tl.arange(0, BLOCK)
    m = offs < n
    if COUNT_ONLY:
        tl.store(partial_ptr + pid, tl.sum((_draw_block(key, fb + offs, keep_prob) & m).to(tl.int32)))
        return
    if start + BLOCK <= n:  # a full block: no bounds mask, so loads and stores stay vectorized
        _update(t_ptr, s_ptr, offs, m, update_ptr, fb, row, key, keep_prob, weight, RULE, GRAN, DTYPE, False)
    else:
        _update(t_ptr, s_ptr, offs, m, update_ptr, fb, row, key, keep_prob, weight, RULE, GRAN, DTYPE, True)


@triton.jit
def _draw_block(key, f, keep_prob):
    """_draw for a flat block f = f0 + arange(B), f0 % 8 == 0, with one Philox call per 8 elements:
    the 8 flags of counter c are joined so that element 8c + j gets half j % 2 of word j // 2."""
    B: tl.constexpr = f.shape[0]
    c = tl.min(tl.reshape(f, (B // 8, 8), can_reorder=False), axis=1) >> 3
    r0, r1, r2, r3 = _philox(key, c)
    lo = tl.join(tl.join(_u16(r0) >= keep_prob, _u16(r2) >= keep_prob),
                 tl.join(_u16(r1) >= keep_prob, _u16(r3) >= keep_prob))
    hi = tl.join(tl.join(_u16(r0 >> 16) >= keep_prob, _u16(r2 >> 16) >= keep_prob),
                 tl.join(_u16(r1 >> 16) >= keep_prob, _u16(r3 >> 16) >= keep_prob))
    return tl.reshape(tl.join(lo, hi), (B,), can_reorder=False)


@triton.jit
def _update(t_ptr, s_ptr, offs, m, update_ptr, fb, row, key, keep_prob, weight,
            RULE: tl.constexpr, GRAN: tl.constexpr, DTYPE: tl.constexpr, BOUNDED: tl.constexpr):
    if RULE != 0 and GRAN == 1:  # channel: only the updated channels' bytes move
        m = m & (tl.load(update_ptr + fb + offs // tl.load(row + 5), mask=m, other=0) != 0)
    if BOUNDED or (RULE != 0 and GRAN == 1):
        s = tl.load(s_ptr + offs, mask=m)
    else:
        s = tl.load(s_ptr + offs)
    if RULE == 1 and GRAN != 2:
        if BOUNDED or (RULE != 0 and GRAN == 1):
            tl.store(t_ptr + offs, s, mask=m)
        else:
            tl.store(t_ptr + offs, s)
    else:
        if BOUNDED or (RULE != 0 and GRAN == 1):
            t = tl.load(t_ptr + offs, mask=m)
        else:
            t = tl.load(t_ptr + offs)
        if RULE == 1:
            new = s.to(tl.float32)
        else:  # torch.lerp's formula, so the result is bit-identical to torch._foreach_lerp_
            tf = t.to(tl.float32)
            sf = s.to(tl.float32)
            new = tl.where(weight < 0.5, tf + weight * (sf - tf), sf - (sf - tf) * (1.0 - weight))
        if RULE != 0 and GRAN == 2:
            new = tl.where(_draw_block(key, fb + offs, keep_prob), new, t.to(tl.float32))
        if BOUNDED or (RULE != 0 and GRAN == 1):
            tl.store(t_ptr + offs, new.to(DTYPE), mask=m)
        else:
            tl.store(t_ptr + offs, new.to(DTYPE))
