"""Bit-level comparison of float tensors and random seed bit patterns, shared by the test modules (and by test_triton.py's child
process, which runs from this folder)."""
import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (int32 for float32, int16 for bfloat16 / float16), on the CPU."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN equals any NaN (payloads are not specified)."""
    na, nb = torch.isnan(a.detach().cpu().float()), torch.isnan(b.detach().cpu().float())
    return torch.equal(na, nb) and torch.equal(bits(a)[~na], bits(b)[~nb])


def random_seeds(gen: torch.Generator, k: int) -> torch.Tensor:
    """K random seeds as an int64 tensor of uint64 bit patterns, the extreme patterns (all ones, all
    zeros) first when K >= 2."""
    s = torch.randint(-2**63, 2**63 - 1, (k,), dtype=torch.int64, generator=gen)
    if k >= 2:
        s[0], s[1] = -1, 0
    return s
