"""The Zarr cache: schema (self-description), creation, block writes, completeness and reads."""

from kdcache.store.schema import StoreAttrs, TeacherAttrs, store_path, versions
from kdcache.store.store import Store, TeacherCache

__all__ = ["Store", "StoreAttrs", "TeacherAttrs", "TeacherCache", "store_path", "versions"]
