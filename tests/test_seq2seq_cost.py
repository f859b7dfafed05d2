"""The chunked symmetric KL (robustft_common/kl.py) that keeps R3F's vocabulary-sized memory to the two passes'
logits (issue 16, item 5): values and gradients against autograd through the plain formula, chunking and
masking, and what it keeps for the backward pass."""

import pytest
import torch
import torch.nn.functional as F

from robustft_common import kl
from tests.test_r3f import hand_symmetric_kl


def plain_symmetric_kl(a, b):
    """KL(p||q) + KL(q||p) through autograd (what the criterion computed before the chunked function)."""
    log_p, log_q = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 10])  # one chunk; 2 rows of 5 per chunk
def test_values_and_gradients_match_autograd(monkeypatch, chunk_elements):
    monkeypatch.setattr(kl, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    a = torch.randn(2, 4, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(2, 4, 5, dtype=torch.double, requires_grad=True)
    mask = torch.rand(2, 4) > 0.3
    weights = torch.randn(2, 4, dtype=torch.double)
    out = kl.symmetric_kl(a, b, mask)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    expected = torch.from_numpy(hand_symmetric_kl(a, b))
    assert torch.allclose(out[mask], expected[mask], atol=1e-12)
    grads = torch.autograd.grad((out * weights).sum(), (a, b))
    ref = torch.autograd.grad((plain_symmetric_kl(a, b) * weights * mask).sum(), (a, b))
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: kl.symmetric_kl(x, y, mask), (a, b))


def test_fp16_logits_get_fp32_kl_and_fp16_gradients():
    torch.manual_seed(0)
    a = torch.randn(4, 50).half().requires_grad_()
    b = torch.randn(4, 50).half().requires_grad_()
    out = kl.symmetric_kl(a, b)
    out.sum().backward()
    assert out.dtype == torch.float32 and a.grad.dtype == torch.float16 and torch.isfinite(a.grad).all()
    assert torch.allclose(out, plain_symmetric_kl(a, b).float(), rtol=1e-5)


def test_backward_keeps_only_the_inputs():
    """The plain formula saves ~6 (rows x vocab) fp32 tensors for backward (log p, log q, p, q, p - q,
    log p - log q); the chunked function saves its two inputs (held by the model's graph anyway) and the
    row index."""
    a = torch.randn(2, 8, 1000, requires_grad=True)
    b = torch.randn(2, 8, 1000, requires_grad=True)
    mask = torch.ones(2, 8, dtype=torch.bool)

    def saved_elements(fn):
        seen = []

        def pack(t):
            if t.data_ptr() not in {x.data_ptr() for x in seen}:
                seen.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(t.numel() for t in seen if t.data_ptr() not in (a.data_ptr(), b.data_ptr()))

    vocab_rows = a.numel()
    assert saved_elements(lambda: kl.symmetric_kl(a, b, mask)) <= 16  # the row index only
    assert saved_elements(lambda: plain_symmetric_kl(a, b)) >= 5 * vocab_rows
