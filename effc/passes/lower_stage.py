"""The statement rules every family shares: a stage's `name = expr` lines flattened to SSA ops, with
scopes checked (which names a stage sees) and constants folded. passes.lower and passes.lower_softmax
apply them to their stages."""
from __future__ import annotations

import operator
from dataclasses import replace

from ..dsl import ast
from ..errors import Loc, SpecError, suggest
from ..ir import ops as O
from ..ir.nodes import Op, Stage, next_state_name

# `x ** n` for an integer n up to this size is a chain of products (at most 2 * 16 multiplications);
# larger, non-integer and runtime exponents stay a `pow` op, which every backend computes as torch.pow
MAX_PRODUCT_EXPONENT = 2 ** 16
def _pair_level(a: float, b: float) -> float:
    """ir.ops `level` of two numbers: positions are integers >= 0."""
    if a < 0 or b < 0 or not float(a).is_integer() or not float(b).is_integer():
        raise ArithmeticError("level of non-positions")
    return float((int(a) ^ int(b)).bit_length())


_FOLD = {"neg": operator.neg, "add": operator.add, "sub": operator.sub, "mul": operator.mul,
         "div": operator.truediv, "pow": operator.pow}
# functions folded when their arguments are numbers (a level state's `lvl` makes such calls)
_FOLD_CALLS = {"maximum": max, "minimum": min, "level": _pair_level}


def fold(kind: str, args) -> float | None:
    """`kind` over numbers, as Python's floats compute it; None where Python raises or leaves the real
    numbers (1 / 0, (-8) ** (1/3), 10.0 ** 400): those stay ops, and the backends compute them."""
    try:
        value = {**_FOLD, **_FOLD_CALLS}[kind](*args)
    except (KeyError, ArithmeticError):
        return None
    return value if isinstance(value, float) else None


