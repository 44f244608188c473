"""Differentiable ops (torch.library custom ops + autograd) over the Triton kernels."""
