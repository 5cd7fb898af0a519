"""Aliases for the papers' models and for CPU-sized variants of each family."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """How to build one alias with timm, and how to read its four stages.

    family: "cnn" (ResNet, MobileNetV2, ConvNeXt), "swin", "vit" (ViT, DeiT) or "mlp" (Mixer,
    ResMLP). `block_taps` lists 0-based block indices for token models (ViT/Mixer families, whose
    blocks all share one grid); None means the model's own stages (the last four maps timm returns).
    """

    alias: str
    timm_name: str
    family: str
    input_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    block_taps: tuple[int, ...] | None = None
    description: str = ""

    @property
    def is_cnn(self) -> bool:
        return self.family == "cnn"


MODELS: Registry[ModelSpec] = Registry("model", "--teacher/--student")


def _add(alias: str, timm_name: str, family: str, input_size: int, description: str,
         block_taps: tuple[int, ...] | None = None, **kwargs: Any) -> None:
    MODELS.add(alias, ModelSpec(alias, timm_name, family, input_size, kwargs, block_taps, description))


# The papers' models (224 input, ImageNet-pretrained weights available from the hub).
_add("swin_t", "swin_tiny_patch4_window7_224", "swin", 224, "Swin-T, 28M")
_add("vit_s", "vit_small_patch16_224", "vit", 224, "ViT-S/16, 22M", block_taps=(1, 3, 9, 11))
_add("deit_t", "deit_tiny_patch16_224", "vit", 224, "DeiT-T/16, 5.7M", block_taps=(1, 3, 9, 11))
_add("convnext_t", "convnext_tiny", "cnn", 224, "ConvNeXt-T, 28M")
_add("mixer_b16", "mixer_b16_224", "mlp", 224, "MLP-Mixer-B/16, 60M", block_taps=(1, 3, 9, 11))
_add("resmlp_s12", "resmlp_12_224", "mlp", 224, "ResMLP-S12, 15M", block_taps=(1, 3, 9, 11))
_add("resnet18", "resnet18", "cnn", 224, "ResNet-18, 11.7M")
_add("resnet50", "resnet50", "cnn", 224, "ResNet-50, 25.6M")
_add("mobilenetv2", "mobilenetv2_100", "cnn", 224, "MobileNetV2 1.0, 3.5M")

# CPU-sized variants of each family for 32x32 inputs (Fashion-MNIST, CIFAR on a laptop).
_add("swin_pico", "swin_tiny_patch4_window7_224", "swin", 32, "Swin, 4 stages at 16/8/4/2, 5M",
     img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
_add("vit_pico", "vit_tiny_patch16_224", "vit", 32, "ViT-Ti, patch 4, depth 6, 2.7M",
     block_taps=(0, 1, 3, 5), img_size=32, patch_size=4, depth=6)
_add("deit_pico", "deit_tiny_patch16_224", "vit", 32, "DeiT-Ti, patch 4, depth 4, 1.8M",
     block_taps=(0, 1, 2, 3), img_size=32, patch_size=4, depth=4)
_add("convnext_pico", "convnext_atto", "cnn", 32, "ConvNeXt-atto, 3.4M")
_add("mixer_pico", "timm.models.mlp_mixer:MlpMixer", "mlp", 32, "Mixer, patch 4, 6 blocks, width 128",
     block_taps=(0, 1, 3, 5), img_size=32, patch_size=4, num_blocks=6, embed_dim=128)
_add("resmlp_pico", "timm.models.mlp_mixer:MlpMixer", "mlp", 32, "ResMLP, patch 4, 6 blocks, width 128",
     block_taps=(0, 1, 3, 5), img_size=32, patch_size=4, num_blocks=6, embed_dim=128, mlp_ratio=4,
     block_layer="ResBlock", norm_layer="Affine")
_add("resnet10t", "resnet10t", "cnn", 32, "ResNet-10-T, 4.9M")
_add("resnet18_32", "resnet18", "cnn", 32, "ResNet-18 at 32x32 input")
_add("mobilenetv2_32", "mobilenetv2_100", "cnn", 32, "MobileNetV2 at 32x32 input")


@dataclass
class ModelOutputs:
    """What every model gives: logits (B, C), embedding (B, D) and optionally four NCHW stages.

    `prefix`: with the stages, for models with prefix tokens (ViT/DeiT: the class token), those
    tokens at each tap, (B, P, C) per stage (the stage maps hold the patch tokens only); None for
    every other family and without stages. OFA's token projectors keep them (methods/projectors.py).
    """

    logits: torch.Tensor
    embed: torch.Tensor
    stages: list[torch.Tensor] | None = None
    prefix: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Shapes measured by a dummy forward; methods size their projectors from this."""

    alias: str
    family: str
    input_size: int
    num_classes: int
    embed_dim: int
    stage_shapes: tuple[tuple[int, int, int], ...]  # (C, H, W) per stage
    prefix_tokens: int = 0  # prefix (class) tokens at each tap: 1 for ViT/DeiT, 0 otherwise