class StageLowering:
    """Flattens one stage's assignments into SSA ops, checking that every name is visible."""

    def __init__(self, stage: str, visible: dict[str, str], funcs: dict[str, ast.FuncDef], counter,
                 inherited: dict[str, str], taken: set[str], levels: dict[str, tuple[str, ...]] | None = None):
        self.stage, self.visible, self.funcs, self.counter = stage, dict(visible), funcs, counter
        # level states (`state A: [K, V] levels N`): user name -> the N states it expands to
        self.levels = levels or {}
        self.ops: list[Op] = []
        self.current: dict[str, str] = dict(inherited)  # user name -> its latest SSA name
        self.taken = taken  # SSA names defined in any stage so far
        self.pinned: set[str] = set()  # values other statements reuse by name: an assignment must not rename them

    def fresh(self) -> str:
        self.counter[0] += 1
        return f"_{self.counter[0]}"

    def emit(self, kind: str, args, loc: Loc, out: str | None = None) -> str:
        out = out or self.fresh()
        self.taken.add(out)
        self.ops.append(Op(out, kind, tuple(args), None, loc))
        return out

    def resolve(self, node: ast.Name) -> str | float:
        if node.id == "nlevels" and self.levels:
            return float(len(next(iter(self.levels.values()))))
        if node.id in self.current:
            return self.current[node.id]
        what = self.visible.get(node.id)
        if what is None:
            raise SpecError(f"unknown name '{node.id}'", node.loc,
                            "a declared input, state, param, feature dim, builtin (idx, head, inf) "
                            "or an earlier assignment" + suggest(node.id, list(self.visible) + list(self.current)))
        if what.startswith("hidden:"):
            raise SpecError(f"'{node.id}' is not visible in {self.stage}: {what[7:]}", node.loc,
                            f"names visible in {self.stage}")
        return node.id

    def expr(self, node: ast.Expr, subst: dict[str, str | float] | None = None, depth: int = 0) -> str | float:
        subst = subst or {}
        if isinstance(node, ast.Number):
            return float(node.value)
        if isinstance(node, ast.Name):
            return subst[node.id] if node.id in subst else self.resolve(node)
        rec = lambda n: self.expr(n, subst, depth)  # noqa: E731
        if isinstance(node, ast.Neg):
            return self.arith("neg", [rec(node.operand)], node.loc)
        if isinstance(node, ast.BinOp):
            return self.arith(node.op, [rec(node.left), rec(node.right)], node.loc)
        if isinstance(node, ast.Transpose):
            return self.emit("transpose", [rec(node.operand)], node.loc)
        if isinstance(node, ast.Subscript):
            if node.indices.count(":") < 1:
                raise SpecError("a subscript must keep at least one axis", node.loc, "x[:, None] or x[None, :]")
            out = self.emit("expand", [rec(node.operand)], node.loc)
            self.ops[-1] = Op(out, "expand", self.ops[-1].args + tuple(float(i == "None") for i in node.indices),
                              None, node.loc)
            return out
        if isinstance(node, ast.Call):
            return self.call(node, subst, depth)
        raise SpecError(f"unsupported expression {type(node).__name__}", getattr(node, "loc", None))

    def at_level(self, m: int, subst) -> dict:
        """The substitution that reads every level state at level m (and `lvl` as the number m)."""
        return {**subst, **{name: states[m] for name, states in self.levels.items()}, "lvl": float(m)}

    def levelsum(self, node: ast.Call, subst, depth) -> str | float:
        """levelsum(x): x evaluated at every level (level states and `lvl` read at that level), summed."""
        if not self.levels or self.stage != "merge" or "lvl" in subst:
            where = ("a spec with level states ('state A: [K, V] levels N')" if not self.levels
                     else "merge, not nested" if "lvl" in subst else "merge")
            raise SpecError(f"levelsum in {self.stage}" + (" inside levelsum" if "lvl" in subst else ""),
                            node.loc, f"levelsum(...) in {where}")
        if len(node.args) != 1:
            raise SpecError(f"'levelsum' takes 1 argument(s), got {len(node.args)}", node.loc, "1 argument(s)")
        n = len(next(iter(self.levels.values())))
        total = self.expr(node.args[0], self.at_level(0, subst), depth)
        for m in range(1, n):
            total = self.arith("add", [total, self.expr(node.args[0], self.at_level(m, subst), depth)], node.loc)
        return total

    def statement(self, node: ast.Expr, subst=None) -> str | float:
        """The expression of one statement. The parser bounds how deep a .attn file nests, but defs calling
        defs multiply it (and the Python front end has Python's bound): past Python's recursion limit the
        statement is the error."""
        try:
            return self.expr(node, subst)
        except RecursionError:
            raise SpecError("this expression nests too deeply (with its defs expanded)", node.loc,
                            "shallower expressions: name parts in earlier assignments, or call fewer nested "
                            "defs") from None

    def arith(self, kind: str, args, loc: Loc) -> str | float:
        """An op, folded when its arguments are numbers: `-1` is the number -1 and `(1 + 1)` the number 2,
        so `x ** -1` and `x ** (1 + 1)` see an integer exponent."""
        if all(isinstance(a, float) for a in args) and (value := fold(kind, args)) is not None:
            return value
        if kind == "pow":
            return self.power(*args, loc)
        return self.emit(kind, args, loc)

    def power(self, x, n, loc: Loc) -> str | float:
        """x ** n. An integer n (of either sign, any base sign) is exact products by repeated squaring, and
        a reciprocal for n < 0, so every backend, the oracle and the derivative agree without a log of a
        negative base; x ** 0 is 1 for every finite x. Other exponents stay `pow` (see MAX_PRODUCT_EXPONENT)."""
        if not (isinstance(n, float) and n.is_integer() and abs(n) <= MAX_PRODUCT_EXPONENT):
            return self.emit("pow", [x, n], loc)
        if n == 0:
            return self.arith("add", [self.arith("mul", [x, 0.0], loc), 1.0], loc)
        out = x
        for bit in bin(int(abs(n)))[3:]:  # the bits after the leading one, most significant first
            out = self.arith("mul", [out, out], loc)
            if bit == "1":
                out = self.arith("mul", [out, x], loc)
        return out if n > 0 else self.arith("div", [1.0, out], loc)

    def call(self, node: ast.Call, subst, depth) -> str | float:
        if node.func in self.funcs:
            f = self.funcs[node.func]
            if len(node.args) != len(f.params):
                raise SpecError(f"'{node.func}' takes {len(f.params)} argument(s), got {len(node.args)}",
                                node.loc, f"{node.func}({', '.join(f.params)})")
            if depth > 32:
                raise SpecError(f"'{node.func}' expands recursively", node.loc, "non-recursive defs")
            args = {p: self.expr(a, subst, depth) for p, a in zip(f.params, node.args)}
            if depth:
                return self.expr(f.body, args, depth + 1)
            # a def called from a stage: errors in its body also name this call site
            start = len(self.ops)
            try:
                out = self.expr(f.body, args, depth + 1)
            except SpecError as e:
                if e.loc is None or e.loc.via is not None:
                    raise
                raise SpecError(e.message, replace(e.loc, via=node.loc), e.expected) from None
            self.ops[start:] = [replace(op, loc=replace(op.loc, via=node.loc)) for op in self.ops[start:]]
            return out
        if node.func == "levelsum":
            return self.levelsum(node, subst, depth)
        if node.func not in O.CALLABLE:
            raise SpecError(f"unknown function '{node.func}'", node.loc,
                            "a tile operation or a def" + suggest(node.func, list(O.CALLABLE) + list(self.funcs)))
        lo, hi = O.CALLABLE[node.func]
        if not lo <= len(node.args) <= hi:
            n = f"{lo}" if lo == hi else f"{lo} or {hi}"
            raise SpecError(f"'{node.func}' takes {n} argument(s), got {len(node.args)}", node.loc,
                            f"{n} argument(s)")
        if node.func == "fidx":
            return self.emit("fidx", [self.feature_dim(node.args[0], subst)], node.loc)
        args = [self.expr(a, subst, depth) for a in node.args]
        if node.func in _FOLD_CALLS and all(isinstance(a, float) for a in args) \
                and (value := fold(node.func, args)) is not None:
            return value
        return self.emit(node.func, args, node.loc)

    def feature_dim(self, node: ast.Expr, subst) -> str:
        """The argument of fidx(D): the name of a feature dim (through a def's parameter too)."""
        name = node.id if isinstance(node, ast.Name) else None
        name = subst.get(name, name) if name is not None else None
        if not isinstance(name, str) or self.visible.get(name) != "dim" or name == "H" or name in self.current:
            raise SpecError("fidx takes the name of a feature dim", getattr(node, "loc", None),
                            "e.g. fidx(K) for inputs declared [B, T, H, K]: the features' indices 0..K-1")
        return name

    def assign(self, a: ast.Assign, out: str | None = None, subst=None) -> None:
        start = len(self.ops)
        value = self.statement(a.value, subst)
        if out is None and (a.target in self.current or a.target in self.taken):
            out = f"_{a.target}{self.fresh()}"  # re-assignment: a new SSA name ('_' is never a user's)
        out = out or a.target
        last = self.ops[-1] if len(self.ops) > start else None
        if last is not None and last.out == value and value.startswith("_") and value not in self.pinned:
            # name the temporary this statement made directly (an earlier statement's value, or one shared
            # by several, keeps its name); it keeps the location of its expression, for shape errors
            self.ops[-1] = Op(out, last.kind, last.args, None, a.value.loc)
            self.taken.add(out)
        else:
            self.emit("copy", [value], a.loc, out)
        self.current[a.target] = out


