"""Data layer: dataset registry (uint8 images, stable keys, fingerprints) and the view table.

The view table is the heart of kdcache's one invariant, "same view, same targets": every
(sample, view) gets a seed from (global seed, sample key, view id) and explicit params (crop/flip,
or every column of the augmented recipes: augment.py), and `render` / `loader.iter_views` turn
params into pixels at any resolution. See views.py.
"""

from kdcache.data.datasets import (
    DATASETS,
    Fingerprint,
    ImageDataset,
    check_available,
    load_dataset,
    subset_indices,
)
from kdcache.data.views import (
    PARAM_NAMES,
    RECIPES,
    Recipe,
    check_view_table,
    epoch_views,
    get_recipe,
    key_hashes,
    render,
    render_batch,
    view_seeds,
    view_table,
)
from kdcache.data.augment import AugmentedRecipe  # registers the ofa_cnn / ofa_vit recipes

__all__ = [
    "DATASETS", "Fingerprint", "ImageDataset", "check_available", "load_dataset", "subset_indices",
    "PARAM_NAMES", "RECIPES", "Recipe", "check_view_table", "epoch_views", "get_recipe", "key_hashes", "render",
    "render_batch", "view_seeds", "view_table", "AugmentedRecipe",
]
