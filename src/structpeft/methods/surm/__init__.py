from structpeft.methods.surm.card import CARD
from structpeft.methods.surm.config import SurmConfig
from structpeft.methods.surm.layer import SurmDelta

__all__ = ["CARD", "SurmConfig", "SurmDelta"]
