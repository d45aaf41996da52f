"""ndp: near-data processing for DLRM training.

Embedding tables live on storage nodes (emulated computational storage devices) that do the
embedding work near the data; GPU workers run the dense half; a coordinator plans, places
and pipelines both on Ray.
"""

__version__ = "0.1.0"
