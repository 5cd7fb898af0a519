"""Model registry: short aliases over timm, with one uniform output for every family.

Every model, whatever its family, is used through `TapModel`, which returns `ModelOutputs`:
logits, the pooled pre-logit embedding (exactly what the classifier consumes) and, on request, the
four stage maps as NCHW tensors. All of it comes from timm's public API
(`forward_intermediates`, `forward_head(pre_logits=True)`, `get_classifier`); shapes are measured
with a dummy forward (`describe`), never typed by hand.
"""

from kdcache.models.registry import (
    MODELS,
    ModelInfo,
    ModelOutputs,
    ModelSpec,
    TapModel,
    build_model,
    check_state_dict,
    describe,
    load_checkpoint_weights,
    read_checkpoint,
)

__all__ = [
    "MODELS",
    "ModelInfo",
    "ModelOutputs",
    "ModelSpec",
    "TapModel",
    "build_model",
    "check_state_dict",
    "describe",
    "load_checkpoint_weights",
    "read_checkpoint",
]
