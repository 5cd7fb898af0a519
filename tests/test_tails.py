"""Tails: the model's computation after its stage-3 tap, shared weights, safetensors round trip."""

from __future__ import annotations

import json

import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.models import build_model
from kdcache.models.tails import Tail, load_tail, save_tail, tail_of

CPU_ALIASES = ["swin_pico", "vit_pico", "deit_pico", "mixer_pico", "resmlp_pico", "convnext_pico",
               "resnet10t", "resnet18_32", "mobilenetv2_32"]
NC = 7


def _model(alias: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(alias, NC).eval()


def _x(seed: int = 1, b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _vit_prefix(model, x):
    """The true prefix (class) tokens at the stage-3 tap, which the stage-3 map does not hold."""
    tap = model.spec.block_taps[2]
    _, inter = model.net.forward_intermediates(x, indices=[tap], return_prefix_tokens=True)
    return inter[0][1]


@pytest.mark.parametrize("alias", CPU_ALIASES)
def test_tail_reproduces_logits_and_embed(alias):
    m = _model(alias)
    x = _x()
    with torch.no_grad():
        full = m(x)
        stage3 = m(x, stages=True).stages[2]
        tail = tail_of(m)
        prefix = _vit_prefix(m, x) if m.spec.family == "vit" else None
        embed, logits = tail(stage3, prefix=prefix)
    torch.testing.assert_close(embed, full.embed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=1e-5)
    assert logits.shape == (3, NC)


@pytest.mark.parametrize("alias", ["vit_pico", "deit_pico"])
def test_vit_without_prefix_uses_the_mean_patch_token(alias):
    # The cache holds patch tokens only; the cache-free tail reconstructs the class token as
    # the mean patch token at the tap. That is an approximation (not the model's output) ...
    m = _model(alias)
    x = _x()
    with torch.no_grad():
        stage3 = m(x, stages=True).stages[2]
        tail = tail_of(m)
        e_default, l_default = tail(stage3)
        mean = stage3.flatten(2).transpose(1, 2).mean(1, keepdim=True)
        e_mean, l_mean = tail(stage3, prefix=mean)
        full = m(x)
    torch.testing.assert_close(e_default, e_mean)
    torch.testing.assert_close(l_default, l_mean)
    assert (l_default - full.logits).abs().max() > 1e-3  # ... the exact path needs the true prefix
    assert torch.isfinite(l_default).all()


@pytest.mark.parametrize("alias", ["swin_pico", "resnet18_32", "deit_pico"])
def test_tail_shares_the_models_modules(alias):
    m = _model(alias)
    tail = tail_of(m)
    model_params = {id(p) for p in m.parameters()}
    tail_params = list(tail.parameters())
    assert tail_params and all(id(p) in model_params for p in tail_params)
    assert sum(p.numel() for p in tail_params) < sum(p.numel() for p in m.parameters())
    assert not any(k.startswith("_net") for k in tail.state_dict())
    stage3 = m(_x(), stages=True).stages[2].detach()
    with torch.no_grad():
        before = tail(stage3)[1].clone()
        m.net.get_classifier().bias.add_(1.0)  # editing the model edits the tail
        after = tail(stage3)[1]
    torch.testing.assert_close(after, before + 1.0)


def test_gradients_flow_through_a_frozen_tail():
    m = _model("swin_pico")
    tail = tail_of(m).freeze()
    stage3 = m(_x(), stages=True).stages[2].detach().requires_grad_(True)
    embed, logits = tail(stage3)
    (embed.sum() + logits.sum()).backward()
    assert stage3.grad is not None and stage3.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tail.parameters())


@pytest.mark.parametrize("alias", CPU_ALIASES)
def test_save_load_round_trip(alias, tmp_path):
    m = _model(alias, seed=3)
    path = save_tail(m, NC, tmp_path / "teachers" / alias / "tail.safetensors")
    loaded = load_tail(path)
    assert isinstance(loaded, Tail) and loaded.kind == tail_of(m).kind
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    loaded.train()  # a frozen tail stays in eval mode
    assert not loaded.training and not any(mod.training for mod in loaded.modules())
    stage3 = m(_x(5), stages=True).stages[2].detach()
    with torch.no_grad():
        want = tail_of(m)(stage3)
        got = loaded(stage3)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    # only the tail was kept: the rebuilt net holds fewer weights than the model
    kept = sum(p.numel() for p in loaded.net.parameters())
    assert kept < sum(p.numel() for p in m.net.parameters())


def test_metadata_describes_the_tail(tmp_path):
    from safetensors import safe_open

    m = _model("swin_pico")
    path = save_tail(m, NC, tmp_path / "tail.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["alias"] == "swin_pico" and meta["num_classes"] == str(NC)
    assert json.loads(meta["timm_kwargs"])["window_size"] == 4
    assert json.loads(meta["parts"]) == ["layers.3", "norm", "head"]
    assert keys and all(k.split(".")[0] in ("layers", "norm", "head") for k in keys)
    assert not any(k.startswith(("layers.0", "layers.1", "layers.2", "patch_embed")) for k in keys)


def test_bad_files_raise_kdcache_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(KDCacheError, match="does not exist"):
        load_tail(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(KDCacheError, match="could not be read"):
        load_tail(junk)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(KDCacheError, match="not a kdcache teacher tail"):
        load_tail(bare)

    good = save_tail(_model("resnet18_32"), NC, tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(good))

    def rewrite(name, tensors=tensors, **changes):
        p = tmp_path / name
        save_file(tensors, str(p), metadata={**meta, **changes})
        return p

    with pytest.raises(KDCacheError, match="does not fit"):  # weights of another class count
        load_tail(rewrite("classes.safetensors", num_classes="11"))
    with pytest.raises(KDCacheError, match="does not fit"):  # a tensor missing
        load_tail(rewrite("short.safetensors", tensors={k: v for k, v in list(tensors.items())[1:]}))
    with pytest.raises(KDCacheError):  # an alias that is not registered
        load_tail(rewrite("alias.safetensors", alias="no_such_model"))
    with pytest.raises(KDCacheError, match="was written for"):  # another model definition
        load_tail(rewrite("def.safetensors", timm_kwargs=json.dumps({"depth": 3})))
