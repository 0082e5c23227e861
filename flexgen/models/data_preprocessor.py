"""Moves a collated batch to the model's device, without blocking the host."""
from mmengine.model import BaseDataPreprocessor

from flexgen.registry import MODELS
from flexgen.structures import ImageGroups, TokenBatch


@MODELS.register_module()
class FlexDataPreprocessor(BaseDataPreprocessor):
    """mmengine's ``BaseDataPreprocessor`` that also moves flexgen's batch structures
    (:class:`~flexgen.structures.TokenBatch` with its geometry,
    :class:`~flexgen.structures.ImageGroups`), all with ``non_blocking=True``: from the
    pinned memory a dataloader with ``pin_memory=True`` fills, the copies never wait
    for the device (mmengine's default blocks on every tensor)."""

    def __init__(self, non_blocking: bool = True):
        super().__init__(non_blocking=non_blocking)

    def cast_data(self, data):
        if isinstance(data, (TokenBatch, ImageGroups)):
            return data.to(self.device, non_blocking=self._non_blocking)
        return super().cast_data(data)
