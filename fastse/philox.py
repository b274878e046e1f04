"""Counter-based random numbers (Philox4x32-10) in plain torch ops, bit-identical to the Triton kernel.

The smoothing masks are a pure function of (key, fragment index): fragment f takes the 16-bit half
f % 8 of the four 32-bit words of Philox4x32-10 with counter (f // 8, 0, 0, 0) and a 64-bit key, as
u_f = half / 65536 (keep_prob resolves to 1/65536). So every DDP rank, a resumed run and
the CPU and GPU code paths draw the same mask with no communication and no generator state.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox multipliers (Salmon et al. 2011)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
ROUNDS = 10


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit integer from any 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def step_key(seed: int, step: int) -> int:
    """The 64-bit Philox key of optimizer step `step` of a run seeded with `seed` (host integers only)."""
    return splitmix64(splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ (step & 0xFFFFFFFFFFFFFFFF))


def _mul_(a: torch.Tensor, b: int) -> None:
    """a <- a * b mod 2^64 in place, for int64 a in [0, 2^32) and a 32-bit constant b: the product's low word
    lands in bits 0-31 and its high word in bits 32-63. Unsigned arithmetic where torch has it (CPU); CUDA builds
    have no uint64 multiply, and their int64 multiply wraps modulo 2^64, which gives the same bits."""
    if a.device.type == "cpu":
        a.view(torch.uint64).mul_(b)
    else:
        a.mul_(b)


def _words(key: int, counter: torch.Tensor, rounds: int) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32 with counters (counter, 0, 0, 0): int64 tensors [n], ten in-place ops
    per round on five buffers. Words 0 and 2 are in [0, 2^32); words 1 and 3 carry junk above bit 31."""
    c0 = counter & _M32
    c1 = counter >> 32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    spare = torch.empty_like(counter)
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(rounds):
        _mul_(c2, _ROUND_B)
        _mul_(c0, _ROUND_A)
        torch.bitwise_right_shift(c2, 32, out=spare)  # high word (sign junk above bit 31, masked off below)
        spare.bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_M32)
        torch.bitwise_right_shift(c0, 32, out=c1)
        c1.bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_M32)
        # (hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a); the old c3 buffer is free again
        c0, c1, c2, c3, spare = spare, c2, c1, c0, c3
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox4x32(key: int, counter: torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """Philox4x32 of counters (counter, 0, 0, 0): int64 tensor [n] -> int64 tensor [n, 4] of uint32 values."""
    return torch.stack(_words(key, counter, rounds), dim=1) & _M32


def draws_at_least(key: int, counter: torch.Tensor, threshold: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Whether the 16-bit draw of each fragment 8c .. 8c+7 of each counter c is >= `threshold`: bool [n, 8]
    (`out` if given), in fragment order. The comparison behind u_f >= p is d_f >= ceil(65536 p)."""
    flags = torch.empty(counter.numel(), 4, 2, dtype=torch.bool, device=counter.device) if out is None \
        else out.view(-1, 4, 2)
    for j, word in enumerate(_words(key, counter, ROUNDS)):
        torch.ge(word & 0xFFFF, threshold, out=flags[:, j, 0])
        torch.ge(word.bitwise_and_(0xFFFF0000), threshold << 16, out=flags[:, j, 1])
    return flags.view(-1, 8)


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform float32 in [0, 1) with 16-bit resolution for fragments start .. start+count-1: [count].

    Fragment f's value is word (f % 8) // 2 of Philox(counter f // 8), its low 16 bits for even f and
    its high 16 bits for odd f, divided by 65536.
    """
    if count == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    first, last = start >> 3, (start + count - 1) >> 3
    counters = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox4x32(key, counters)  # [n, 4]
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=2).reshape(-1)  # [n * 8], f % 8 order
    lo = start - 8 * first
    return halves[lo : lo + count].to(torch.float32) * (1.0 / 65536)
