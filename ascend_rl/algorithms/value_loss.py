"""Critic value loss with clipping around the old values."""

from __future__ import annotations

import torch

from ascend_rl.algorithms.aggregation import agg_loss
from ascend_rl.algorithms.masked import masked_mean


def value_loss(vpreds, values, returns, response_mask, cliprange_value=0.5, loss_agg_mode="token-mean", **agg):
    """½·agg(max((v − R)², (clip(v, v_old − c, v_old + c) − R)²)); returns (loss, clipfrac)."""
    clipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    loss_unclipped = (vpreds - returns).square()
    loss_clipped = (clipped - returns).square()
    loss = 0.5 * agg_loss(torch.maximum(loss_unclipped, loss_clipped), response_mask, loss_agg_mode, **agg)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).to(vpreds.dtype), response_mask)
    return loss, clipfrac.detach()
