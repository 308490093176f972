"""d2l-memory: long-term memory for LLM agents, stored in LoRA adapters by a Doc-to-LoRA hypernetwork."""

from d2l_memory.d2l import DocToLoRA
from d2l_memory.errors import AdapterError, D2LMemoryError, ModelNotInstalledError
from d2l_memory.hypernet import HypernetConfig
from d2l_memory.lora import LoRA

__version__ = "0.1.0"
__all__ = ["AdapterError", "D2LMemoryError", "DocToLoRA", "HypernetConfig", "LoRA", "ModelNotInstalledError"]
