"""The FP8 switch: same parameters, logits and embeddings close to full precision, gradients
flow, it undoes cleanly, and a device without FP8 is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cellfoundry.model import bert_config, build_model
from cellfoundry.model.fp8 import (
    FP8Linear,
    FP8Unsupported,
    fp8_unsupported_reason,
    from_fp8,
    to_fp8,
)


def tiny() -> nn.Module:
    config = bert_config(
        "tiny", vocab_size=96, max_position_embeddings=64, hidden_size=64,
        num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
    )  # fmt: skip
    return build_model(config, seed=0)


def test_fp8_forward_is_close_to_full_precision_and_trains() -> None:
    ref, model = tiny().eval(), tiny().eval()
    ids = torch.randint(4, 96, (4, 48), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FP8Unsupported, match=r"compute capability >= 8\.9.*CPU"):
        to_fp8(model)  # the CPU has no FP8 matmul; tests emulate it explicitly
    keys = set(model.state_dict())
    to_fp8(model, allow_cpu=True)
    fp8 = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == 2 * 6  # q, k, v, attention out, intermediate, output per layer
    assert not any(n.startswith("cls.") for n in fp8) and set(model.state_dict()) == keys
    with torch.no_grad():
        a = ref(ids, output_hidden_states=True)
        b = model(ids, output_hidden_states=True)
    emb_a, emb_b = a.hidden_states[-2].mean(1), b.hidden_states[-2].mean(1)
    cos = torch.nn.functional.cosine_similarity(emb_a, emb_b, dim=-1)
    assert cos.min() > 0.99, cos
    rel = (b.logits - a.logits).norm() / a.logits.norm()
    assert 0 < rel < 0.1, rel  # FP8 is not exact, but close
    labels = ids.clone()
    loss = model(ids, labels=labels).loss
    loss.backward()
    grads = [m.weight.grad for m in model.modules() if isinstance(m, FP8Linear)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    from_fp8(model)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, a.logits, atol=1e-5)  # weights untouched


def test_devices_without_fp8_are_named() -> None:
    assert fp8_unsupported_reason("cpu", allow_cpu=True) is None
    assert "CPU" in (fp8_unsupported_reason("cpu") or "")
    assert "meta" in (fp8_unsupported_reason("meta") or "")
