"""TensorFloat-32 switches for float32 matmuls and cuDNN convolutions on CUDA."""
import torch


def tf32_flags():
    """``(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)``."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def set_tf32_flags(matmul: bool, cudnn: bool) -> None:
    # The legacy switches, as DiT / SiT: once torch's newer fp32_precision API is used, the
    # legacy getters (which torch's inductor still reads) raise; these setters keep both valid.
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn
