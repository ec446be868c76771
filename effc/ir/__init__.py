"""Typed tile-level IR: declarations with symbolic shapes, three stages of SSA ops."""
from .nodes import Op, ParamDecl, Spec, Stage, TensorDecl, TileType  # noqa: F401
from .printer import print_spec  # noqa: F401
