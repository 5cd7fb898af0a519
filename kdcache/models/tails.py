"""Model tails: the computation after the stage-3 tap (last stage + final norm + pooling + head).

`tail_of(model)` returns a `Tail` that maps the model's stage-3 map, exactly as
`TapModel(x, stages=True).stages[2]` gives it (NCHW), to `(embed, logits)`, the same pair
`TapModel(x)` returns. The tail holds the model's own submodules (shared, not copied), so a tail of
a student trains with the student, and a tail of a teacher is the teacher's last part.

What follows the tap, per timm class (all through timm's own modules and `forward_head`):

| timm class | stage-3 tap | tail |
|---|---|---|
| ResNet | `layer3` | `layer4`, `forward_head` (global_pool, fc) |
| MobileNetV2 (EfficientNet) | `blocks[stage_ends[-2] - 1]` | `blocks[stage_ends[-2]:]`, `conv_head`, `bn2`, head |
| ConvNeXt | `stages[2]` | `stages[3]`, `norm_pre`, `forward_head` (head) |
| SwinTransformer | `layers[2]` (NHWC inside timm) | `layers[3]` (with its patch merging), `norm`, `forward_head` |
| VisionTransformer (ViT/DeiT) | `blocks[block_taps[2]]` | later blocks, `norm`, `forward_head` |
| MlpMixer (Mixer/ResMLP) | `blocks[block_taps[2]]` | later blocks, `norm`, `forward_head` (token mean) |

For every family but ViT/DeiT the stage-3 map is the whole state at the tap, so the tail reproduces
the model's logits and embedding exactly. A ViT with a class (or other prefix) token also carries
that token's state at the tap, which the stage-3 map (patch tokens only, as the cache stores it) does
not hold. `Tail.forward(x, prefix=...)` takes the true prefix tokens (B, P, D) when the caller has
them (then it is exact); without them (the cache-free default, and always in FBT, whose tail input is
a fused map no model ever produced) each prefix token is reconstructed as **the mean of the patch
tokens at the tap**: a state from the same depth, driven by the input map (so FBT's fusion block can
steer it), needing no extra weights or cached tensors. The class token's learned initial embedding
was rejected: it is a depth-0 state that would enter the last blocks untouched by the input.

`save_tail` writes the tail's weights (named as in the timm model) to safetensors with the alias,
class count and timm arguments as metadata; `load_tail` rebuilds the model from the alias (random
init), drops everything before the tap, loads the weights and returns the tail frozen (no gradients,
eval mode kept even under `.train()`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.files import atomic_write
from kdcache.locations import is_url
from kdcache.models.registry import MODELS, TapModel, build_model

FORMAT = "kdcache-tail"
VERSION = "1"


class Tail(nn.Module):
    """The part of a timm model after its stage-3 tap; `forward(stage3_map) -> (embed, logits)`.

    Only the tail's own submodules are registered (`parts`, in the net's order, named as in the
    net by `part_names`); the rest of the net is reachable for timm's `forward_head` but is neither
    a child nor in the state dict.
    """

    def __init__(self, net: nn.Module, kind: str, parts: list[tuple[str, nn.Module]], tap: int | None = None):
        super().__init__()
        object.__setattr__(self, "_net", net)  # not registered: the tail owns only its parts
        self.kind = kind
        self.tap = tap  # block index of the stage-3 tap (token models) or None
        self.part_names = [name for name, _ in parts]
        self.parts = nn.ModuleList([module for _, module in parts])
        self.frozen = False

    @property
    def net(self) -> nn.Module:
        return self._net

    def train(self, mode: bool = True) -> "Tail":
        return super().train(False if self.frozen else mode)

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The tail's persistent state (parameters and buffers) keyed by the names in the timm net."""
        return {f"{name}.{k}": v for name, module in zip(self.part_names, self.parts)
                for k, v in module.state_dict().items()}

    def freeze(self) -> "Tail":
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        net, kind = self._net, self.kind
        if kind == "resnet":
            x = net.layer4(x)
        elif kind == "efficientnet":
            for block in self.parts[:-4]:  # the remaining stages; then conv_head, bn2, pool, classifier
                x = block(x)
            x = net.bn2(net.conv_head(x))
        elif kind == "convnext":
            x = net.norm_pre(net.stages[3](x))
        elif kind == "swin":
            x = net.norm(net.layers[3](x.permute(0, 2, 3, 1)))  # timm's Swin runs NHWC
        elif kind in ("vit", "mixer"):
            x = x.flatten(2).transpose(1, 2)  # (B, H*W, D) patch tokens
            n_prefix = getattr(net, "num_prefix_tokens", 0) if kind == "vit" else 0
            if n_prefix:
                if prefix is None:
                    prefix = x.mean(1, keepdim=True).expand(-1, n_prefix, -1)
                x = torch.cat([prefix.to(x.dtype), x], dim=1)
            for block in net.blocks[self.tap + 1:]:
                x = block(x)
            x = net.norm(x)
        else:  # pragma: no cover - tail_of only builds the kinds above
            raise KDCacheError(f"unknown tail kind {kind!r}")
        embed = net.forward_head(x, pre_logits=True)
        return embed, net.get_classifier()(embed)


