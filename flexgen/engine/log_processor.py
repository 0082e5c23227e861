"""The log processor: validation and test times under their own names."""
from mmengine.runner import LogProcessor

from flexgen.registry import LOG_PROCESSORS


@LOG_PROCESSORS.register_module()
class FlexLogProcessor(LogProcessor):
    """mmengine's ``LogProcessor`` whose validation and test records name their times
    ``val/time``, ``val/data_time`` (``test/...``): mmengine writes them as plain ``time`` and
    ``data_time``, the names of the training step's times, so in ``scalars.json`` and
    TensorBoard one ``time`` curve would mix training steps with validation batches.
    Arguments are ``LogProcessor``'s; the console line is unchanged."""

    def get_log_after_epoch(self, runner, batch_idx, mode, with_non_scalar=False):
        tag, log_str = super().get_log_after_epoch(runner, batch_idx, mode, with_non_scalar)
        renamed = {f'{mode}/{key}' if key in ('time', 'data_time') else key: value
                   for key, value in tag.items()}
        return type(tag)(renamed), log_str
