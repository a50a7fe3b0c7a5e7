"""The op layer: every computation that has a fast path, each with a float64 reference.

Families (one module each, kernels picked per call by :mod:`bct_fast.ops.providers`):

- margin softmax (:mod:`~bct_fast.ops.margin_softmax`): ``cosine_margin_cross_entropy``, the
  fused normalized-softmax margin loss (torch.library ops ``bct_fast::softmax_stats`` /
  ``softmax_grads`` + an autograd Function); providers ``margin_softmax_torch`` (chunked) and
  ``margin_softmax_cuda``;
- cosine top-k (:mod:`~bct_fast.ops.topk`): ``cosine_topk``; providers ``topk_select`` (chunked
  GEMM + running top-k, C++ selector on CPU) and ``topk_cuda`` (fused kernel);
- shared pieces: ``margins`` (the margin definitions), ``rows`` (row norms), ``cpu_gemm``
  (oneDNN products), ``reference`` (float64 oracles).

The user API (``bct_fast.losses``, ``search``, ``metrics``, ...) imports only the names below.
"""
from bct_fast.ops.margin_softmax import (CosineMarginCrossEntropyFunction, check_loss_options,
                                         cosine_margin_cross_entropy, normalization_backward_rows)
from bct_fast.ops.margins import Margin, MarginValue, make_margin, target_function
from bct_fast.ops.providers import BACKENDS
from bct_fast.ops.rows import inv_row_norms, normalize_rows
from bct_fast.ops.topk import cosine_topk
from bct_fast.ops.topk_select import topk_lowest_index_ties

__all__ = [
    "cosine_margin_cross_entropy", "CosineMarginCrossEntropyFunction", "check_loss_options",
    "normalization_backward_rows", "Margin", "MarginValue", "make_margin", "target_function",
    "BACKENDS", "inv_row_norms", "normalize_rows", "cosine_topk", "topk_lowest_index_ties",
]
