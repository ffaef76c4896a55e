"""Self-supervised methods, one file each; importing this package registers them all."""

from cass.methods import cass, cass_vicreg, dino  # noqa: F401
from cass.methods.registry import (
    METHODS,
    create_method,
    method_class,
    method_names,
    register_method,
)

__all__ = ["METHODS", "create_method", "method_class", "method_names", "register_method"]
