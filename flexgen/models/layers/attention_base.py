"""The attention-backend contract.

A backend is registered in ``ATTENTION_BACKENDS`` (a name, as ``attn_backend`` configs
use) and called as ``backend(q, k, v, batch) -> out``: ``q, k, v`` ``[N, heads, head_dim]``
in one dtype, the tokens of the jagged :class:`~flexgen.structures.TokenBatch` ``batch``;
``out`` is, for every image, ``softmax(q_i k_i^T / sqrt(head_dim)) v_i`` over that image's
tokens only (block-diagonal attention), shaped like ``q``.

A backend that is a packed kernel (one call over the whole batch that skips pairs of
tokens from different images) tells ``'auto'`` so: ``auto_priority`` orders the candidates
(lower first; ``None``: never a candidate) and ``runs_packed(device, dtype)`` says where it
runs. ``'auto'`` takes the first candidate that runs on the device and dtype of the call
and builds (a constructor raising ``ImportError`` means: not installed).
"""


class AttentionBackend:
    """Base class of attention backends (see the module docstring for the contract)."""

    #: rank among ``'auto'``'s packed kernels (lower first); None: not a candidate
    auto_priority = None

    @classmethod
    def runs_packed(cls, device, dtype) -> bool:
        """Whether this backend runs packed batches on ``device`` (a ``torch.device``) in
        ``dtype`` (for ``'auto'``)."""
        return False

    def __call__(self, q, k, v, batch):
        raise NotImplementedError(f'{type(self).__name__} does not implement __call__')
