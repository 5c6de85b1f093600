"""flop_counter and the FLOP formulas this package adds for torch's CPU flash-attention kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils import flop_counter as flop_counter_module
from torch.utils.flop_counter import FlopCounterMode

from peft_safe.measure import flop_counter, register_cpu_attention_flop_formulas

CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
CPU_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def count_flops(fn, *args, **kwargs):
    """(fn's result, FLOPs) under the package's counter."""
    with flop_counter() as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


def _attention_inputs(batch=2, heads=3, s_q=5, s_k=6, d_qk=4, d_v=4, requires_grad=True):
    # torch picks the CPU flash kernel only when query, key and value share one head size; otherwise it
    # falls back to the math path (plain bmm, which torch counts already).
    torch.manual_seed(0)
    query = torch.randn(batch, heads, s_q, d_qk, requires_grad=requires_grad)
    key = torch.randn(batch, heads, s_k, d_qk, requires_grad=requires_grad)
    value = torch.randn(batch, heads, s_k, d_v, requires_grad=requires_grad)
    return query, key, value


def test_linear_forward_is_two_flops_per_multiply_add():
    batch, d_in, d_out = 3, 5, 7
    layer = torch.nn.Linear(d_in, d_out)
    out, flops = count_flops(layer, torch.randn(batch, d_in))
    assert out.shape == (batch, d_out)
    assert flops == 2 * batch * d_in * d_out


def test_cpu_sdpa_forward_counts_like_the_explicit_math():
    batch, heads, s_q, s_k, d_qk, d_v = 2, 3, 5, 6, 8, 8
    query, key, value = _attention_inputs(batch, heads, s_q, s_k, d_qk, d_v, requires_grad=False)

    with flop_counter() as counter:
        fused = F.scaled_dot_product_attention(query, key, value)
    scores_flops = 2 * batch * heads * s_q * s_k * d_qk  # Q K^T
    mix_flops = 2 * batch * heads * s_q * s_k * d_v  # P V
    assert counter.get_flop_counts()["Global"] == {CPU_FLASH: scores_flops + mix_flops}

    def explicit(q, k, v):
        weights = torch.softmax(q @ k.transpose(-2, -1) / d_qk**0.5, dim=-1)
        return weights @ v

    reference, explicit_flops = count_flops(explicit, query, key, value)
    assert explicit_flops == scores_flops + mix_flops
    torch.testing.assert_close(fused, reference)


def test_cpu_sdpa_backward_is_counted():
    batch, heads, s_q, s_k, d_qk, d_v = 2, 3, 5, 6, 8, 8
    query, key, value = _attention_inputs(batch, heads, s_q, s_k, d_qk, d_v)
    out = F.scaled_dot_product_attention(query, key, value)
    with flop_counter() as counter:
        out.sum().backward()
    # Flash backward recomputes Q K^T, then dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q.
    expected = 2 * batch * heads * (
        s_q * s_k * d_qk  # recompute Q K^T
        + s_q * s_k * d_v  # dO V^T
        + s_q * s_k * d_v  # P^T dO
        + s_q * s_k * d_qk  # dS K
        + s_q * s_k * d_qk  # dS^T Q
    )
    assert counter.get_flop_counts()["Global"] == {CPU_FLASH_BACKWARD: expected}
    assert query.grad is not None and key.grad is not None and value.grad is not None


def test_flop_counter_registers_the_cpu_formulas_once_and_torch_alone_counts_nothing(monkeypatch):
    monkeypatch.delitem(flop_counter_module.flop_registry, CPU_FLASH, raising=False)
    monkeypatch.delitem(flop_counter_module.flop_registry, CPU_FLASH_BACKWARD, raising=False)
    query, key, value = _attention_inputs(requires_grad=False)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(query, key, value)
    assert plain.get_total_flops() == 0  # torch alone counts nothing

    assert count_flops(F.scaled_dot_product_attention, query, key, value)[1] > 0  # flop_counter registered them
    formula = flop_counter_module.flop_registry[CPU_FLASH]
    assert register_cpu_attention_flop_formulas() == []  # already there: a no-op
    assert flop_counter_module.flop_registry[CPU_FLASH] is formula


def test_registration_from_scratch_names_the_kernels(monkeypatch):
    monkeypatch.delitem(flop_counter_module.flop_registry, CPU_FLASH, raising=False)
    monkeypatch.delitem(flop_counter_module.flop_registry, CPU_FLASH_BACKWARD, raising=False)
    assert sorted(register_cpu_attention_flop_formulas()) == sorted([str(CPU_FLASH), str(CPU_FLASH_BACKWARD)])


# ---------------------------------------------------------------------------------------------- bitsandbytes 4-bit
def _four_bit_linear(weight: torch.Tensor, packed_for_cpu: bool):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    layer.support_avx512bf16_for_cpu = packed_for_cpu
    return layer.eval()


def _dense_flops(rows: int, weight: torch.Tensor, backward: bool = False) -> int:
    dense = torch.nn.Linear(weight.shape[1], weight.shape[0])
    dense.weight.requires_grad_(False)
    dense.bias.requires_grad_(False)
    x = torch.randn(rows, weight.shape[1], requires_grad=backward)
    with flop_counter() as counter:
        out = dense(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def test_the_4bit_matmul_kernel_counts_as_the_dense_matmul_it_computes():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_f

    weight = torch.randn(64, 128)
    packed, state = bnb_f.quantize_4bit(weight, quant_type="nf4")
    for rows in (1, 5):
        a = torch.randn(rows, 128)
        with flop_counter() as counter:
            torch.ops.bitsandbytes.gemv_4bit(a, packed, [64, 128], state.absmax, state.code, state.blocksize)
        assert counter.get_total_flops() == 2 * rows * 64 * 128 == _dense_flops(rows, weight)


def test_a_4bit_layer_counts_what_a_dense_layer_counts_in_training_and_in_no_grad_forwards(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    weight = torch.randn(64, 128)
    layer = _four_bit_linear(weight, packed_for_cpu=False)
    x = torch.randn(5, 128, requires_grad=True)
    with flop_counter() as counter:  # a training step: dequantize, then aten's matmuls
        layer(x).sum().backward()
    assert counter.get_total_flops() == _dense_flops(5, weight, backward=True)
    if not has_avx512bf16():
        return  # the no-grad kernel below is the repacked CPU one; GPUs reach it for single rows only
    packed = _four_bit_linear(weight, packed_for_cpu=True)
    with torch.no_grad(), flop_counter() as counter:
        packed(torch.randn(5, 128))
    assert counter.get_total_flops() == _dense_flops(5, weight)
    monkeypatch.delitem(flop_counter_module.flop_registry, torch.ops.bitsandbytes.gemv_4bit)
    with torch.no_grad(), FlopCounterMode(display=False) as bare:
        packed(torch.randn(5, 128))
    assert bare.get_total_flops() == 0  # what torch alone counts: the formula is what makes it dense
