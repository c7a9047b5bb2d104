""":class:`HoliTomConfig`: the knobs of HoliTom's outer-LLM merging (spec ``shared/specs/tokens.md`` §1, §4)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from ..config import VoptConfig, config_field, register_config
from ..errors import ConfigError


#: Outer-stage methods: HoliTom and the peers implemented as configs of the same stage.
MERGE_METHODS = ("holitom", "visionzip", "pool")


class ClusterMergeMode(str, Enum):
    """How a DPC-KNN cluster becomes one token (spec §1.4)."""

    BETA = "beta"  #: beta * centre + (1 - beta) * mean(members)  (reference default)
    MEAN = "mean"  #: mean of centre and members (reference ``NO_BETA``)


class BudgetRounding(str, Enum):
    """How the token budget is split over the spatial groups (one static group per segment, one dynamic per frame)."""

    EXACT = "exact"          #: largest-remainder apportionment: the output has exactly min(budget, survivors) tokens
    REFERENCE = "reference"  #: the published rounding: ceil(n * r_eff) per frame, round(n * r_eff) per static group


@register_config
@dataclass
class HoliTomConfig(VoptConfig):
    """HoliTom outer-LLM merging: temporal segmentation (DP), temporal merge, spatial merge to a budget."""

    retain_ratio: float = config_field(
        0.1, help="Fraction r of the F*N visual tokens kept (published runs: 0.10-0.25). The budget is "
        "max(1, round(r*F*N)) unless token_budget is set.")
    token_budget: Optional[int] = config_field(
        None, help="Absolute number of visual tokens kept (overrides retain_ratio); None = use retain_ratio.")
    tau: float = config_field(
        0.8, help="Cosine-similarity threshold: a token position is static across consecutive frames when "
        "cos > tau (reference default 0.8; the 10%-retain scripts use 0.65).")
    max_window: int = config_field(1024, help="Longest temporal segment (frames) the DP considers (reference 1024).")
    beta: float = config_field(0.6, help="Weight of the cluster centre in beta-merging, in [0, 1] (reference 0.6).")
    dominant_ratio: float = config_field(
        0.0, help="D: fraction of each frame's dynamic budget given to DPC-KNN contextual tokens; the rest are the "
        "top tokens by attention score. Reference default 0 (pure attention top-k).")
    knn: int = config_field(7, help="K nearest neighbours for the DPC-KNN density (capped at the cluster count).")
    cluster_merge: ClusterMergeMode = config_field(
        ClusterMergeMode.BETA, help="'beta' (centre-weighted, reference default) or 'mean' (plain mean).")
    method: str = config_field(
        "holitom", help="'holitom' (temporal segmentation + temporal merge + spatial merge), or a peer for comparison "
        "at the same budget: 'visionzip' (per frame: top tokens by attention score + DPC-KNN contextual tokens, "
        "dominant_ratio of the budget contextual; no temporal stage) or 'pool' (per frame: uniform average pooling of "
        "consecutive raster tokens).")
    budget_rounding: BudgetRounding = config_field(
        BudgetRounding.EXACT, help="'exact' (output = min(budget, tokens left after temporal merging), exactly) or "
        "'reference' (the published per-group ceil/round, approximately the budget).")

    def validate(self) -> None:
        name = type(self).__name__

        def bad(field: str, accepted: str) -> ConfigError:
            return ConfigError(f"{name}.{field}={getattr(self, field)!r} is invalid; accepted: {accepted}")

        if not (0.0 < self.retain_ratio <= 1.0):
            raise bad("retain_ratio", "a number in (0, 1], e.g. 0.1")
        if self.token_budget is not None and self.token_budget < 1:
            raise bad("token_budget", "None or an integer >= 1")
        if not (-1.0 <= self.tau <= 1.0):
            raise bad("tau", "a cosine threshold in [-1, 1], e.g. 0.8")
        if self.max_window < 1:
            raise bad("max_window", "an integer >= 1, e.g. 1024")
        if not (0.0 <= self.beta <= 1.0):
            raise bad("beta", "a number in [0, 1], e.g. 0.6")
        if not (0.0 <= self.dominant_ratio <= 1.0):
            raise bad("dominant_ratio", "a number in [0, 1], e.g. 0.0")
        if self.method not in MERGE_METHODS:
            raise bad("method", ", ".join(MERGE_METHODS))
        if self.knn < 1:
            raise bad("knn", "an integer >= 1, e.g. 7")

    def budget(self, total: int) -> int:
        """The number of tokens to keep out of ``total``."""
        if self.token_budget is not None:
            return self.token_budget
        return max(1, math.floor(self.retain_ratio * total + 0.5))
