"""Real-ESRGAN second-order degradation model on batched tensors (see :mod:`.pipeline`)."""

from semsr.data.degradations.jpeg import jpeg_compress
from semsr.data.degradations.kernels import (
    KERNEL_TYPES,
    KernelSpec,
    filter2d,
    gaussian_kernel,
    generalized_gaussian_kernel,
    plateau_kernel,
    sinc_kernel,
    usm_sharpen,
)
from semsr.data.degradations.noise import add_gaussian_noise, add_poisson_noise
from semsr.data.degradations.pipeline import (
    DegradationConfig,
    DegradationParams,
    RealESRGANDegradation,
    StageConfig,
    image_seed,
    sample_params,
)
from semsr.data.degradations.resize import RESIZE_MODES, resize

__all__ = [
    "KERNEL_TYPES",
    "RESIZE_MODES",
    "DegradationConfig",
    "DegradationParams",
    "KernelSpec",
    "RealESRGANDegradation",
    "StageConfig",
    "add_gaussian_noise",
    "add_poisson_noise",
    "filter2d",
    "gaussian_kernel",
    "generalized_gaussian_kernel",
    "image_seed",
    "jpeg_compress",
    "plateau_kernel",
    "resize",
    "sample_params",
    "sinc_kernel",
    "usm_sharpen",
]
