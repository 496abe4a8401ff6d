from structpeft.methods.coeff.card import CARD
from structpeft.methods.coeff.config import CoeffConfig
from structpeft.methods.coeff.layer import CoeffDelta

__all__ = ["CARD", "CoeffConfig", "CoeffDelta"]
