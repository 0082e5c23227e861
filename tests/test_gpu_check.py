"""tools/gpu_check.py at toy sizes on the CPU: every check runs through the real configs
and writes its table and JSON (the numbers that matter come from a GPU)."""
import json

import pytest
import torch

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
    assert set(train) == {'nit_xl', 'nit_xl_repa', 'dit_xl', 'fitv2_xl'}
    # the REPA row counts its frozen encoder's forward (a ViT over the pack's images)
    assert train['nit_xl_repa']['encoder_flops_per_token'] > 0 == \
        train['nit_xl']['encoder_flops_per_token']
    for name, row in train.items():
        assert row['ok'], row.get('note')
        assert row['step_ms'] > 0 and row['tokens_per_s'] > 0 and row['flops_per_token'] > 0
        profile = row['profile']
        assert abs(sum(profile['by_kind'].values()) - 1) < 1e-6
        assert profile['by_kind']['matmul'] > 0 and len(profile['top']) == 10
    assert train['nit_xl']['syncs_per_step'] == 0  # the packed recipe's hot path
    assert train['nit_xl_repa']['syncs_per_step'] == 0  # ... with its REPA encoder
    assert train['nit_xl']['attention'] == 'auto -> sdpa'  # what 'auto' took on a CPU
    assert train['nit_xl']['tokens_per_step'] <= 1024 < 2 * train['nit_xl']['tokens_per_step']
    (sharded,) = [r for r in rows if r['check'] == 'sharded']  # FSDP2 on one gloo rank
    assert sharded['ok'] and sharded['wrapper'] == 'FullyShardedWrapper', sharded.get('note')
    assert sharded['resume_max_diff'] == {'model': 0.0, 'ema': 0.0}  # resume is exact
    assert not torch.distributed.is_initialized()  # its process group is gone
    printed = capsys.readouterr().out
    assert 'MFU = (3 x forward FLOPs + REPA encoder FLOPs)' in printed and 'nit_xl' in printed
    assert 'time by kind: ' in printed


def test_profile_kinds_of_the_kernels_an_h200_step_ran():
    """Kernel and operator names from docs/gpu_runs/ (NiT-XL on an H200) and this CPU."""
    kind_of = load_tool('gpu_check').kind_of
    expected = {
        'nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN': 'matmul',
        'sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64': 'matmul',
        'aten::addmm': 'matmul',
        'triton_tem_fused_flex_attention_backward_1': 'attention',
        'triton_tem_fused_flex_attention_0': 'attention',
        'pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4':
            'attention',
        'aten::_scaled_dot_product_flash_attention_for_cpu': 'attention',
        'void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<f': 'norm',
        'void at::native::unrolled_elementwise_kernel<at::native::direct_copy_k':
            'copy / cast',
        'aten::copy_': 'copy / cast',
        'void at::native::indexFuncLargeIndex<float, long, unsigned int, 2, 2, ':
            'index / gather',
        'void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native':
            'optimizer + EMA',
        'aten::_fused_adamw_': 'optimizer + EMA',
        'triton_tem_fused_addmm_4': 'matmul',
        'triton_poi_fused_add_mul_native_layer_norm_0': 'compiled (fused)',
        'triton_poi_fused__to_copy_add_mul_3': 'compiled (fused)',
        'triton_red_fused_mul_sum_12': 'compiled (fused)',
        'void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernel':
            'elementwise / other',
    }
    assert {name: kind_of(name) for name in expected} == expected
