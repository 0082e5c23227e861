# The demo with a block that lives outside flexgen. Run from the repository root:
#   PYTHONPATH=examples/custom_block python tools/train.py \
#       examples/custom_block/parallel_block_demo.py
_base_ = ['../../configs/demo/shapes_flexdit_rf.py']

custom_imports = dict(imports=['parallel_block'], allow_failed_imports=False)
model = dict(backbone=dict(block=dict(type='ParallelAdaLNBlock')))
