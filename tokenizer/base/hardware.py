"""What this machine's CPU runs natively, for the stages that choose a precision by it."""

import torch


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (emulated bf16 is far slower)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512_BF16" in capability or "AMX" in capability
