from structpeft.methods.coeff.config import CoeffConfig
from structpeft.methods.coeff.layer import CoeffDelta

__all__ = ["CoeffConfig", "CoeffDelta"]
