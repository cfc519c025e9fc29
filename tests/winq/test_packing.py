"""GPTQ bit packing: round trips for every width and odd shapes, and the documented 3-bit layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winq.errors import WinqError
from winq.packing import PACK_BITS, pack, pad_to_period, period, unpack


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from(PACK_BITS), periods=st.integers(1, 5), cols=st.integers(1, 7), dim=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**16))
def test_unpack_pack_roundtrip(bits, periods, cols, dim, seed):
    g = torch.Generator().manual_seed(seed)
    K = periods * period(bits)
    shape = (K, cols) if dim == 0 else (cols, K)
    q = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    w = pack(q, bits, dim)
    assert w.dtype == torch.int32 and w.shape[dim] == K * bits // 32
    assert torch.equal(unpack(w, bits, dim), q)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(PACK_BITS), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_odd_lengths_pad_then_roundtrip(bits, k, seed):
    q = torch.randint(0, 2**bits, (k, 3), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    p = pad_to_period(q, bits)
    assert p.shape[0] % period(bits) == 0 and torch.equal(p[:k], q) and not p[k:].any()
    assert torch.equal(unpack(pack(p, bits), bits)[:k], q)


def test_bitstream_layout_by_hand():
    # 4-bit: value j of a word at bits 4j
    q = torch.arange(8, dtype=torch.uint8)[:, None]
    assert pack(q, 4)[0, 0].item() == sum(j << (4 * j) for j in range(8))
    # 3-bit: code 10 straddles words 0/1, code 21 words 1/2 (GPTQ's layout)
    q = torch.zeros(32, 1, dtype=torch.uint8)
    q[10] = 0b111
    w = pack(q, 3)[:, 0].to(torch.int64) & 0xFFFFFFFF
    assert w.tolist() == [0b11 << 30, 0b1, 0]
    q = torch.zeros(32, 1, dtype=torch.uint8)
    q[21] = 0b101
    w = pack(q, 3)[:, 0].to(torch.int64) & 0xFFFFFFFF
    assert w.tolist() == [0, 1 << 31, 0b10]
    q = torch.zeros(32, 1, dtype=torch.uint8)
    q[22] = 0b111
    assert (pack(q, 3)[2, 0].item() & 0xFFFFFFFF) == 0b111 << 2
    # the sign bit is used: the top 2-bit code of a word lands in bits 30-31
    q = torch.zeros(16, 1, dtype=torch.uint8)
    q[15] = 3
    assert pack(q, 2)[0, 0].item() == -(2**30)


def test_errors():
    with pytest.raises(WinqError, match="multiple of 8"):
        pack(torch.zeros(5, 2, dtype=torch.uint8), 4)
    with pytest.raises(WinqError, match="out of range"):
        pack(torch.full((8, 1), 16, dtype=torch.uint8), 4)
    with pytest.raises(WinqError, match="supported widths"):
        pack(torch.zeros(8, 1, dtype=torch.uint8), 5)
