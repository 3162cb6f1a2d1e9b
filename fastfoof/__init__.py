"""fastfoof: the FOOF optimizer ("gradient descent on neurons", Benzing 2022) for PyTorch."""
from . import ops
from .kfac import KFAC
from .natural_gradient import NaturalGradient
from .optimizer import FOOF

__all__ = ["FOOF", "KFAC", "NaturalGradient", "ops"]
__version__ = "0.1.0"