def base_visibility(inputs, outputs, params, feature_dims) -> dict[str, str]:
    """What every stage sees by name (inputs, params, dims, builtins) and the outputs it may not read."""
    base = {d.name: "input" for d in inputs}
    base.update({p: "param" for p in params})
    base.update({n: "dim" for n in feature_dims | {"H"}})
    base.update({b: "builtin" for b in O.BUILTINS})
    for o in outputs:
        base[o.name] = "hidden:outputs are written by merge, not read"
    return base


def assign_statement(low: StageLowering, a: ast.Assign, visible, targets, assigned: dict, roles, out: str) -> None:
    """One `name = expr` of a stage, checked: a target (output or state) once, as `out`; never a
    declared or reserved name; otherwise a local (re-assignment gets a new SSA name)."""
    name, kind = low.stage, visible.get(a.target, "")
    if a.target in low.levels and name == "inter":  # a level state: one update per level, `lvl` its number
        if a.target in assigned:
            raise SpecError(f"'{a.target}' is assigned twice in {name}", a.loc,
                            f"one assignment of '{a.target}' (first at {assigned[a.target]})")
        assigned[a.target] = a.loc
        for m, state in enumerate(low.levels[a.target]):
            low.assign(a, out=next_state_name(state), subst=low.at_level(m, {}))
            low.current.pop(a.target)
        return
    if a.target in O.LEVEL_NAMES and low.levels:
        raise SpecError(f"cannot assign to '{a.target}' in {name}: {O.LEVEL_NAMES[a.target]}", a.loc,
                        "a new local name")
    if a.target in targets:
        if a.target in assigned:
            raise SpecError(f"'{a.target}' is assigned twice in {name}", a.loc,
                            f"one assignment of '{a.target}' (first at {assigned[a.target]})")
        assigned[a.target] = a.loc
        low.assign(a, out=out)
        low.current.pop(a.target)  # outputs are write-only; states read as incoming
        return
    if kind in ("input", "param", "dim", "builtin", "state") or kind.startswith("hidden:"):
        role = roles.get(a.target, "output" if kind.startswith("hidden:outputs") else kind)
        where = {"output": " (outputs are assigned in merge)", "state": " (states are updated in inter)"}
        raise SpecError(f"cannot assign to {role} '{a.target}' in {name}", a.loc,
                        "a new local name" + (f" or one of {', '.join(targets)}" if targets else "")
                        + where.get(role, ""))
    if a.target.startswith("_"):
        raise SpecError(f"'{a.target}': names starting with '_' are reserved", a.loc, "a name without '_' prefix")
    low.assign(a)


