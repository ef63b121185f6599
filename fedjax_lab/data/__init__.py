"""Federated data: the flat layout, partitioners, cohort sampling and dataset loaders."""

from fedjax_lab.data import datasets, participation, partition, sampling
from fedjax_lab.data._federated import FederatedData

__all__ = ["FederatedData", "datasets", "participation", "partition", "sampling"]
