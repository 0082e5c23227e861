"""Every script in tools/ answers --help at once: its usage, a help text for every option,
and nothing heavy (torch, diffusers, ...) imported before its arguments are parsed; and a
malformed --cfg-options item is named, not an unpacking traceback; the tools that run under a
launcher export --local-rank as LOCAL_RANK."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = sorted(osp.basename(p) for p in glob.glob(osp.join(ROOT, 'tools', '*.py')))
HEAVY = ('torch', 'diffusers', 'timm', 'torchvision', 'safetensors.torch', 'transformers')

# Runs a tool as `python tools/<tool> ARGS`, and reports, when the tool first parses its
# arguments, which heavy modules are already loaded and which options lack a help text.
PROBE = '''
import argparse, json, runpy, sys
tool, argv, heavy = sys.argv[1], sys.argv[2:], {heavy!r}
parse = argparse.ArgumentParser.parse_known_args
def probe(parser, args=None, namespace=None):
    if not hasattr(probe, 'report'):
        probe.report = dict(
            heavy=sorted(m for m in heavy if m in sys.modules),
            no_help=[a.option_strings[0] if a.option_strings else a.dest
                     for a in parser._actions if not a.help])
        print('PROBE ' + json.dumps(probe.report), file=sys.stderr)
    return parse(parser, args, namespace)
argparse.ArgumentParser.parse_known_args = probe
sys.argv = [tool] + argv
sys.path.insert(0, 'tools')
runpy.run_path('tools/' + tool, run_name='__main__')
'''.format(heavy=HEAVY)


def run_tool(tool, *argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-c', PROBE, tool, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith('PROBE ')]
    assert lines, proc.stderr[-3000:]
    return proc, json.loads(lines[0][len('PROBE '):])


def test_every_tool_is_probed():
    assert TOOLS == ['benchmark.py', 'consolidate_checkpoint.py', 'convert_checkpoint.py',
                     'encode_latents.py', 'gpu_check.py', 'memory_plan.py', 'pack_dataset.py',
                     'sample.py', 'sweep_extrapolation.py', 'test.py', 'train.py']


@pytest.mark.parametrize('tool', TOOLS)
def test_help_is_whole_and_loads_nothing_heavy(tool):
    proc, report = run_tool(tool, '--help')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f'usage: {tool}'), proc.stdout[:500]
    assert report['heavy'] == [], f'{tool} imports {report["heavy"]} before parsing'
    assert report['no_help'] == [], f'{tool}: options without help: {report["no_help"]}'
    assert not any(m in proc.stderr for m in ('Traceback', 'Warning'))


def test_benchmark_help_keeps_its_whole_description():
    proc, _ = run_tool('benchmark.py', '--help')
    text = ' '.join(proc.stdout.split())
    assert ('candidates are timed in interleaved rounds and compared by their median '
            'per-round ratio.') in text
    assert '- sampling: every generation sampler at (about) the same number' in text


BAD_CFG_OPTIONS = [
    ('train.py', ['configs/demo/shapes_flexdit_rf.py', '--cfg-options',
                  'train_cfg.max_iters=5', 'train_cfg.val_interval'],
     "--cfg-options 'train_cfg.val_interval': each item must be KEY=VALUE"),
    ('test.py', ['configs/demo/shapes_flexdit_rf.py', 'x.pth', '--cfg-options', '=4'],
     "--cfg-options '=4': each item must be KEY=VALUE"),
    ('sample.py', ['configs/demo/shapes_flexdit_rf.py', 'x.pth', '--height', '16', '--width',
                   '16', '--cfg-options', 'model.guidance.interval=[0,0.8'],
     "--cfg-options 'model.guidance.interval=[0,0.8': Imbalanced brackets"),
]


@pytest.mark.parametrize('tool, argv, message', BAD_CFG_OPTIONS,
                         ids=[tool for tool, _, _ in BAD_CFG_OPTIONS])
def test_malformed_cfg_option_is_named(tool, argv, message):
    proc, report = run_tool(tool, *argv)
    assert proc.returncode == 2  # argparse's usage error
    assert f'{tool}: error: {message}' in proc.stderr, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr and report['heavy'] == []


LAUNCHED = [('train.py', ['configs/demo/shapes_flexdit_rf.py']),
            ('test.py', ['configs/demo/shapes_flexdit_rf.py', 'x.pth']),
            ('sweep_extrapolation.py', ['configs/demo/shapes_flexdit_rf.py', 'x.pth',
                                        '--rules', 'no', '--sizes', '16x16'])]


@pytest.mark.parametrize('tool, argv', LAUNCHED, ids=[tool for tool, _ in LAUNCHED])
def test_local_rank_of_torch_distributed_launch_is_exported(tool, argv, monkeypatch):
    """torch.distributed.launch passes --local-rank (or --local_rank); mmengine reads
    LOCAL_RANK, which torchrun sets itself and which then wins."""
    from helpers import load_tool
    parse_args = load_tool(osp.splitext(tool)[0]).parse_args
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert parse_args([*argv, '--local_rank', '3']).launcher == 'none'
    assert os.environ['LOCAL_RANK'] == '3'
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert parse_args([*argv, '--local-rank', '2', '--launcher', 'pytorch']).local_rank == 2
    assert os.environ['LOCAL_RANK'] == '1'
