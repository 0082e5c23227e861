"""The Runner the tools build: mmengine's, with a console a user can read."""
import logging

from mmengine.runner import Runner

from flexgen.registry import RUNNERS


class StartupDumpFilter(logging.Filter):
    """Drops the Runner's start-up dumps (system environment, the whole config, the hook
    order: hundreds of lines) from a handler; the log file keeps them."""

    PREFIXES = ('System environment:', 'Config:\n', 'Hooks will be executed in the following')

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage() if isinstance(record.msg, str) else ''
        return not message.lstrip('\n-').startswith(self.PREFIXES)


@RUNNERS.register_module()
class FlexRunner(Runner):
    """mmengine's ``Runner`` whose console leaves out the start-up dumps (environment,
    config, hook order) and says where they are instead: the log file in
    ``work_dir/<timestamp>/`` has everything, and the config is also dumped to the work
    dir as a file. ``tools/train.py`` and ``tools/test.py`` build it unless the config
    names a ``runner_type``."""

    def build_logger(self, log_level='INFO', log_file=None, **kwargs):
        logger = super().build_logger(log_level, log_file, **kwargs)
        files = [h.baseFilename for h in logger.handlers if isinstance(h, logging.FileHandler)]
        for handler in logger.handlers:
            console = isinstance(handler, logging.StreamHandler) and \
                not isinstance(handler, logging.FileHandler)
            if console and not any(isinstance(f, StartupDumpFilter) for f in handler.filters):
                handler.addFilter(StartupDumpFilter())
        if files:
            logger.info(f'Environment, full config and hook order: {files[0]}')
        return logger
