"""Autograd for the ops: the forward records a node whose backward refuses clearly, instead of
torch's fallback, which would return silently wrong (zero) gradients. The backward pass is not
implemented yet."""

import torch


def _setup_context(ctx, inputs, output):
    pass


def _make_backward(op_name):
    def backward(ctx, grad_out, grad_lse):
        raise NotImplementedError(
            f"flash_dmattn: {op_name} has no backward pass yet (forward only); "
            "call it under torch.no_grad() or on tensors that do not require grad")
    return backward


for _name in ("mha_varlen_fwd", "mha_fwd"):
    torch.library.register_autograd(f"flash_dmattn::{_name}", _make_backward(_name), setup_context=_setup_context)
