from structpeft.methods.surm.config import SurmConfig
from structpeft.methods.surm.layer import SurmDelta

__all__ = ["SurmConfig", "SurmDelta"]
