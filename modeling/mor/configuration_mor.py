"""Configuration of Mixture-of-Recursions (Bae et al., "Mixture-of-Recursions: Learning Dynamic Recursive Depths
for Adaptive Token-Level Computation", arXiv 2507.10524)."""

from __future__ import annotations

import math

from hf_memory.configuration_utils import (
    HFMemoryConfig,
    register_layer_type,
    require,
    require_attention,
    require_common,
    require_finite,
    require_layer_types,
    require_positive,
    require_rope,
    strict_config,
)

LAYER_TYPES = ("recursive_attention", "full_attention")
register_layer_type("recursive_attention")
SHARINGS = ("middle_cycle", "cycle", "sequence")
ROUTINGS = ("expert_choice", "token_choice", "none")
ROUTER_FUNCTIONS = {"expert_choice": ("sigmoid", "tanh"), "token_choice": ("softmax", "sigmoid"), "none": ()}
GATINGS = ("weighted", "none")
CAUSAL_ROUTINGS = ("aux_loss", "aux_router")
KV_CACHE_SCHEMES = ("recursion_wise", "recursive_sharing")
# the published defaults (authors' code, util/config.py and conf/pretrain/*_smollm-360m_*.yaml)
ROUTING_DEFAULTS = {
    "expert_choice": dict(router_function="sigmoid", router_alpha=0.1, router_aux_loss_coef=1e-3,
                          router_z_loss_coef=0.0),
    "token_choice": dict(router_function="softmax", router_alpha=1.0, router_aux_loss_coef=0.1,
                         router_z_loss_coef=1e-5),
    "none": dict(router_function=None, router_alpha=1.0, router_aux_loss_coef=0.0, router_z_loss_coef=0.0),
}


