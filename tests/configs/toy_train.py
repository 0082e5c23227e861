_base_ = ['../../configs/_base_/default_runtime.py', './toy_base.py']

default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
