"""Forward FLOPs of a model, counted by torch's ``FlopCounterMode`` (for model tables and MFU).

torch counts 2 FLOPs per multiply-add; papers that report "Gflops" as multiply-adds (DiT's
Table 4) are half of :func:`forward_flops`. Counts are by formula from tensor shapes, so a
model on the ``meta`` device (no memory, no arithmetic) gives the same number as a real one.

torch 2.14 has no formula for ``aten._scaled_dot_product_flash_attention_for_cpu``, the
kernel ``F.scaled_dot_product_attention`` runs on CPU tensors: without one, attention on the
CPU would count zero. Importing this module registers torch's own SDPA formulas (2 batched
matmuls forward, 5 backward) for it and its backward.
"""
import torch
from torch.utils import flop_counter

_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape,
                                       *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape,
                                                 value_shape)


# A later torch may bring its own formulas: keep those.
if _CPU_FLASH not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_CPU_FLASH)(_cpu_flash_attention_flop)
if _CPU_FLASH_BACKWARD not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_CPU_FLASH_BACKWARD)(_cpu_flash_attention_backward_flop)


def forward_flops(model, *args, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of one ``model(*args, **kwargs)`` call without gradients."""
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()
