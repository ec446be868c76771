"""AST -> IR: resolve `extends` and `def` macros, check names and scopes, flatten to SSA."""
from __future__ import annotations

import math
import operator
from dataclasses import replace

import sympy

from ..dsl import ast
from ..errors import Loc, SpecError, suggest
from ..ir import ops as O
from ..ir.nodes import Op, ParamDecl, Spec, Stage, TensorDecl, dim, next_state_name

_ANNOTATIONS = {
    "logdecay": "a log-space decay, <= 0 (padding value 0 is the identity)",
    "positive": "a positive value",
    "unit": "a value in (0, 1)",
    "unitnorm": "a vector of L2 norm 1 per token (needs a feature dim)",
    "key": "read on the key side by score and softmax reductions (softmax family)",
}
_DEFAULT_CHUNK = 64


# `x ** n` for an integer n up to this size is a chain of products (at most 2 * 16 multiplications);
# larger, non-integer and runtime exponents stay a `pow` op, which every backend computes as torch.pow
MAX_PRODUCT_EXPONENT = 2 ** 16
_FOLD = {"neg": operator.neg, "add": operator.add, "sub": operator.sub, "mul": operator.mul,
         "div": operator.truediv, "pow": operator.pow}


def fold(kind: str, args) -> float | None:
    """`kind` over numbers, as Python's floats compute it; None where Python raises or leaves the real
    numbers (1 / 0, (-8) ** (1/3), 10.0 ** 400): those stay ops, and the backends compute them."""
    try:
        value = _FOLD[kind](*args)
    except (KeyError, ArithmeticError):
        return None
    return value if isinstance(value, float) else None


def _merge_parent(child: ast.SpecDef, specs: dict[str, ast.SpecDef], seen=()) -> ast.SpecDef:
    if child.extends is None:
        return child
    if child.extends not in specs:
        raise SpecError(f"spec '{child.name}' extends unknown spec '{child.extends}'", child.extends_loc,
                        "the name of a spec defined or imported earlier" + suggest(child.extends, specs))
    if child.name in seen:
        cycle = " -> ".join(seen[seen.index(child.name):] + (child.name,))
        raise SpecError(f"spec '{child.name}' extends itself ({cycle})", child.extends_loc,
                        "a spec that does not extend itself")
    parent = _merge_parent(specs[child.extends], specs, seen + (child.name,))

    def by_name(parent_items, child_items, key):
        merged = {key(x): x for x in parent_items}
        merged.update({key(x): x for x in child_items})
        return tuple(merged.values())

    return ast.SpecDef(
        child.name,
        by_name(parent.decls, child.decls, lambda d: d.name),
        by_name(parent.params, child.params, lambda p: p.name),
        child.chunk if child.chunk is not None else parent.chunk,
        by_name(parent.stages, child.stages, lambda s: s.name),
        None, child.loc, child.chunk_loc if child.chunk is not None else parent.chunk_loc)


def _param_default(expr: ast.Expr, dims: set[str], params: dict[str, sympy.Expr]) -> sympy.Expr:
    """Param defaults are arithmetic over numbers, feature dims and earlier params."""
    if isinstance(expr, ast.Number):
        return sympy.nsimplify(expr.value)
    if isinstance(expr, ast.Name):
        if expr.id in dims:
            return dim(expr.id)
        if expr.id in params:
            return params[expr.id]
        raise SpecError(f"unknown name '{expr.id}' in a param default", expr.loc,
                        "numbers, feature dims (" + ", ".join(sorted(dims)) + ") or earlier params"
                        + suggest(expr.id, list(dims) + list(params)))
    if isinstance(expr, ast.Neg):
        return -_param_default(expr.operand, dims, params)
    if isinstance(expr, ast.BinOp) and expr.op in ("add", "sub", "mul", "div", "pow"):
        a, b = _param_default(expr.left, dims, params), _param_default(expr.right, dims, params)
        if expr.op == "pow":
            _check_power(b, expr)
        return _FOLD[expr.op](a, b)  # only this op: a dict of every result would compute a ** b too
    raise SpecError("a param default must be arithmetic (+ - * / **) over numbers and dims",
                    getattr(expr, "loc", None), "e.g. K ** -0.5")


