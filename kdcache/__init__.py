"""kdcache: heterogeneous knowledge distillation from cached teacher outputs.

Stage one (`kdcache extract`) runs a teacher once over every planned augmented view and writes its
outputs to a Zarr store; stage two (`kdcache train`) trains students from those cached targets.
"""

__version__ = "0.1.0"
