"""Log-length "proportional attention" rules of FiTv2 / NiT: ``cos`` and ``sin`` are
multiplied by ``p = sqrt(ln(m * n_test) / ln(n_train))`` (so logits by ``p^2``), on top of
NTK-aware frequencies (``ntkpro1`` / ``ntkpro2``) or of plain ones (NiT's ``scale1`` /
``scale2``). Length 1 uses the longer side (``n_test = max(h, w)``, ``n_train = L``),
length 2 the area (``n_test = h * w``, ``n_train = L^2``); ``p = 1`` while
``m * n_test <= n_train``.

The reference multiplies the test length by ``m = 2`` (``length_multiplier``): ``p > 1``
already at the training size (``L = 16``: ``p1 = sqrt(ln 32 / ln 16) = 1.118`` at 16 x 16),
and ``p = 1`` only up to half the training side (length 1) or area (length 2). Set
``length_multiplier=1`` for the plain log-ratio form.
"""
import math

from flexgen.registry import POSITION_ENCODINGS

from .rope_scaling import RoPEScaling, ntk_frequencies


class _Proportional(RoPEScaling):
    use_area = False
    use_ntk = False

    def __init__(self, ori_max_pe_len=None, decouple=False, length_multiplier=2.0):
        super().__init__(ori_max_pe_len, decouple)
        self.length_multiplier = float(length_multiplier)

    def axis_frequencies(self, dim, theta, scale):
        if self.use_ntk:
            return ntk_frequencies(dim, theta, scale)
        return super().axis_frequencies(dim, theta, scale)

    def attention_factor(self, h, w):
        length = self.ori_max_pe_len
        test, train = (h * w, length ** 2) if self.use_area else (max(h, w), length)
        test = self.length_multiplier * test
        return 1.0 if test <= train else math.sqrt(math.log(test) / math.log(train))


@POSITION_ENCODINGS.register_module()
class NTKPro1(_Proportional):
    """FiTv2 ``'ntk-aware-pro1'``: NTK-aware frequencies and
    ``p1 = sqrt(ln(2 max(h, w)) / ln L)`` (1 if ``2 max(h, w) <= L``) on cos and sin."""
    use_ntk = True


@POSITION_ENCODINGS.register_module()
class NTKPro2(_Proportional):
    """FiTv2 ``'ntk-aware-pro2'``: NTK-aware frequencies and
    ``p2 = sqrt(ln(2 h w) / ln L^2)`` (1 if ``2 h w <= L^2``) on cos and sin."""
    use_ntk, use_area = True, True


@POSITION_ENCODINGS.register_module()
class ProportionScale1(_Proportional):
    """NiT ``'scale1'``: plain frequencies and the factor ``p1`` of :class:`NTKPro1`."""


@POSITION_ENCODINGS.register_module()
class ProportionScale2(_Proportional):
    """NiT ``'scale2'``: plain frequencies and the factor ``p2`` of :class:`NTKPro2`."""
    use_area = True
