"""Layout contracts of the ``torch._scaled_mm`` calls of ``QuantizedLinear`` (``layout.py``).

``linear.py`` enforces them at each call; ``inspect`` / the layout tests read them here (or as
``quant.linear.SCALED_MM_CONTRACT``).
"""

from __future__ import annotations

import torch

from ..layout import LayoutContract, Operand, StrideRule
from . import fp8

_F32 = torch.float32
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

SCALED_MM_CONTRACT = LayoutContract(
    "torch._scaled_mm[fp8, row-wise scales]",
    (
        Operand(
            "mat1",
            dtypes=(fp8.ACT_DTYPE,),
            ndim=2,
            stride=StrideRule.ROW_MAJOR,
            align=16,
            divisible=((1, 16),),
        ),
        Operand(
            "mat2",
            dtypes=fp8.FP8_DTYPES,
            ndim=2,
            stride=StrideRule.COL_MAJOR,
            align=16,
            divisible=((0, 16), (1, 16)),
        ),
        Operand("scale_a", dtypes=(_F32,), ndim=2, stride=StrideRule.CONTIGUOUS),
        Operand("scale_b", dtypes=(_F32,), ndim=2, stride=StrideRule.CONTIGUOUS),
        Operand("bias", dtypes=_FLOAT_DTYPES, ndim=1, stride=StrideRule.CONTIGUOUS, optional=True),
    ),
)
SCALED_MM_TENSORWISE_CONTRACT = LayoutContract(
    "torch._scaled_mm[fp8, tensor-wise scales]",
    (
        Operand(
            "mat1",
            dtypes=(fp8.ACT_DTYPE,),
            ndim=2,
            stride=StrideRule.ROW_MAJOR,
            align=16,
            divisible=((1, 16),),
        ),
        Operand(
            "mat2",
            dtypes=fp8.FP8_DTYPES,
            ndim=2,
            stride=StrideRule.COL_MAJOR,
            align=16,
            divisible=((0, 16), (1, 16)),
        ),
        Operand("scale_a", dtypes=(_F32,), ndim=0),
        Operand("scale_b", dtypes=(_F32,), ndim=0),
    ),
)
_FP4_X2 = getattr(torch, "float4_e2m1fn_x2", None)
FP4_MM_CONTRACT = LayoutContract(
    "torch._scaled_mm[nvfp4, block scales]",
    (
        Operand(
            "mat1",
            dtypes=(_FP4_X2,) if _FP4_X2 else None,
            ndim=2,
            stride=StrideRule.ROW_MAJOR,
            align=16,
            divisible=((1, 16),),
        ),
        Operand(
            "mat2",
            dtypes=(_FP4_X2,) if _FP4_X2 else None,
            ndim=2,
            stride=StrideRule.COL_MAJOR,
            align=16,
            divisible=((0, 16), (1, 16)),
        ),
        Operand("scale_a", dtypes=(torch.float8_e4m3fn,), ndim=1, stride=StrideRule.CONTIGUOUS),
        Operand("scale_b", dtypes=(torch.float8_e4m3fn,), ndim=1, stride=StrideRule.CONTIGUOUS),
    ),
)
