_base_ = ['./toy_train.py']

trian_cfg = dict(max_iters=3)
