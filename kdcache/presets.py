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


def preset_for(student_family: str, dataset: str) -> str:
    """The default preset for a student family on a dataset."""
    small = dataset in ("fashion-mnist", "synthetic")
    if student_family == "cnn":
        return "fashion_cnn" if small else "ofa_cifar_cnn"
    return "fashion_vit" if small else "ofa_cifar_vit"




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
        from kdcache.models import MODELS

        student = DEFAULT_STUDENTS.get(dataset, "resnet18")
        epochs = PRESETS.get(preset_for(MODELS.get(student).family, dataset))["epochs"]
        views = r.views_for_epochs(epochs)
    shown = views if views is not None else r.default_views
    return recipe, views, f"recipe {recipe} with {shown} views (the {dataset} default)"