class TapModel(nn.Module):
    """A timm model with the uniform `ModelOutputs` interface."""

    def __init__(self, spec: ModelSpec, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.net = net

    def forward(self, x: torch.Tensor, stages: bool = False) -> ModelOutputs:
        net = self.net
        prefix = None
        if not stages:
            final = net.forward_features(x)
            maps = None
        elif self.spec.block_taps is not None and getattr(net, "num_prefix_tokens", 0):
            final, taps = net.forward_intermediates(x, indices=list(self.spec.block_taps), return_prefix_tokens=True)
            maps, prefix = [m for m, _ in taps], [p for _, p in taps]
        elif self.spec.block_taps is not None:
            final, maps = net.forward_intermediates(x, indices=list(self.spec.block_taps))
        else:
            final, maps = net.forward_intermediates(x)
            maps = list(maps[-4:])
            if self.spec.timm_name.startswith("mobilenetv2"):
                maps[-1] = final  # OFA's stage 4 is after conv_head + BN (1280 wide)
        embed = net.forward_head(final, pre_logits=True)
        logits = net.get_classifier()(embed)
        return ModelOutputs(logits=logits, embed=embed, stages=maps, prefix=prefix)


def build_model(alias: str, num_classes: int, *, pretrained: bool = False,
                checkpoint: str | Path | None = None, drop_path_rate: float = 0.0) -> TapModel:
    """Build an alias. `pretrained` uses timm's hub weights (network needed), with a new head;
    `checkpoint` loads a local kdcache or timm state dict."""
    import timm

    spec = MODELS.get(alias)
    kwargs = dict(spec.kwargs)
    if drop_path_rate and spec.family != "cnn":
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        if ":" in spec.timm_name:  # a timm class built from explicit arguments (no hub weights)
            net = _build_from_class(spec.timm_name, num_classes, kwargs)
        else:
            net = timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as exc:  # hub unreachable, missing weights
        if pretrained:
            raise KDCacheError(
                f"could not fetch pretrained weights for {alias} ({spec.timm_name}): {exc}",
                expected="network access to the Hugging Face hub, or a local checkpoint",
                fix=f"pass --checkpoint PATH, or train one: kdcache teacher --teacher {alias}",
            ) from exc
        raise
    model = TapModel(spec, net)
    if checkpoint is not None:
        load_checkpoint_weights(model, checkpoint)
    return model


def _build_from_class(target: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """Build `module:Class(**kwargs)`; string values naming attributes of that module are resolved
    (e.g. block_layer="ResBlock" for ResMLP)."""
    import importlib

    module_name, cls_name = target.split(":")
    module = importlib.import_module(module_name)
    resolved = {k: getattr(module, v) if isinstance(v, str) and hasattr(module, v) else v
                for k, v in kwargs.items()}
    return getattr(module, cls_name)(num_classes=num_classes, **resolved)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(what a kdcache checkpoint says of itself, its state dict), read on the CPU, nothing loaded.

    A kdcache checkpoint is {'model': state dict, 'alias', 'num_classes', 'acc', ...}; a bare (timm)
    state dict is accepted too and comes with an empty description."""
    path = Path(path)
    if not path.is_file():
        raise KDCacheError(f"checkpoint {path} does not exist",
                           fix="pass the path of a .pt file, e.g. one written by `kdcache teacher`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise KDCacheError(f"checkpoint {path} could not be read ({type(exc).__name__}: {exc})",
                           expected="a torch checkpoint file",
                           fix=f"the file is damaged or not a checkpoint: replace {path} (or train it again)") from exc
    if isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        meta, state = {k: v for k, v in blob.items() if k != "model"}, blob["model"]
    else:
        meta, state = {}, blob
    expected = "a kdcache checkpoint {'model': state dict, ...} or a timm state dict {name: tensor}"
    if not isinstance(state, dict) or not state:
        raise KDCacheError(f"checkpoint {path} holds no state dict (it holds a {type(state).__name__})",
                           expected=expected, fix=f"pass a checkpoint written by `kdcache teacher` instead of {path}")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise KDCacheError(f"checkpoint {path}: state dict entry {bad!r} is not a tensor ({type(state[bad]).__name__})",
                           expected=expected, fix=f"pass a checkpoint written by `kdcache teacher` instead of {path}")
    return meta, dict(state)


def head_weight_key(model: TapModel) -> str | None:
    """The state-dict key of the classifier's weight ([num_classes, D]), None for a headless model."""
    head = model.net.get_classifier()
    for name, module in model.named_modules():
        if module is head and isinstance(getattr(module, "weight", None), torch.Tensor):
            return f"{name}.weight"
    return None


def check_state_dict(model: TapModel, state: dict[str, torch.Tensor], path: str | Path, *,
                     meta: dict[str, Any] | None = None, classes_of: str | None = None,
                     retrain: str | None = None) -> dict[str, torch.Tensor]:
    """Inspect a checkpoint's state dict against `model` before any weight is loaded; returns it
    keyed like `model.state_dict()` (a bare timm state dict gets the `net.` prefix).

    In this order, the first failure raising KDCacheError naming `path` and the first offending key:
    the class count (the head's rows, else the description's `num_classes`) against the model's
    (`classes_of`, e.g. "dataset cifar100", names where the model's count comes from), missing or
    unexpected keys (another architecture), shape mismatches, and NaN/Inf in any floating tensor,
    weights and buffers alike (a BatchNorm running variance included). `retrain` is the command
    that makes a right checkpoint, quoted in the fixes."""
    meta = meta or {}
    alias = model.spec.alias
    arch = alias if model.spec.timm_name == alias else f"{alias} ({model.spec.timm_name})"
    if not any(k.startswith("net.") for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    own = model.state_dict()
    saved = meta.get("alias")
    saved_as = f" (saved for {saved})" if saved and saved != alias else ""
    get_one = f"pass a checkpoint trained for {alias}" + (f" on {classes_of}" if classes_of else "")
    if retrain:
        get_one += f", or train one: {retrain}"
    head = head_weight_key(model)
    if head is not None:
        want, have = int(own[head].shape[0]), None
        if head in state and state[head].dim() >= 1 and int(state[head].shape[0]) != want:
            have, detail = int(state[head].shape[0]), f"its head {head} is {list(state[head].shape)}"
        elif meta.get("num_classes") is not None and int(meta["num_classes"]) != want:
            have, detail = int(meta["num_classes"]), "as its num_classes says"
        if have is not None:
            owner = f"{classes_of} has" if classes_of else f"the {alias} being built has"
            raise KDCacheError(f"checkpoint {path}{saved_as} has {have} classes ({detail}), but {owner} {want}",
                               expected=f"a {alias} checkpoint with a {want}-class head", fix=get_one)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys (first: {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (first: {unexpected[0]})"] if unexpected else []
        other = f"; or use the alias it was saved for ({saved})" if saved_as and saved in MODELS else ""
        raise KDCacheError(f"checkpoint {path}{saved_as} does not fit {arch}: {', '.join(parts)}",
                           expected=f"the state dict of a {arch}", fix=get_one + other)
    wrong = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise KDCacheError(f"checkpoint {path}{saved_as} does not fit {arch}: {len(wrong)} tensors have another shape "
                           f"(first: {k} is {list(state[k].shape)} in the file, {list(own[k].shape)} in the model)",
                           expected=f"the state dict of a {arch}", fix=get_one)
    for k, v in state.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            n_nan, n_inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            raise KDCacheError(
                f"checkpoint {path} has non-finite values in {k} ({n_inf} Inf, {n_nan} NaN of {v.numel()})",
                expected="finite weights and buffers (BatchNorm running statistics included)",
                fix="the run that saved it diverged or the file was altered: "
                    + (f"train it again ({retrain})" if retrain else "train it again") + ", or pass another checkpoint")
    return state


def load_checkpoint_weights(model: TapModel, path: str | Path, *, classes_of: str | None = None,
                            retrain: str | None = None) -> dict[str, Any]:
    """Load weights from a kdcache checkpoint ({'model': state}) or a bare state dict, after
    `check_state_dict` found them fit (classes, keys, shapes, finite); returns the checkpoint's
    description (empty for a bare state dict)."""
    meta, state = read_checkpoint(path)
    state = check_state_dict(model, state, path, meta=meta, classes_of=classes_of, retrain=retrain)
    model.load_state_dict(state, strict=True)
    return meta


@torch.no_grad()
def describe(model: TapModel, input_size: int | None = None) -> ModelInfo:
    """Measure embedding width and stage shapes with one dummy forward (eval mode, batch 2)."""
    size = input_size or model.spec.input_size
    was_training = model.training
    model.eval()
    out = model(torch.zeros(2, 3, size, size), stages=True)
    model.train(was_training)
    return ModelInfo(
        alias=model.spec.alias,
        family=model.spec.family,
        input_size=size,
        num_classes=out.logits.shape[1],
        embed_dim=out.embed.shape[1],
        stage_shapes=tuple(tuple(s.shape[1:]) for s in out.stages),
        prefix_tokens=int(out.prefix[0].shape[1]) if out.prefix else 0,
    )
