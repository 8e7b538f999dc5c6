"""Mixture-of-Experts pieces: routers, dispatch, stacked experts, and the layer that joins them."""
from .experts import GroupedExperts
from .layer import MLP, MoELayer, MoEOutput
from .router import ExpertChoiceRouter, Routing, TopKRouter, load_balancing_loss, router_z_loss

__all__ = ["GroupedExperts", "MLP", "MoELayer", "MoEOutput", "ExpertChoiceRouter", "Routing", "TopKRouter",
           "load_balancing_loss", "router_z_loss"]
