"""Input helpers shared by zoo entries."""
from __future__ import annotations

import torch

from ..errors import ConfigError

#: Text tokens around the visual placeholders in the zoo's example prompts.
PROMPT_TEXT_TOKENS = 6


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def prompt_ids(batch: int, n_placeholders: int, placeholder: int, vocab: int, generator: torch.Generator,
               n_text: int = PROMPT_TEXT_TOKENS) -> torch.Tensor:
    """``[batch, n_text + n_placeholders]`` ids: half the text ids, the placeholders, the other half.

    Text ids are drawn below ``placeholder`` and ``vocab - 16`` so they never hit special ids.
    """
    special_low = min(placeholder, vocab - 16)
    text = torch.randint(1, special_low, (batch, n_text), generator=generator)
    video = torch.full((batch, n_placeholders), placeholder, dtype=torch.long)
    half = n_text // 2
    return torch.cat([text[:, :half], video, text[:, half:]], dim=1)
