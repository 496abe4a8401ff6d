from structpeft.methods.lora.config import LoraConfig
from structpeft.methods.lora.layer import LoraDelta

__all__ = ["LoraConfig", "LoraDelta"]
