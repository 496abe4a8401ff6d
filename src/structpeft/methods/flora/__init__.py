from structpeft.methods.flora.card import CARD
from structpeft.methods.flora.config import FloraConfig
from structpeft.methods.flora.layer import FloraDelta, tucker_to_tensor

__all__ = ["CARD", "FloraConfig", "FloraDelta", "tucker_to_tensor"]
