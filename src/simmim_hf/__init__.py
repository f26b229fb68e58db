"""simmim_hf: SimMIM masked image modeling as a first-class Hugging Face citizen.

Importing the package registers `SimMIMConfig` and the models with `AutoConfig`, `AutoModel` and
`AutoModelForMaskedImageModeling`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedImageModeling

from .configuration_simmim import PRESETS, SimMIMConfig
from .masking import SimMIMMaskGenerator
from .modeling_simmim import SimMIMForMaskedImageModeling, SimMIMModel, SimMIMPreTrainedModel
from .publish.convert import export_encoder, export_finetuning_layout, from_transformers, to_transformers
from .publish.official import convert_official, from_official, official_classifier

__version__ = "0.1.0"

AutoConfig.register("simmim", SimMIMConfig, exist_ok=True)
AutoModel.register(SimMIMConfig, SimMIMModel, exist_ok=True)
AutoModelForMaskedImageModeling.register(SimMIMConfig, SimMIMForMaskedImageModeling, exist_ok=True)
# save_pretrained also writes the two source files and an `auto_map`, so checkpoints load with
# `trust_remote_code=True` on machines without simmim_hf.
SimMIMConfig.register_for_auto_class()
SimMIMModel.register_for_auto_class("AutoModel")
SimMIMForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")

__all__ = [
    "PRESETS",
    "SimMIMConfig",
    "SimMIMForMaskedImageModeling",
    "SimMIMMaskGenerator",
    "SimMIMModel",
    "SimMIMPreTrainedModel",
    "convert_official",
    "export_encoder",
    "export_finetuning_layout",
    "from_official",
    "from_transformers",
    "official_classifier",
    "to_transformers",
]
