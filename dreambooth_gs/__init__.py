"""dreambooth-gs: GSOFT / Double GSOFT orthogonal fine-tuning (Group-and-Shuffle matrices) for diffusers models."""

from . import _import_noise  # noqa: F401  (first: quiets three third-party import messages, see there)
from .adapters.sampling import generate_images, load_pipeline
from .adapters.serialization import load_adapter, read_adapter_config, save_adapter
from .evaluate.evaluation import evaluate
from .evaluate.options import EvaluationOptions
from .export.authors import convert_authors_checkpoint
from .export.formats import export_adapter
from .gs import functional
from .gs.config import GSOFTConfig
from .gs.layers import GSOFTLinear
from .lipschitz import GSSOC, SOC, ChannelShuffle, LipConvnet, MaxMinPermuted, certified_accuracy, certified_radius
from .methods.full import FullConfig, enable_full_finetuning
from .methods.injection import (
    adapter_layers,
    disable_adapters,
    find_targets,
    inject_adapter,
    merge_adapter,
    remove_adapter,
    trainable_parameters,
)
from .methods.peft_gs import register as _register_with_peft

_register_with_peft()  # GSOFTConfig then works with get_peft_model, PeftModel.from_pretrained, diffusers' add_adapter
__version__ = "0.1.0"

__all__ = [
    "GSSOC",
    "SOC",
    "ChannelShuffle",
    "EvaluationOptions",
    "FullConfig",
    "GSOFTConfig",
    "GSOFTLinear",
    "adapter_layers",
    "disable_adapters",
    "enable_full_finetuning",
    "find_targets",
    "evaluate",
    "functional",
    "generate_images",
    "inject_adapter",
    "LipConvnet",
    "MaxMinPermuted",
    "certified_accuracy",
    "certified_radius",
    "convert_authors_checkpoint",
    "export_adapter",
    "load_adapter",
    "load_pipeline",
    "merge_adapter",
    "read_adapter_config",
    "remove_adapter",
    "save_adapter",
    "trainable_parameters",
]
