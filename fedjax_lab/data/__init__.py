"""Federated data: the flat layout, partitioners, cohort sampling and dataset loaders."""

from fedjax_lab.data import datasets, participation, partition, sampling
from fedjax_lab.data._federated import FederatedData
from fedjax_lab.data._memmap import load_memmap, save_memmap

__all__ = [
    "FederatedData",
    "datasets",
    "load_memmap",
    "participation",
    "partition",
    "sampling",
    "save_memmap",
]
