"""Bit-level comparison of float tensors, shared by the test modules (and by test_triton.py's child
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
