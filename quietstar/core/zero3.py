"""Parameters that DeepSpeed ZeRO-3 has partitioned: reading one whole, and counting what a rank holds.

Under ZeRO-3 (and after ``deepspeed.zero.Init``) each parameter's ``.data`` is an empty
placeholder; the rank's share lives in ``param.ds_tensor`` and the full shape in
``param.ds_shape``. Code that reads a weight outside a forward (the marker initialisation
reads rows of the embedding matrix) gathers it first.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


def is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(param: nn.Parameter) -> Iterator[nn.Parameter]:
    """``param`` with its full data for the duration of the block (read only); a no-op for a whole parameter."""
    if not is_partitioned(param):
        yield param
        return
    import deepspeed  # here, not at the top: `import quietstar` stays free of DeepSpeed (and of its import-time notices)

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield param


def full_numel(param: nn.Parameter) -> int:
    """The elements of the whole parameter, partitioned or not."""
    return param.ds_numel if is_partitioned(param) else param.numel()


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full parameters) over ``module``'s parameters."""
    params = list(module.parameters())
    held = sum(p.ds_tensor.numel() if is_partitioned(p) else p.numel() for p in params)
    return held, sum(full_numel(p) for p in params)
