"""Analysis of trained runs: which experts take which tokens (``moekit inspect``)."""

from .report import inspect_run
from .routing import RoutingData, collect_routing, layer_table, routing_table

__all__ = ["inspect_run", "routing_table", "layer_table", "collect_routing", "RoutingData"]
