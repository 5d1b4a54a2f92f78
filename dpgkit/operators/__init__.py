"""Forward models A (dpgkit "physics")."""

from .base import BlackBox, LinearOperator, Operator, SVDView
from .blur import Blur, GaussianBlur, MotionBlur
from .blur_kernels import gaussian_kernel, motion_kernel
from .colorization import Colorization
from .deepinv import from_deepinv, noise_from_deepinv
from .denoising import Denoising
from .inpainting import (
    BoxInpainting,
    Inpainting,
    InpaintingTemplate,
    MaskSetInpainting,
    RandomInpainting,
)
from .jpeg import JPEG
from .nonlinear_blur import EncodedBlur, NonlinearBlur
from .phase_retrieval import PhaseRetrieval
from .super_resolution import SuperResolution
from .template import Template

__all__ = [
    "Operator", "LinearOperator", "SVDView", "BlackBox", "Template",
    "Inpainting", "InpaintingTemplate", "BoxInpainting", "RandomInpainting", "MaskSetInpainting",
    "SuperResolution",
    "Blur", "GaussianBlur", "MotionBlur", "gaussian_kernel", "motion_kernel",
    "PhaseRetrieval", "JPEG", "Colorization", "Denoising", "NonlinearBlur", "EncodedBlur",
    "from_deepinv", "noise_from_deepinv",
]
