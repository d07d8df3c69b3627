"""Numeric precision of expert weights and of the tokens on the wire."""

import enum


class Precision(str, enum.Enum):
    """`fp32`: exact; `bf16`: bfloat16; `fp8`: float8_e4m3fn with 128-block float32 scales."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"

    def __str__(self) -> str:
        return self.value