# sympy computes a param default exactly: 10 ** 10 ** 10 would be an integer of 10**10 digits (compilation
# hangs), and K ** 10 ** 9 one the runtime computes for every call's K
MAX_PARAM_EXPONENT = 1024


def _check_power(b: sympy.Expr, expr: ast.BinOp) -> None:
    """Before sympy computes `a ** b` in a param default: a number exponent, at most MAX_PARAM_EXPONENT."""
    if not b.is_number:
        raise SpecError("the exponent of '**' in a param default must be a number", expr.right.loc,
                        "dims in the base only, e.g. K ** -0.5")
    if not b.is_real or abs(b) > MAX_PARAM_EXPONENT:
        raise SpecError(f"the exponent of '**' in a param default is too large (beyond +-{MAX_PARAM_EXPONENT})",
                        expr.right.loc, "a param is a float: a smaller exponent")


def _check_default(value: sympy.Expr, p: ast.Param) -> None:
    """A param is a float scalar: a finite real number, or a formula of dims whose powers stay bounded
    (sympy combines K ** 1024 * K ** 1024 into K ** 2048)."""
    if value.is_number:
        try:
            ok = value.is_real and math.isfinite(float(value))
        except TypeError:  # a complex number
            ok = False
        if not ok:
            raise SpecError(f"param '{p.name}' has default {sympy.N(value, 4)}, not a finite float", p.default.loc,
                            "a real number within the float range")
    elif any(x.exp.is_number and abs(x.exp) > MAX_PARAM_EXPONENT for x in value.atoms(sympy.Pow)):
        raise SpecError(f"param '{p.name}' has default {value}: an exponent beyond +-{MAX_PARAM_EXPONENT}",
                        p.default.loc, "a param is a float: smaller exponents")


class _StageLowering:
    """Flattens one stage's assignments into SSA ops, checking that every name is visible."""

    def __init__(self, stage: str, visible: dict[str, str], funcs: dict[str, ast.FuncDef], counter,
                 inherited: dict[str, str], taken: set[str]):
        self.stage, self.visible, self.funcs, self.counter = stage, dict(visible), funcs, counter
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

    def statement(self, node: ast.Expr) -> str | float:
        """The expression of one statement. The parser bounds how deep a .attn file nests, but defs calling
        defs multiply it (and the Python front end has Python's bound): past Python's recursion limit the
        statement is the error."""
        try:
            return self.expr(node)
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
        if node.func not in O.CALLABLE:
            raise SpecError(f"unknown function '{node.func}'", node.loc,
                            "a tile operation or a def" + suggest(node.func, list(O.CALLABLE) + list(self.funcs)))
        lo, hi = O.CALLABLE[node.func]
        if not lo <= len(node.args) <= hi:
            n = f"{lo}" if lo == hi else f"{lo} or {hi}"
            raise SpecError(f"'{node.func}' takes {n} argument(s), got {len(node.args)}", node.loc,
                            f"{n} argument(s)")
        return self.emit(node.func, [self.expr(a, subst, depth) for a in node.args], node.loc)

    def assign(self, a: ast.Assign, out: str | None = None) -> None:
        start = len(self.ops)
        value = self.statement(a.value)
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


