"""The Fastformer layer against an independent float64 reference, masking, sharing, linear memory."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from newsrec.models.attention import AdditivePooling, MultiHeadSelfAttention
from newsrec.models.fastformer import FastformerAttention, LayerStack

IN_DIM, HIDDEN, HEADS = 10, 12, 3  # odd sizes: a swapped axis cannot pass


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def reference_fastformer(x: np.ndarray, mask: np.ndarray, layer: FastformerAttention) -> np.ndarray:
    """REFERENCE.md §4 written with loops, float64, the authors' additive -10000 mask bias."""
    wq, bq = _np(layer.query.weight), _np(layer.query.bias)
    wk, bk = _np(layer.key.weight), _np(layer.key.bias)
    wa, ba = _np(layer.query_score.weight), _np(layer.query_score.bias)
    wb, bb = _np(layer.key_score.weight), _np(layer.key_score.bias)
    wo, bo = _np(layer.output.weight), _np(layer.output.bias)
    batch, n, _ = x.shape
    d = wq.shape[0]
    heads = wa.shape[0]
    dh = d // heads
    out = np.zeros((batch, n, d))
    for b in range(batch):
        q_all = x[b] @ wq.T + bq  # (n, d)
        k_all = x[b] @ wk.T + bk
        v_all = q_all if layer.value is None else x[b] @ _np(layer.value.weight).T + _np(layer.value.bias)
        bias = np.where(mask[b], 0.0, -10000.0)
        global_q = np.zeros(d)
        for h in range(heads):
            scores = np.array([(q_all[i] @ wa[h] + ba[h]) / math.sqrt(dh) + bias[i] for i in range(n)])
            alpha = np.exp(scores - scores.max())
            alpha /= alpha.sum()
            for i in range(n):
                global_q[h * dh:(h + 1) * dh] += alpha[i] * q_all[i, h * dh:(h + 1) * dh]
        p_all = k_all * global_q
        global_k = np.zeros(d)
        for h in range(heads):
            scores = np.array([(p_all[i] @ wb[h] + bb[h]) / math.sqrt(dh) + bias[i] for i in range(n)])
            beta = np.exp(scores - scores.max())
            beta /= beta.sum()
            for i in range(n):
                global_k[h * dh:(h + 1) * dh] += beta[i] * p_all[i, h * dh:(h + 1) * dh]
        u_all = global_k * v_all
        out[b] = u_all @ wo.T + bo + q_all
    return out


def _layer(*, value_from_query: bool = True, dtype: torch.dtype = torch.float64) -> FastformerAttention:
    torch.manual_seed(0)
    layer = FastformerAttention(IN_DIM, HIDDEN, HEADS, value_from_query=value_from_query)
    for p in layer.parameters():  # non-zero biases so a dropped bias fails too
        torch.nn.init.normal_(p, std=0.5)
    return layer.to(dtype)


def _inputs(batch: int = 3, n: int = 7, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, n, IN_DIM, generator=g, dtype=dtype)
    lengths = torch.tensor([n, 4, 1][:batch])
    mask = torch.arange(n)[None, :] < lengths[:, None]
    return x, mask


@pytest.mark.parametrize("value_from_query", [True, False])
def test_layer_matches_float64_reference(value_from_query: bool) -> None:
    layer = _layer(value_from_query=value_from_query)
    x, mask = _inputs()
    got = layer(x, mask).detach().numpy()
    want = reference_fastformer(x.numpy(), mask.numpy(), layer)
    assert got.shape == (3, 7, HIDDEN)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_layer_matches_reference_float32() -> None:
    layer = _layer(dtype=torch.float32)
    x, mask = _inputs(dtype=torch.float32)
    got = layer(x, mask).detach().numpy()
    want = reference_fastformer(x.double().numpy(), mask.numpy(), layer)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_real_outputs_or_pooled_vector() -> None:
    torch.manual_seed(0)
    for kind in ("fastformer", "mhsa"):
        stack = LayerStack(kind=kind, in_dim=IN_DIM, hidden_size=HIDDEN, num_heads=HEADS, num_layers=2,
                           layer_norm=True, feed_forward=True).double().eval()
        pool = AdditivePooling(HIDDEN, 5).double()
        x, mask = _inputs()
        noisy = x.clone()
        noisy[~mask] = torch.randn(int((~mask).sum()), IN_DIM, dtype=torch.float64) * 100
        out, out_noisy = stack(x, mask), stack(noisy, mask)
        assert torch.equal(out[mask], out_noisy[mask]), kind
        assert torch.all(out[~mask] == 0), kind
        assert torch.equal(pool(out, mask), pool(out_noisy, mask)), kind
        # Real positions also equal a run on the unpadded sequence alone (row 1 has 4 clicks).
        alone = stack(x[1:2, :4], mask[1:2, :4])
        torch.testing.assert_close(alone[0], out[1, :4], rtol=0, atol=1e-12)


