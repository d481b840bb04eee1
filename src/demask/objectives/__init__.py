"""Training objectives. `masked`: the MDLM / MaskGIT objective and the NELBO weights."""

from demask.objectives.masked import (
    augment_masked,
    count_masks,
    discrete_step_weight,
    draw_masks,
    masked_loss,
    mdlm_weight,
    midpoint_times,
    stratified_times,
)

__all__ = [
    "augment_masked",
    "count_masks",
    "discrete_step_weight",
    "draw_masks",
    "masked_loss",
    "mdlm_weight",
    "midpoint_times",
    "stratified_times",
]