def lower(module: ast.Module, name: str | None = None) -> Spec:
    """Lower one spec of a parsed module (the only one, or the one called `name`)."""
    specs = {s.name: s for s in module.specs}
    file_loc = Loc(module.file, 1, 1)  # for problems of the whole file
    if not specs:
        raise SpecError(f"{module.file} defines no spec", file_loc, "at least one 'spec NAME { ... }'")
    if name is None:
        local = module.local or tuple(specs)
        if len(local) > 1:
            raise SpecError(f"{module.file} defines several specs ({', '.join(local)}); name one",
                            specs[local[1]].loc, "FILE:SPEC, e.g. " + f"{module.file}:{local[0]}")
        name = local[0]
    if name not in specs:
        raise SpecError(f"no spec named '{name}' in {module.file}", file_loc,
                        "one of " + ", ".join(specs) + suggest(name, specs))
    sdef = _merge_parent(specs[name], specs)
    funcs = {f.name: f for f in module.funcs}

    # declarations
    seen: dict[str, Loc] = {}
    for item in sdef.decls + sdef.params:
        if item.name in seen:
            raise SpecError(f"'{item.name}' is declared twice (first at {seen[item.name]})", item.loc,
                            "one declaration per name")
        if item.name.startswith("_") or item.name in O.BUILTINS or item.name in O.RESERVED_DIMS \
                or item.name in O.PAIR_BUILTINS:
            raise SpecError(f"'{item.name}' is a reserved name", item.loc, "a name not starting with '_', "
                            "not a builtin (idx, head, inf) and not B, T or H (nor qpos, kpos)")
        seen[item.name] = item.loc
    decls = []
    for d in sdef.decls:
        _check_shape(d)
        for a in d.annotations:
            if a not in _ANNOTATIONS:
                raise SpecError(f"unknown annotation '{a}' on '{d.name}'" + suggest(a, _ANNOTATIONS), d.loc,
                                "one of: " + ", ".join(f"{k} ({v})" for k, v in _ANNOTATIONS.items()))
            if a == "unitnorm" and len(d.shape) < 4:
                raise SpecError(f"unitnorm on '{d.name}' [{', '.join(d.shape)}]: one value per token and head has "
                                "no vector to normalise", d.loc, "unitnorm on an input with a feature dim, "
                                "e.g. [B, T, H, K]")
        decls.append(TensorDecl(d.name, d.kind, d.shape, d.annotations, d.loc))
    inputs = tuple(d for d in decls if d.role == "input")
    outputs = tuple(d for d in decls if d.role == "output")
    states = tuple(d for d in decls if d.role == "state")
    if not outputs:
        raise SpecError(f"spec '{sdef.name}' declares no output", sdef.loc, "an 'output o: [B, T, H, V]' line")
    feature_dims = {n for d in decls for n in d.feature_dims}
    for s in states:
        for n in s.feature_dims:
            if n not in {m for i in inputs for m in i.feature_dims}:
                raise SpecError(f"state '{s.name}' uses dim '{n}' that no input has", s.loc,
                                "state dims taken from the inputs' feature dims")
    params: dict[str, sympy.Expr] = {}
    for p in sdef.params:
        params[p.name] = _param_default(p.default, feature_dims, params)
        _check_default(params[p.name], p)
    chunk = sdef.chunk if sdef.chunk is not None else _DEFAULT_CHUNK
    if chunk < 16 or chunk & (chunk - 1):
        raise SpecError(f"chunk {chunk} is not a power of two >= 16",
                        sdef.chunk_loc if sdef.chunk_loc.line else sdef.loc, "16, 32, 64, 128 or 256")

    # stages and scopes
    stages = {s.name: s for s in sdef.stages}
    for s in sdef.stages:
        if sum(x.name == s.name for x in sdef.stages) > 1:
            raise SpecError(f"stage '{s.name}' appears twice", s.loc, "each of intra, merge, inter at most once")
    if "merge" not in stages:
        raise SpecError(f"spec '{sdef.name}' has no merge stage", sdef.loc, "a 'merge { o = ... }' block")
    if states and "inter" not in stages:
        raise SpecError(f"spec '{sdef.name}' declares state '{states[0].name}' but has no inter stage",
                        states[0].loc, f"an 'inter {{ {states[0].name} = ... }}' block")
    if "score" in stages or "prefix" in stages:  # the softmax family: passes.lower_softmax
        from .lower_softmax import lower_softmax
        return lower_softmax(sdef, inputs, outputs, states, params, chunk, funcs, stages)
    if not states and "inter" in stages:
        raise SpecError("an inter stage needs a declared state", stages["inter"].loc, "a 'state S: [K, V]' line")

    base = base_visibility(inputs, outputs, params, feature_dims)
    counter = [0]
    taken: set[str] = set()

    intra_vis = dict(base)
    intra_vis.update({s.name: "hidden:intra sees only the chunk's own tokens; read states in merge or inter"
                      for s in states})
    roles = {d.name: d.role for d in decls}
    intra, intra_names = _lower_stage(stages.get("intra"), "intra", intra_vis, funcs, counter, {}, roles, {}, taken)
    after_intra = dict(base)
    after_intra.update({s.name: "state" for s in states})
    after_intra.update({op.out: "local" for op in intra.ops})
    merge, _ = _lower_stage(stages["merge"], "merge", after_intra, funcs, counter, {o.name: o for o in outputs}, roles,
                            intra_names, taken)
    inter, _ = _lower_stage(stages.get("inter"), "inter", after_intra, funcs, counter, {s.name: s for s in states},
                            roles, intra_names, taken)
    if not states:  # (after the stages, whose errors are more specific) the outputs would depend on the chunk
        raise SpecError(f"spec '{sdef.name}' declares no state and no score stage: nothing carries information "
                        "from one chunk to the next", sdef.loc,
                        "a 'state S: [K, V]' line and an 'inter { S = ... }' stage (a chunked scan), or a "
                        "'score { s = ... }' stage (the softmax family)")
    return Spec(sdef.name, inputs, outputs, states,
                tuple(ParamDecl(p.name, params[p.name], p.loc) for p in sdef.params), chunk, intra, merge, inter)