def test_all_padding_row_is_finite() -> None:
    x, mask = _inputs()
    mask[2] = False
    for kind in ("fastformer", "mhsa"):
        stack = LayerStack(kind=kind, in_dim=IN_DIM, hidden_size=HIDDEN, num_heads=HEADS, num_layers=2).double()
        out = stack(x, mask)
        assert torch.isfinite(out).all(), kind
        assert torch.all(out[2] == 0), kind
        pooled = AdditivePooling(HIDDEN, 5).double()(out, mask)
        assert torch.isfinite(pooled).all() and torch.all(pooled[2] == 0), kind
        out.sum().backward()  # gradients finite as well
        assert all(torch.isfinite(p.grad).all() for p in stack.parameters() if p.grad is not None), kind


def test_value_from_query_parameter_count() -> None:
    shared = sum(p.numel() for p in FastformerAttention(IN_DIM, HIDDEN, HEADS, value_from_query=True).parameters())
    separate = sum(p.numel() for p in FastformerAttention(IN_DIM, HIDDEN, HEADS, value_from_query=False).parameters())
    assert separate - shared == IN_DIM * HIDDEN + HIDDEN  # exactly one extra Linear in_dim -> d
    # W_q, W_k (in->d), W_alpha, W_beta (d->H), W_o (d->d), with biases
    assert shared == 2 * (IN_DIM * HIDDEN + HIDDEN) + 2 * (HIDDEN * HEADS + HEADS) + HIDDEN * HIDDEN + HIDDEN


def test_share_layers_reuses_parameters() -> None:
    def count(**kw: object) -> int:
        return sum(p.numel() for p in LayerStack(kind="fastformer", hidden_size=HIDDEN, num_heads=HEADS, **kw).parameters())

    one = count(in_dim=HIDDEN, num_layers=1)
    assert count(in_dim=HIDDEN, num_layers=3, share_layers=True) == one
    assert count(in_dim=HIDDEN, num_layers=3, share_layers=False) == 3 * one
    # A width-changing first layer keeps its own weights; the rest share one set.
    first = count(in_dim=IN_DIM, num_layers=1)
    assert count(in_dim=IN_DIM, num_layers=4, share_layers=True) == first + one
    stack = LayerStack(kind="fastformer", in_dim=HIDDEN, hidden_size=HIDDEN, num_heads=HEADS, num_layers=3,
                       share_layers=True)
    assert stack.order == (0, 0, 0)
    # Running the shared layer 3 times differs from running it once (it really is applied 3 times).
    x, mask = torch.randn(2, 5, HIDDEN), torch.ones(2, 5, dtype=torch.bool)
    once = stack.layers[0](x, mask)
    assert not torch.allclose(stack(x, mask), once)
    assert torch.allclose(stack(x, mask), stack.layers[0](stack.layers[0](once, mask), mask))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_quadratic_tensor_at_long_sequences() -> None:
    n, d = 4096, 32
    layer = FastformerAttention(d, d, 4)
    x = torch.randn(1, n, d, requires_grad=True)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, -100:] = False
    with _LargestTensor() as probe:
        layer(x, mask).sum().backward()
    assert probe.largest <= n * d  # an N x N score matrix would be 16.8M elements
    assert torch.isfinite(x.grad).all()


def test_mhsa_matches_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    layer = MultiHeadSelfAttention(IN_DIM, HIDDEN, HEADS).double()
    x, mask = _inputs()
    got = layer(x, mask)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    dh = HIDDEN // HEADS
    want = torch.zeros(3, 7, HIDDEN, dtype=torch.float64)
    for h in range(HEADS):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)  # (B, N, N)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        want[..., sl] = torch.softmax(scores, dim=-1) @ v[..., sl]
    want = layer.output(want)
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-10)


def test_bf16_autocast_runs_and_stays_close() -> None:
    torch.manual_seed(0)
    stack = LayerStack(kind="fastformer", in_dim=IN_DIM, hidden_size=HIDDEN, num_heads=HEADS, num_layers=2)
    x, mask = _inputs(dtype=torch.float32)
    mask[2] = False
    ref = stack(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack(x, mask)
        out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
