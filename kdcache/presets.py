"""Named training recipes: the papers' CIFAR-100 settings and CPU-sized ones for Fashion-MNIST.

A preset is a dict of `TrainConfig` overrides; explicit command-line flags override the preset.
"""

from __future__ import annotations

from typing import Any

from kdcache.errors import KDCacheError
from kdcache.registry import Registry

PRESETS: Registry[dict[str, Any]] = Registry("training preset", "--preset")

# OFA-KD, CNN students on CIFAR-100 at 224: Hao840/OFAKD configs/cifar/cnn.yaml field by field, with
# its train.py defaults for what the file leaves out (momentum 0.9; timm's `sgd` is Nesterov SGD).
# Label smoothing 0.1 is a method option (every method's default); the views are the ofa_cnn recipe
# (RandomResizedCrop, flip, bilinear or bicubic per view); the warm-up starts at timm's 1e-4.
PRESETS.add("ofa_cifar_cnn", dict(epochs=300, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                                   nesterov=True, weight_decay=2e-3, warmup_epochs=3, schedule="cosine",
                                   min_lr=1e-3, input_size=224, warmup_lr=1e-4, recipe="ofa_cnn"))
# The OFA authors' own ResNet18 CIFAR runs: cnn.yaml with lr 0.1 (the args.yaml of OFAKD issue #14;
# combine with the method preset ofa:authors_cifar, w_ofa=0.1).
PRESETS.add("ofa_cifar_cnn_authors", dict(PRESETS.get("ofa_cifar_cnn"), lr=0.1))
# MLDR-KD: the same recipe (SGD Nesterov, lr 0.05, cosine to 1e-3), and its optimiser decays every
# parameter, biases and norms included.
PRESETS.add("mldr_cifar_cnn", dict(PRESETS.get("ofa_cifar_cnn"), decay_all=True))
# OFA-KD, ViT/MLP students: configs/cifar/vit_mlp.yaml's optimiser and schedule field by field (AdamW
# lr 5e-4, wd 0.05, cosine to 1e-5, 20 warm-up epochs); drop path stays at train.py's default (none).
# Warm-up from 5e-7, gradient clipping 5.0; RandAugment, erasing and mixup/cutmix are the ofa_vit views.
PRESETS.add("ofa_cifar_vit", dict(epochs=300, batch_size=128, optimizer="adamw", lr=5e-4, weight_decay=0.05,
                                   warmup_epochs=20, warmup_lr=5e-7, clip_grad=5.0, schedule="cosine", min_lr=1e-5,
                                   input_size=224, recipe="ofa_vit"))
# CPU-sized recipes for Fashion-MNIST at 32x32 (docs/recipes.md, "Fashion-MNIST reference runs":
# transformer/MLP students need AdamW).
PRESETS.add("fashion_cnn", dict(epochs=4, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                                 weight_decay=5e-4, warmup_epochs=0.3, schedule="cosine", recipe="padcrop"))
PRESETS.add("fashion_vit", dict(epochs=4, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                                 warmup_epochs=0.3, schedule="cosine", recipe="padcrop"))
PRESETS.add("fashion_teacher", dict(epochs=8, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                                     warmup_epochs=1, schedule="cosine", recipe="cifar"))


SMALL_DATASETS = ("fashion-mnist", "synthetic")
SMALL_INPUT = 64  # a model built for inputs this size or smaller gets the 32-px presets


def preset_for(student: str, dataset: str) -> str:
    """The default preset for a student on a dataset, chosen by the student's input size: a model
    built for small inputs (resnet18_32, mixer_pico, ...) gets the 32-px CPU-sized presets on every
    dataset, since the OFA presets set input_size 224, which such a model either cannot take (a
    token model's grid is fixed) or would silently train at; a 224 model gets the OFA presets,
    except on the small datasets."""
    from kdcache.models import MODELS

    spec = MODELS.get(student)
    small = dataset in SMALL_DATASETS or spec.input_size <= SMALL_INPUT
    if spec.family == "cnn":
        return "fashion_cnn" if small else "ofa_cifar_cnn"
    return "fashion_vit" if small else "ofa_cifar_vit"


def input_sizes(student: str) -> str:
    """The input sizes a student takes, in words: a CNN any size from 32 (global pooling after five
    stride-2 stages), a token model (ViT, DeiT, Swin, Mixer, ResMLP) only the one it is built for
    (its patch grid, windows or token-mixing width are fixed when it is built)."""
    from kdcache.models import MODELS

    spec = MODELS.get(student)
    return "any size >= 32" if spec.family == "cnn" else f"only {spec.input_size}"


def check_input_size(student: str, input_size: int | None, preset: str | None = None,
                     dataset: str = "imagefolder") -> None:
    """Refuse, before any data or model is loaded, an input size `student` cannot take (None: the
    student's own size), naming where the size came from and the fix."""
    from kdcache.models import MODELS

    spec = MODELS.get(student)
    if input_size is None or input_size == spec.input_size or (spec.family == "cnn" and input_size >= 32):
        return
    by_preset = preset is not None and PRESETS.get(preset).get("input_size") == input_size
    came = f"preset {preset} sets input_size {input_size}" if by_preset else f"--input-size {input_size}"
    raise KDCacheError(f"{came}, which student {student} ({spec.family}, built for {spec.input_size} px) cannot take",
                       expected=f"{student}: {input_sizes(student)}",
                       fix=(f"pass --preset {preset_for(student, dataset)} (made for its size) or --input-size "
                            f"{spec.input_size}" if by_preset else
                            f"pass --input-size {spec.input_size} or leave it out (the student's own size)")
                           + f", or choose a student built for {input_size} px (kdcache list)")


# The student `kdcache train` uses when none is named: a CPU-sized one where the dataset is small
# (the demo's pair resnet18_32 -> mixer_pico), the papers' ResNet-18 elsewhere.
DEFAULT_STUDENTS = {"fashion-mnist": "mixer_pico", "synthetic": "mixer_pico", "cifar10": "resnet18",
                    "cifar100": "resnet18", "imagefolder": "resnet18"}


def default_student(dataset: str) -> str:
    if dataset not in DEFAULT_STUDENTS:
        raise KDCacheError(f"no default student for dataset {dataset!r}", fix="pass --student NAME (kdcache list)")
    return DEFAULT_STUDENTS[dataset]


# The view recipe `kdcache extract` uses when none is named: the one the dataset's students train with.
DEFAULT_RECIPES = {"fashion-mnist": "padcrop", "synthetic": "padcrop", "cifar10": "rrc", "cifar100": "rrc",
                   "imagefolder": "rrc"}


def default_views(dataset: str, recipe: str | None, views: int | None) -> tuple[str, int | None, str]:
    """(recipe, views, what was chosen and why) for an extraction that leaves them out: the
    dataset's recipe, and one view per epoch of its default student's preset (every view of an
    enumerating recipe: the recipe decides)."""
    from kdcache.data import get_recipe

    recipe = recipe or DEFAULT_RECIPES.get(dataset, "cifar")
    r = get_recipe(recipe)
    if views is None and not r.enumerates:
        student = DEFAULT_STUDENTS.get(dataset, "resnet18")
        epochs = PRESETS.get(preset_for(student, dataset))["epochs"]
        views = r.views_for_epochs(epochs)
    shown = views if views is not None else r.default_views
    return recipe, views, f"recipe {recipe} with {shown} views (the {dataset} default)"