@strict_config
class MoRConfig(HFMemoryConfig):
    r"""
    A Llama-style decoder whose ``num_hidden_layers`` applied layers reuse the weights of fewer unique layers,
    and whose tokens each take their own number of passes through the shared block.

    Parameter sharing (``sharing``; section 2.1 of the paper, Middle-Cycle its best):
      * ``"middle_cycle"``: a unique first and last layer around a block of K = (L - 2) / N_r layers applied
        ``num_recursions`` (N_r) times: applied layer l uses unique layer 1 + (l - 1) mod K;
      * ``"cycle"``: a block of K = L / N_r layers applied N_r times (l uses l mod K);
      * ``"sequence"``: every unique layer applied N_r times in a row (l uses l // N_r); no routing.

    Routing (``routing``; section 2.2):
      * ``"expert_choice"``: before recursion r a router scores the tokens still active,
        g = ``router_alpha`` * sigmoid(w_r^T h) (or tanh), and in training the top ``capacities[r]`` fraction of
        the row's tokens continue: h <- h + g * f(h), the others pass through. Top-k over a sequence sees the
        future, so inference decides causally per token (``causal_routing``): ``"aux_loss"`` trains the router
        itself with a BCE towards the top-k choice (coefficient ``router_aux_loss_coef``, paper 0.001) and
        continues a token where sigmoid(w_r^T h) >= 0.5; ``"aux_router"`` trains a separate router on the
        detached hidden state for that decision. A recursion of capacity 1.0 keeps every token.
        ``capacities`` (default (N_r - r) / N_r) are read by expert-choice only.
      * ``"token_choice"``: one router at the block input assigns each token a depth, top-1 of
        ``router_alpha`` * softmax(W h) over the N_r depths; a balancing loss (coefficient
        ``router_aux_loss_coef``, 0.1) and a z-loss (``router_z_loss_coef``, 1e-5).
      * ``"none"``: every token takes every recursion (the plain recursive transformer).

    ``router_gating="weighted"`` is the paper's h + g * f(h) with f the block's output (its own residuals
    included, as in the authors' code); ``"none"`` replaces the routed tokens' states by f(h), so that with
    every capacity 1.0 the model is the plain recursive transformer.

    KV cache (``kv_cache_scheme``, section 2.3): ``"recursion_wise"`` keeps, per applied layer, the keys and
    values of the tokens that reached it, and attention at a depth reads only those; ``"recursive_sharing"``
    keeps the first recursion's keys and values, which deeper recursions read (their own are not computed).
    """

    model_type = "hfm_mor"
    layer_type_choices = LAYER_TYPES
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 49152
    hidden_size: int = 960
    intermediate_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 15
    num_key_value_heads: int | None = 5
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    num_recursions: int = 3
    sharing: str = "middle_cycle"
    routing: str = "expert_choice"
    capacities: list[float] | None = None
    router_function: str | None = None
    router_alpha: float | None = None
    router_gating: str = "weighted"
    causal_routing: str = "aux_loss"
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float | None = None
    kv_cache_scheme: str = "recursion_wise"

    # ------------------------------------------------------------------------------------------- layout
    @property
    def unique_edges(self) -> int:
        """Unique layers outside the shared block: the first and last of Middle-Cycle."""
        return 2 if self.sharing == "middle_cycle" else 0

    @property
    def block_size(self) -> int:
        """K: the layers of the shared block (``sequence``: the unique layers)."""
        return (self.num_hidden_layers - self.unique_edges) // self.num_recursions

    @property
    def num_unique_layers(self) -> int:
        return self.block_size + self.unique_edges

    def unique_layer(self, layer: int) -> int:
        """The unique layer whose weights applied layer ``layer`` uses."""
        k, last = self.block_size, self.num_hidden_layers - 1
        if self.sharing == "middle_cycle":
            return 0 if layer == 0 else k + 1 if layer == last else 1 + (layer - 1) % k
        return layer % k if self.sharing == "cycle" else layer // self.num_recursions

    def recursion_layers(self, recursion: int) -> list[int]:
        """The applied layers of recursion ``recursion`` (``sequence``: one pass over every applied layer)."""
        if self.sharing == "sequence":
            return list(range(self.num_hidden_layers))
        start = self.unique_edges // 2 + recursion * self.block_size
        return list(range(start, start + self.block_size))

    @property
    def num_routed_recursions(self) -> int:
        return 1 if self.sharing == "sequence" else self.num_recursions

    def derived_layer_types(self) -> list[str]:
        types = ["recursive_attention"] * self.num_hidden_layers
        if self.sharing == "middle_cycle":
            types[0] = types[-1] = "full_attention"
        return types

    # ------------------------------------------------------------------------------------------- checks
    def fill_defaults(self) -> None:
        """``layer_types`` from the sharing; capacities (N_r - r) / N_r; the routing's published router defaults."""
        super().fill_defaults()
        if (self.layer_types is None or self.layer_types == ["recursive_attention"] * self.num_hidden_layers) \
                and self._layout_is_valid():
            self.layer_types = self.derived_layer_types()
        if self.routing == "expert_choice" and self.capacities is None and isinstance(self.num_recursions, int) \
                and self.num_recursions > 0:
            self.capacities = [(self.num_recursions - r) / self.num_recursions for r in range(self.num_recursions)]
        for name, value in ROUTING_DEFAULTS.get(self.routing, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def _layout_is_valid(self) -> bool:
        try:
            self._require_layout()
        except ValueError:
            return False
        return True

    def _require_layout(self) -> None:
        require_positive(self, "num_hidden_layers", "num_recursions")
        require(self.sharing in SHARINGS, "sharing", f"must be one of {list(SHARINGS)}, got {self.sharing!r}")
        edges, n = self.unique_edges, self.num_recursions
        require(self.num_hidden_layers > edges and (self.num_hidden_layers - edges) % n == 0, "num_hidden_layers",
                f"the applied layers must be {'2 + ' if edges else ''}num_recursions ({n}) x the shared block's "
                f"layers under sharing={self.sharing!r}, got {self.num_hidden_layers}")

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_common(self)
        require_attention(self)
        require_rope(self)
        self._require_layout()
        require_layer_types(self, LAYER_TYPES)
        require(list(self.layer_types) == self.derived_layer_types(), "layer_types",
                f"is set by the sharing ({self.sharing!r}): {self.derived_layer_types()}, got {self.layer_types}")
        require(self.routing in ROUTINGS, "routing", f"must be one of {list(ROUTINGS)}, got {self.routing!r}")
        require(self.routing == "none" or self.sharing != "sequence", "sharing",
                "routing needs a block applied recursively (middle_cycle or cycle); sequence repeats each layer in "
                "a row and supports routing='none' only")
        require(self.kv_cache_scheme in KV_CACHE_SCHEMES, "kv_cache_scheme",
                f"must be one of {list(KV_CACHE_SCHEMES)}, got {self.kv_cache_scheme!r}")
        require(self.kv_cache_scheme == "recursion_wise" or self.sharing != "sequence", "kv_cache_scheme",
                "recursive KV sharing reuses the first recursion of a shared block (middle_cycle or cycle)")
        functions = ROUTER_FUNCTIONS[self.routing]
        require(self.router_function in (functions or (None,)), "router_function",
                f"routing={self.routing!r} takes one of {list(functions) or [None]}, got {self.router_function!r}")
        require(self.router_gating in GATINGS, "router_gating",
                f"must be one of {list(GATINGS)}, got {self.router_gating!r}")
        require(self.causal_routing in CAUSAL_ROUTINGS, "causal_routing",
                f"must be one of {list(CAUSAL_ROUTINGS)}, got {self.causal_routing!r}")
        require_finite(self, "router_alpha", positive=True)
        require_finite(self, "router_aux_loss_coef", "router_z_loss_coef")
        require(self.router_aux_loss_coef >= 0 and self.router_z_loss_coef >= 0, "router_aux_loss_coef",
                "router loss coefficients must be >= 0")
        if self.routing == "expert_choice":
            self._require_capacities()

    def _require_capacities(self) -> None:
        c = self.capacities
        require(isinstance(c, (list, tuple)) and len(c) == self.num_recursions, "capacities",
                f"must list one fraction per recursion (num_recursions={self.num_recursions}), got {c!r}")
        require(all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 < x <= 1
                    for x in c), "capacities", f"must be fractions in (0, 1], got {c!r}")
        require(all(a >= b for a, b in zip(c, c[1:])), "capacities",
                f"must not increase with depth (only tokens of recursion r may continue to r + 1), got {c!r}")


__all__ = ["MoRConfig"]
