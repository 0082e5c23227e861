"""tools/gpu_check.py at toy sizes on the CPU: every check runs through the real configs
and writes its table and JSON (the numbers that matter come from a GPU)."""
import json

import pytest

from helpers import load_tool


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_at_toy_sizes(tmp_path, capsys):
    gpu_check = load_tool('gpu_check')
    out = tmp_path / 'gpu_check.json'
    gpu_check.main(['--tiny', '--steps', '2', '--warmup', '1', '--no-compile',
                    '--out', str(out), '--device', 'cpu'])
    report = json.loads(out.read_text())
    rows = report['rows']
    attention = {r['backend']: r for r in rows if r['check'] == 'attention'}
    for name in ('sdpa', 'per_image', 'flex'):
        assert attention[name]['ok'] and attention[name]['relative_error'] < 3e-2, name
    assert 'flash-attn' in attention['flash_varlen']['note']  # not installed: said why
    assert 'CUDA' in attention['torch_varlen']['note']  # a CUDA kernel: said why
    train = {r['recipe']: r for r in rows if r['check'] == 'train'}
    assert set(train) == {'nit_xl', 'dit_xl', 'fitv2_xl'}
    for name, row in train.items():
        assert row['ok'], row.get('note')
        assert row['step_ms'] > 0 and row['tokens_per_s'] > 0 and row['flops_per_token'] > 0
    assert train['nit_xl']['syncs_per_step'] == 0  # the packed recipe's hot path
    assert train['nit_xl']['tokens_per_step'] <= 1024 < 2 * train['nit_xl']['tokens_per_step']
    printed = capsys.readouterr().out
    assert 'MFU = 3 x forward FLOPs' in printed and 'nit_xl' in printed
