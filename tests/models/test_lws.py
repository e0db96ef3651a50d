"""Stage-2 classifier, MiSLAS Eq. 4: z = diag(s) (a W + dW)^T x and its LWS / cRT special cases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.models.heads import CosineHead, LinearHead
from balpoe.models.lws import LWSDeltaHead, convert_heads_to_lws

D, C = 12, 7
HEADS = ["linear", "linear_nobias", "cosine"]


def make_head(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        head = LinearHead(D, C)
    elif kind == "linear_nobias":
        head = LinearHead(D, C, bias=False)
    else:
        head = CosineHead(D, C, scale=30.0)
    with torch.no_grad():  # a "trained" stage-1 head: non-unit, uneven class norms
        head.weight.mul_(torch.linspace(0.5, 3.0, C)[:, None])
    return head


def features(seed: int = 1, n: int = 9) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def randomise(head: LWSDeltaHead, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if p is head.class_scale
                    else 0.3 * torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------------ reduction at init

@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("mode", ["mislas", "lws"])
def test_init_reproduces_stage1_head_exactly(kind, mode):
    head = make_head(kind)
    x = features()
    lws = LWSDeltaHead(head, mode)
    assert torch.equal(lws(x), head(x))
    assert torch.equal(lws.weight, head.weight) and lws.weight.data_ptr() != head.weight.data_ptr()


@pytest.mark.parametrize("kind", HEADS)
def test_parameters_per_mode(kind):
    head = make_head(kind)
    has_bias = kind == "linear"
    m = LWSDeltaHead(head, "mislas")
    names = {n for n, _ in m.named_parameters()}
    assert names == {"class_scale", "delta_weight"} | ({"delta_bias"} if has_bias else set())
    assert [id(p) for p in m.scale_parameters()] == [id(m.class_scale)]
    assert {id(p) for p in m.delta_parameters()} == {id(p) for n, p in m.named_parameters() if n.startswith("delta")}
    assert torch.equal(m.class_scale, torch.ones(C)) and not m.delta_weight.any()

    lws = LWSDeltaHead(head, "lws")
    assert [n for n, _ in lws.named_parameters()] == ["class_scale"] and lws.delta_parameters() == []

    crt = LWSDeltaHead(head, "crt")
    assert {n for n, _ in crt.named_parameters()} == {"delta_weight"} | ({"delta_bias"} if has_bias else set())
    assert crt.scale_parameters() == [] and torch.equal(crt.class_scale, torch.ones(C))
    # W (and b) are frozen buffers in every mode
    for m_ in (m, lws, crt):
        assert "weight" in dict(m_.named_buffers()) and "weight" not in dict(m_.named_parameters())


# ------------------------------------------------------------------ Eq. 4 in general

@pytest.mark.parametrize("kind", ["linear", "linear_nobias"])
def test_mislas_linear_matches_eq4(kind):
    head = make_head(kind)
    m = LWSDeltaHead(head, "mislas")
    randomise(m)
    x = features()
    s = m.class_scale.detach()
    W = head.weight.detach() + m.delta_weight.detach()          # a W + dW, a = 1
    expect = (x @ W.T) * s                                       # diag(s) (aW + dW)^T x
    if kind == "linear":
        expect = expect + s * (head.bias.detach() + m.delta_bias.detach())
    assert torch.allclose(m(x), expect, atol=1e-5)


def test_mislas_cosine_matches_documented_algebra():
    head = make_head("cosine")
    m = LWSDeltaHead(head, "mislas")
    randomise(m)
    x = features()
    w_hat = head.weight.detach() / head.weight.detach().norm(dim=1, keepdim=True)
    v = w_hat + m.delta_weight.detach()
    v = v / v.norm(dim=1, keepdim=True)
    x_hat = x / x.norm(dim=1, keepdim=True)
    expect = 30.0 * m.class_scale.detach() * (x_hat @ v.T)
    assert torch.allclose(m(x), expect, atol=1e-4)
    # dW turns directions only: the logit norms per class are bounded by 30 * s_c
    assert (m(x).abs() <= 30.0 * m.class_scale.detach() + 1e-4).all()


@pytest.mark.parametrize("kind", HEADS)
def test_mislas_with_zero_delta_is_lws(kind):
    # a = 1, dW = 0: Eq. 4 degrades to LWS, z = s * (stage-1 logits)
    head = make_head(kind)
    x = features()
    m, lws = LWSDeltaHead(head, "mislas"), LWSDeltaHead(head, "lws")
    s = torch.linspace(0.3, 2.0, C)
    with torch.no_grad():
        m.class_scale.copy_(s)
        lws.class_scale.copy_(s)
    assert torch.allclose(m(x), lws(x), atol=0, rtol=0)
    assert torch.allclose(lws(x), s * head(x), atol=1e-5)


@pytest.mark.parametrize("kind", HEADS)
def test_lws_mode_has_no_delta_gradients(kind):
    head = make_head(kind)
    lws = LWSDeltaHead(head, "lws")
    opt = torch.optim.SGD(lws.parameters(), lr=0.5)
    W0 = lws.weight.clone()
    x, y = features(n=32), torch.randint(0, C, (32,), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(lws(x), y).backward()
        opt.step()
    assert lws.class_scale.grad is not None and lws.class_scale.grad.abs().sum() > 0
    assert not torch.equal(lws.class_scale.detach(), torch.ones(C))
    assert torch.equal(lws.weight, W0) and lws.weight.grad is None
    # direction of every class vector unchanged: output is still s * stage-1 logits
    assert torch.allclose(lws(x), lws.class_scale.detach() * head(x), atol=1e-5)


# ------------------------------------------------------------------ cRT

@pytest.mark.parametrize("kind", HEADS)
def test_crt_ignores_W_and_is_a_fresh_head(kind):
    head = make_head(kind)
    torch.manual_seed(10)
    crt = LWSDeltaHead(head, "crt")
    x = features()
    out = crt(x)
    with torch.no_grad():
        crt.weight.copy_(torch.randn(C, D) * 100)
        if crt.bias is not None:
            crt.bias.fill_(1e6)
    assert torch.equal(crt(x), out)  # W and b play no part (a = 0)
    # a fresh classifier, not a copy of W
    assert not torch.allclose(crt.delta_weight, head.weight)
    if kind == "cosine":
        assert torch.allclose(crt.delta_weight.norm(dim=1), torch.ones(C), atol=1e-6)  # CosineHead init
        plain = CosineHead(D, C, scale=30.0)
        with torch.no_grad():
            plain.weight.copy_(crt.delta_weight)
    else:
        bound = 1.0 / D ** 0.5  # nn.Linear's default init: U(-1/sqrt(D), 1/sqrt(D)) for W and b
        assert crt.delta_weight.abs().max() <= bound
        plain = LinearHead(D, C, bias=kind == "linear")
        with torch.no_grad():
            plain.weight.copy_(crt.delta_weight)
            if kind == "linear":
                assert crt.delta_bias.abs().max() <= bound and crt.delta_bias.abs().sum() > 0
                plain.bias.copy_(crt.delta_bias)
    assert torch.allclose(crt(x), plain(x), atol=1e-5)  # s = 1, a = 0: exactly the plain head


def test_crt_learns_from_scratch():
    head = make_head("linear")
    crt = LWSDeltaHead(head, "crt")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, D, generator=gen)
    y = (x @ torch.randn(D, C, generator=gen)).argmax(1)
    opt = torch.optim.SGD(crt.parameters(), lr=0.5)
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = F.cross_entropy(crt(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first
    assert torch.equal(crt.class_scale, torch.ones(C))


# ------------------------------------------------------------------ training behaviour

@pytest.mark.parametrize("kind", HEADS)
def test_mislas_training_updates_only_s_and_delta(kind):
    head = make_head(kind)
    m = LWSDeltaHead(head, "mislas")
    frozen = {n: b.clone() for n, b in m.named_buffers()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = features(n=32), torch.randint(0, C, (32,), generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    for n, b in m.named_buffers():
        assert torch.equal(b, frozen[n]), n
    assert m.delta_weight.abs().sum() > 0 and not torch.equal(m.class_scale.detach(), torch.ones(C))
    # the stage-1 head itself is untouched
    assert all(p.grad is None for p in head.parameters())


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("mode", ["mislas", "lws", "crt"])
def test_state_dict_round_trip(kind, mode):
    head = make_head(kind)
    m = LWSDeltaHead(head, mode)
    randomise(m)
    other = LWSDeltaHead(make_head(kind, seed=7), mode)
    other.load_state_dict(m.state_dict())
    x = features()
    assert torch.equal(other(x), m(x))


def test_dtype_and_device_follow_the_head():
    head = make_head("linear").double()
    m = LWSDeltaHead(head, "mislas")
    assert all(t.dtype == torch.float64 for t in list(m.parameters()) + list(m.buffers()))
    x = features().double()
    assert torch.equal(m(x), head(x))
    crt = LWSDeltaHead(make_head("cosine").double(), "crt")
    assert crt.delta_weight.dtype == torch.float64


def test_errors():
    with pytest.raises(BalpoeError, match="mode"):
        LWSDeltaHead(make_head("linear"), "lwss")
    with pytest.raises(BalpoeError, match="linear or cosine"):
        LWSDeltaHead(nn.Conv2d(3, 3, 1), "mislas")
    with pytest.raises(BalpoeError, match="already"):
        LWSDeltaHead(LWSDeltaHead(make_head("linear")), "lws")


# ------------------------------------------------------------------ convert_heads_to_lws

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(5, D)
        self.heads = nn.ModuleList([make_head("linear", 0), make_head("cosine", 1), make_head("linear_nobias", 2)])

    def forward(self, x):
        f = self.trunk(x)
        return torch.stack([h(f) for h in self.heads])


@pytest.mark.parametrize("mode", ["mislas", "lws", "crt"])
def test_convert_heads_to_lws(mode):
    model = TwoHeads()
    x = torch.randn(6, 5)
    before = model(x)
    stage1 = copy.deepcopy(model.heads)
    out = convert_heads_to_lws(model, mode)
    assert out is model and len(model.heads) == 3
    assert all(isinstance(h, LWSDeltaHead) and h.mode == mode for h in model.heads)
    assert [h.kind for h in model.heads] == ["linear", "cosine", "linear"]
    for h, s1 in zip(model.heads, stage1):
        assert torch.equal(h.weight, s1.weight)
    if mode != "crt":
        assert torch.equal(model(x), before)
    with pytest.raises(BalpoeError, match="already"):
        convert_heads_to_lws(model, mode)


def test_convert_needs_heads_modulelist():
    with pytest.raises(BalpoeError, match="heads"):
        convert_heads_to_lws(nn.Sequential(nn.Linear(3, 3)), "mislas")
