"""Fused CUDA kernels for the teacher update: one launch over every tensor of a (device, dtype) group.

A table of tensors (teacher and student data pointers, sizes, fragment bases) and a table of chunks
(which tensor and element offset each program handles) are built once; each program streams BLOCK
elements. Masks come from Philox4x32-10 computed in-kernel with the counters of `fastse.philox`, so
the result is bit-identical to the torch path. Imported only where a CUDA group exists.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

RULE_EMA, RULE_SE, RULE_STS = 0, 1, 2
GRAN_TENSOR, GRAN_CHANNEL, GRAN_ELEMENT = 0, 1, 2
BLOCK = int(os.environ.get("FASTSE_SMOOTH_BLOCK", 4096))  # elements per inner step (tuned on H100)
GROUP = int(os.environ.get("FASTSE_SMOOTH_GROUP", 1))  # inner steps per program
WARPS = int(os.environ.get("FASTSE_SMOOTH_WARPS", 8))
CHUNK_SHIFT = 40  # chunk = tensor index << 40 | element offset
META = 5  # per tensor: teacher ptr, student ptr, numel, first fragment, elements per fragment


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


@triton.jit(do_not_specialize=["n_frag", "key", "keep_prob", "slot"])
def fragment_mask_kernel(update_ptr, count_ptr, n_frag, key, keep_prob, slot, BLOCK8: tl.constexpr):
    """update[f] = (u_f >= keep_prob) for fragments f < n_frag (int8); count[slot] += #updated."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(count_ptr + 1 - slot, 0)
    ctr = pid.to(tl.int64) * BLOCK8 + tl.arange(0, BLOCK8)
    r0, r1, r2, r3 = _philox(key, ctr)
    f = ctr * 8
    total = _mark(update_ptr, f, r0, n_frag, keep_prob) + _mark(update_ptr, f + 2, r1, n_frag, keep_prob)
    total += _mark(update_ptr, f + 4, r2, n_frag, keep_prob) + _mark(update_ptr, f + 6, r3, n_frag, keep_prob)
    tl.atomic_add(count_ptr + slot, total)


@triton.jit(do_not_specialize=["n_frag", "key", "keep_prob", "slot"])
def element_mask_kernel(bits_ptr, count_ptr, n_frag, key, keep_prob, slot, BLOCK: tl.constexpr):
    """bits[c] bit j = (u_{8c+j} >= keep_prob) for fragments 8c+j < n_frag (uint8); count[slot] += #updated."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(count_ptr + 1 - slot, 0)
    ctr = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = _philox(key, ctr)
    b = _pair(r0, keep_prob) | (_pair(r1, keep_prob) << 2) | (_pair(r2, keep_prob) << 4) | (_pair(r3, keep_prob) << 6)
    b = b & ((1 << tl.minimum(tl.maximum(n_frag - ctr * 8, 0), 8)) - 1)  # no bits past the last fragment
    tl.store(bits_ptr + ctr, b.to(tl.uint8), mask=ctr * 8 < n_frag)
    ones = (b & 0x55) + ((b >> 1) & 0x55)
    ones = (ones & 0x33) + ((ones >> 2) & 0x33)
    ones = (ones & 0x0F) + (ones >> 4)
    tl.atomic_add(count_ptr + slot, tl.sum(ones.to(tl.int64)))


@triton.jit
def _pair(word, keep_prob):
    """2 update bits of one 32-bit word: bit 0 from its low half, bit 1 from its high half."""
    return (_u16(word) >= keep_prob).to(tl.int32) | ((_u16(word >> 16) >= keep_prob).to(tl.int32) << 1)


@triton.jit
def _mark(update_ptr, f, word, n_frag, keep_prob):
    """Store the update flags of fragments f (low half of word) and f + 1 (high half); count them."""
    lo = (_u16(word) >= keep_prob) & (f < n_frag)
    hi = (_u16(word >> 16) >= keep_prob) & (f + 1 < n_frag)
    tl.store(update_ptr + f, lo.to(tl.int8), mask=f < n_frag)
    tl.store(update_ptr + f + 1, hi.to(tl.int8), mask=f + 1 < n_frag)
    return tl.sum(lo.to(tl.int64)) + tl.sum(hi.to(tl.int64))


@triton.jit(do_not_specialize=["key", "keep_prob", "weight", "slot"])
def smooth_kernel(
    meta_ptr, chunk_ptr, update_ptr, count_ptr, key, keep_prob, weight, slot,
    RULE: tl.constexpr, GRAN: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """One program = GROUP x BLOCK elements of one tensor. weight = 1 - momentum (the lerp weight).

    Elements are handled as [BLOCK / 8, 8] tiles. Kept tensors and channels are not read or written;
    kept elements are rewritten with their old value (a full store beats a partial one). Channel and
    element masks come from a pre-pass (`fragment_mask_kernel`, `element_mask_kernel`)."""
    pid = tl.program_id(0)
    if RULE != 0 and pid == 0:
        tl.store(count_ptr + 1 - slot, 0)
    chunk = tl.load(chunk_ptr + pid)
    row = meta_ptr + (chunk >> 40) * 5
    first = tl.multiple_of(chunk & 0xFFFFFFFFFF, BLOCK)
    t_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    s_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    n = tl.load(row + 2)
    fb = tl.load(row + 3)
    if ALIGNED:
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    if RULE != 0 and GRAN == 0:  # the whole tensor is one fragment: draw it here, skip if kept
        r0, r1, r2, r3 = _philox(key, fb >> 3)
        h = fb & 7
        word = tl.where(h < 4, tl.where(h < 2, r0, r1), tl.where(h < 6, r2, r3))
        if _u16(word >> (16 * (h & 1)).to(tl.uint32)) < keep_prob:
            return
        if first == 0:
            tl.atomic_add(count_ptr + slot, 1)
    rows = tl.arange(0, BLOCK // 8)
    cols = tl.arange(0, 8)
    for g in tl.static_range(GROUP):
        start = first + g * BLOCK
        offs = start + rows[:, None] * 8 + cols[None, :]
        m = offs < n
        if RULE != 0 and GRAN == 1:  # channel: only the updated channels' bytes move
            m = m & (tl.load(update_ptr + fb + offs // tl.load(row + 4), mask=m, other=0) != 0)
        s = tl.load(s_ptr + offs, mask=m)
        if RULE == 1 and GRAN != 2:
            tl.store(t_ptr + offs, s, mask=m)
        else:
            t = tl.load(t_ptr + offs, mask=m)
            if RULE == 1:
                new = s.to(tl.float32)
            else:  # torch.lerp's formula, so the result is bit-identical to torch._foreach_lerp_
                tf = t.to(tl.float32)
                sf = s.to(tl.float32)
                new = tl.where(weight < 0.5, tf + weight * (sf - tf), sf - (sf - tf) * (1.0 - weight))
            if RULE != 0 and GRAN == 2:  # element: bit f % 8 of byte f // 8 (from the pre-pass)
                f = fb + offs
                upd = (((tl.load(update_ptr + f // 8, mask=m, other=0).to(tl.int32) >> (f & 7)) & 1) != 0) & m
                new = tl.where(upd, new, t.to(tl.float32))
            tl.store(t_ptr + offs, new.to(DTYPE), mask=m)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