def require_assigned(stage: ast.Stage, targets, assigned) -> None:
    missing = [t for t in targets if t not in assigned]
    if missing:
        raise SpecError(f"{stage.name} does not assign {', '.join(missing)}", stage.loc,
                        f"an assignment '{missing[0]} = ...' in {stage.name}")


def lower_stage(stage: ast.Stage | None, name: str, visible, funcs, counter, targets, roles, inherited,
                 taken, levels=None) -> tuple[Stage, dict[str, str]]:
    """`targets` are the names this stage must assign (outputs in merge, states in inter);
    `roles` maps declared names to input/output/state; `inherited` maps the user names of
    earlier stages to their SSA names. Returns the stage and its final user -> SSA names."""
    if stage is None:
        return Stage(name, ()), dict(inherited)
    low = StageLowering(name, visible, funcs, counter, inherited, taken, levels)
    assigned: dict[str, Loc] = {}
    for a in stage.body:
        if isinstance(a, ast.Mask):
            raise SpecError(f"'mask' in {name}: masks select the (query, key) pairs of a score stage", a.loc,
                            "a 'mask PREDICATE' line inside 'score { ... }'")
        assign_statement(low, a, visible, targets, assigned, roles,
                         next_state_name(a.target) if name == "inter" else a.target)
    require_assigned(stage, targets, assigned)
    return Stage(name, tuple(low.ops)), low.current
