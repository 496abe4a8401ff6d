from structpeft.methods.lora.card import CARD
from structpeft.methods.lora.config import LoraConfig
from structpeft.methods.lora.layer import LoraDelta

__all__ = ["CARD", "LoraConfig", "LoraDelta"]
