"""The dtype table and the true-FP32 context."""

from __future__ import annotations

import pytest
import torch

from evalsuite.errors import UsageError
from evalsuite.model.precision import DTYPES, exact_fp32, numeric_flags, parse_dtype, unsupported_reason


def test_table_ranges_come_from_the_hardware_definition():
    assert DTYPES["fp16"].finite_max == 65504.0
    assert DTYPES["fp16"].smallest_subnormal == 2.0**-24
    assert DTYPES["bf16"].finite_max == pytest.approx(3.3895313892515355e38)
    assert DTYPES["bf16"].smallest_normal == torch.finfo(torch.float32).tiny  # FP32's exponent range
    assert DTYPES["fp32"].dtype is torch.float32


@pytest.mark.parametrize("name", ["FP16", " bf16", "fp32"])
def test_parse_is_case_and_space_tolerant(name):
    assert parse_dtype(name).name == name.strip().lower()


def test_unknown_dtype_names_the_valid_choices():
    with pytest.raises(UsageError, match="fp32, fp16, bf16"):
        parse_dtype("int8")


def test_cpu_runs_every_dtype():
    assert all(unsupported_reason(p, torch.device("cpu")) is None for p in DTYPES.values())


def test_exact_fp32_sets_and_restores_flags():
    before = numeric_flags()
    with exact_fp32() as flags:
        assert flags["cuda_matmul_allow_tf32"] is False and flags["cudnn_allow_tf32"] is False
        assert flags["cuda_matmul_allow_fp16_reduced_precision_reduction"] is False
        assert flags["cuda_matmul_allow_bf16_reduced_precision_reduction"] is False
    assert numeric_flags() == before