def _tail_plan(model: TapModel) -> tuple[str, list[str], int | None]:
    """(kind, dotted names of the net's modules after the stage-3 tap, tap block index)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    net, spec = model.net, model.spec
    if isinstance(net, ResNet):
        return "resnet", ["layer4", "global_pool", "fc"], None
    if isinstance(net, EfficientNet):
        # forward_intermediates' feature k is the output of blocks[stage_ends[k] - 1]; TapModel
        # keeps the last four of five, so stage 3 is feature 3 = the output of blocks[stage_ends[3] - 1].
        first = net.stage_ends[-2]
        rest = [f"blocks.{i}" for i in range(first, len(net.blocks))]
        return "efficientnet", rest + ["conv_head", "bn2", "global_pool", "classifier"], None
    if isinstance(net, ConvNeXt):
        return "convnext", ["stages.3", "norm_pre", "head"], None
    if isinstance(net, SwinTransformer):
        return "swin", [f"layers.{len(net.layers) - 1}", "norm", "head"], None
    if isinstance(net, (VisionTransformer, MlpMixer)):
        if not spec.block_taps or len(spec.block_taps) < 3:
            raise KDCacheError(f"{spec.alias} has no block taps, so its stage-3 block is unknown",
                               expected="a ModelSpec with block_taps=(i1, i2, i3, i4)")
        tap = spec.block_taps[2]
        rest = [f"blocks.{i}" for i in range(tap + 1, len(net.blocks))]
        if isinstance(net, VisionTransformer):
            head = ["norm", "fc_norm", "head_drop", "head"] + (["attn_pool"] if net.attn_pool is not None else [])
            return "vit", rest + head, tap
        return "mixer", rest + ["norm", "head_drop", "head"], tap
    raise KDCacheError(f"no tail for {spec.alias} ({type(net).__name__})",
                       expected="a ResNet, MobileNetV2, ConvNeXt, Swin, ViT/DeiT, Mixer or ResMLP alias")


def tail_of(model: TapModel) -> Tail:
    """The model's computation after its stage-3 tap, sharing the model's submodules (no copies)."""
    kind, names, tap = _tail_plan(model)
    parts = [(name, model.net.get_submodule(name)) for name in names]
    if kind == "swin" and len(model.net.layers) != 4:
        raise KDCacheError(f"{model.spec.alias} has {len(model.net.layers)} Swin stages, the tail expects 4")
    if kind == "convnext" and len(model.net.stages) != 4:
        raise KDCacheError(f"{model.spec.alias} has {len(model.net.stages)} ConvNeXt stages, the tail expects 4")
    return Tail(model.net, kind, parts, tap)


def save_tail(model: TapModel, num_classes: int, path: str | Path) -> str | Path:
    """Write the model's tail weights to `path` (safetensors) with what `load_tail` needs to rebuild it."""
    from safetensors.torch import save_file

    spec = model.spec
    tail = tail_of(model)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tail.named_weights().items()}
    metadata = {
        "format": FORMAT, "version": VERSION, "alias": spec.alias, "num_classes": str(int(num_classes)),
        "timm_name": spec.timm_name, "family": spec.family, "kind": tail.kind,
        "timm_kwargs": json.dumps(spec.kwargs, sort_keys=True, default=str),
        "parts": json.dumps(tail.part_names), "tap": json.dumps(tail.tap),
    }
    if not is_url(path):  # a URL (a store at s3://...) stays a string: atomic_write uploads it
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def _strip_front(net: nn.Module, keep: list[str]) -> None:
    """Replace every submodule of `net` that holds none of `keep` with an empty Identity."""
    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            full = prefix + name
            if full in keep:
                continue
            if any(k.startswith(full + ".") for k in keep):
                visit(child, full + ".")
            else:
                setattr(module, name, nn.Identity())

    visit(net, "")


def load_tail(path: str | Path) -> Tail:
    """Rebuild a tail written by `save_tail`: architecture from the alias, weights from the file;
    returned frozen (requires_grad False, eval mode) and holding no weights from before the tap."""
    from safetensors import safe_open

    path = Path(path)
    fix = "re-extract the teacher with --methods fbt (after deleting its cache directory)"
    if not path.is_file():
        raise KDCacheError(f"teacher tail {path} does not exist", expected="tail.safetensors written by extract",
                           fix=fix)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise KDCacheError(f"teacher tail {path} could not be read ({type(exc).__name__}: {exc})",
                           expected="a safetensors file written by kdcache's save_tail", fix=fix) from exc
    if meta.get("format") != FORMAT or "alias" not in meta or "num_classes" not in meta:
        raise KDCacheError(f"{path} is not a kdcache teacher tail (metadata {sorted(meta)})",
                           expected=f"metadata format={FORMAT!r} with alias and num_classes", fix=fix)
    if meta.get("version") != VERSION:
        raise KDCacheError(f"teacher tail {path} has format version {meta.get('version')!r}",
                           expected=f"version {VERSION}", fix=fix)
    alias = meta["alias"]
    spec = MODELS.get(alias)
    stored_kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    if meta.get("timm_name") != spec.timm_name or stored_kwargs != json.loads(json.dumps(spec.kwargs, default=str)):
        raise KDCacheError(f"teacher tail {path} was written for {alias} as {meta.get('timm_name')} "
                           f"{stored_kwargs}, but {alias} is now {spec.timm_name} {spec.kwargs}",
                           expected="the same model definition at extraction and training", fix=fix)
    model = build_model(alias, int(meta["num_classes"]))
    tail = tail_of(model)
    expected = tail.named_weights()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise KDCacheError(
            f"teacher tail {path} does not fit {alias}: {len(missing)} missing, {len(extra)} unexpected, "
            f"{len(wrong)} wrongly shaped tensors (first: {first})",
            expected=f"the tail weights of a {alias} with {meta['num_classes']} classes", fix=fix)
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    _strip_front(model.net, tail.part_names)
    return tail.freeze()
