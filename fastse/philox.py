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


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a in [0, 2^32) held in int64 and a 32-bit constant b."""
    t1 = a * (b & 0xFFFF)
    t2 = a * (b >> 16)
    s = t1 + ((t2 & 0xFFFF) << 16)
    return (t2 >> 16) + (s >> 32), s & _M32


def philox4x32(key: int, counter: torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """Philox4x32 of counters (counter, 0, 0, 0): int64 tensor [n] -> int64 tensor [n, 4] of uint32 values."""
    c0 = counter & _M32
    c1 = counter >> 32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return torch.stack((c0, c1, c2, c3), dim=1)


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
