"""Fused CUDA kernels for the teacher update: one launch over every tensor of a (device, dtype) group.

A table of tensors (teacher and student data pointers, sizes, fragment bases) and a table of chunks
(which tensor and element offset each program handles) are built once; each program streams BLOCK
elements. Masks come from Philox4x32-10 computed in-kernel with the counters of `fastse.philox`, so
the result is bit-identical to the torch path. Imported only where a CUDA group exists.
"""

from __future__ import annotations

import triton
import triton.language as tl

RULE_EMA, RULE_SE, RULE_STS = 0, 1, 2
GRAN_TENSOR, GRAN_CHANNEL, GRAN_ELEMENT = 0, 1, 2
BLOCK = 4096
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
    RULE: tl.constexpr, GRAN: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One program = BLOCK elements of one tensor. weight = 1 - momentum (the lerp weight).

    Kept fragments are not written; at tensor and channel granularity they are not read either."""
    pid = tl.program_id(0)
    if RULE != 0 and pid == 0:
        tl.store(count_ptr + 1 - slot, 0)
    chunk = tl.load(chunk_ptr + pid)
    row = meta_ptr + (chunk >> 40) * 5
    start = tl.multiple_of(chunk & 0xFFFFFFFFFF, BLOCK)
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
        if start == 0:
            tl.atomic_add(count_ptr + slot, 1)
    offs = start + tl.arange(0, BLOCK)
    m = offs < n
    if RULE != 0 and GRAN == 1:  # channel: only the updated channels' bytes move
        m = m & (tl.load(update_ptr + fb + offs // tl.load(row + 4), mask=m, other=0) != 0)
    if RULE != 0 and GRAN == 2:  # element: Philox in-kernel, 8 fragments of 16 bits per counter
        ctr = (fb + start) // 8 + tl.arange(0, BLOCK // 8)
        r0, r1, r2, r3 = _philox(key, ctr)
        # element 8c + h takes half h % 2 of word h // 2 of counter c: build [BLOCK/8, 2, 2, 2] = (a, b, half)
        lo = tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF))
        hi = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
        bits = tl.reshape(tl.join(lo, hi), (BLOCK,))
        upd = (_u16(bits) >= keep_prob) & m
        tl.atomic_add(count_ptr + slot, tl.sum(upd.to(tl.int64)))
        m = upd
    s = tl.load(s_ptr + offs, mask=m)
    if RULE == 1:
        tl.store(t_ptr + offs, s, mask=m)
    else:  # torch.lerp's formula, so the result is bit-identical to torch._foreach_lerp_
        t = tl.load(t_ptr + offs, mask=m).to(tl.float32)
        s = s.to(tl.float32)
        new = tl.where(weight < 0.5, t + weight * (s - t), s - (s - t) * (1.0 - weight))
        tl.store(t_ptr + offs, new.to(DTYPE), mask=m)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