def _check_shape(d: ast.Decl) -> None:
    dims = d.shape
    shown = "[" + ", ".join(dims) + "]"
    if len(set(dims)) != len(dims):
        raise SpecError(f"'{d.name}' repeats a dim in {shown}", d.loc, "distinct dim names")
    features = [n for n in dims if n not in O.RESERVED_DIMS]
    if d.kind == "state":
        if any(n in O.RESERVED_DIMS for n in dims) or len(dims) > 2:
            raise SpecError(f"state '{d.name}' has shape {shown}", d.loc,
                            "feature dims only, at most two: [], [K] or [K, V]")
        return
    if tuple(dims[:3]) != ("B", "T", "H") or len(features) > 1:
        raise SpecError(f"{d.kind} '{d.name}' has shape {shown}", d.loc,
                        "[B, T, H] (one value per token and head) or [B, T, H, D] (a vector per token)")


def assign_statement(low: _StageLowering, a: ast.Assign, visible, targets, assigned: dict, roles, out: str) -> None:
    """One `name = expr` of a stage, checked: a target (output or state) once, as `out`; never a
    declared or reserved name; otherwise a local (re-assignment gets a new SSA name)."""
    name, kind = low.stage, visible.get(a.target, "")
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


def _lower_stage(stage: ast.Stage | None, name: str, visible, funcs, counter, targets, roles, inherited,
                 taken) -> tuple[Stage, dict[str, str]]:
    """`targets` are the names this stage must assign (outputs in merge, states in inter);
    `roles` maps declared names to input/output/state; `inherited` maps the user names of
    earlier stages to their SSA names. Returns the stage and its final user -> SSA names."""
    if stage is None:
        return Stage(name, ()), dict(inherited)
    low = _StageLowering(name, visible, funcs, counter, inherited, taken)
    assigned: dict[str, Loc] = {}
    for a in stage.body:
        if isinstance(a, ast.Mask):
            raise SpecError(f"'mask' in {name}: masks select the (query, key) pairs of a score stage", a.loc,
                            "a 'mask PREDICATE' line inside 'score { ... }'")
        assign_statement(low, a, visible, targets, assigned, roles,
                         next_state_name(a.target) if name == "inter" else a.target)
    require_assigned(stage, targets, assigned)
    return Stage(name, tuple(low.ops)), low.current
