"""AST -> IR: resolve `extends` and `def` macros, check names and scopes, flatten to SSA."""
from __future__ import annotations

import math

import sympy

from ..dsl import ast
from ..dsl.ast import ANNOTATIONS
from ..errors import Loc, SpecError, suggest
from ..ir import ops as O
from ..ir.nodes import ParamDecl, Spec, TensorDecl, dim
from .lower_softmax import lower_softmax
from .lower_stage import _FOLD, base_visibility, lower_stage

_DEFAULT_CHUNK = 64




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
        None, child.loc, child.chunk_loc if child.chunk is not None else parent.chunk_loc,
        keypos=by_name(parent.keypos, child.keypos, lambda k: k.dim))


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
                or item.name in O.PAIR_BUILTINS or item.name in O.SELECT_BUILTINS:
            raise SpecError(f"'{item.name}' is a reserved name", item.loc, "a name not starting with '_', "
                            "not a builtin (idx, head, inf) and not B, T or H (nor qpos, kpos)")
        seen[item.name] = item.loc
    decls = []
    for d in sdef.decls:
        _check_shape(d)
        for a in d.annotations:
            if a not in ANNOTATIONS:
                raise SpecError(f"unknown annotation '{a}' on '{d.name}'" + suggest(a, ANNOTATIONS), d.loc,
                                "one of: " + ", ".join(f"{k} ({v})" for k, v in ANNOTATIONS.items()))
            if a == "unitnorm" and len(d.shape) < 4:
                raise SpecError(f"unitnorm on '{d.name}' [{', '.join(d.shape)}]: one value per token and head has "
                                "no vector to normalise", d.loc, "unitnorm on an input with a feature dim, "
                                "e.g. [B, T, H, K]")
            if a == "gram" and (d.kind != "state" or len(d.shape) != 2 or d.shape[0] != d.shape[1]):
                raise SpecError(f"gram on {d.kind} '{d.name}' [{', '.join(d.shape)}]: only a square state is a "
                                "Gram matrix", d.loc, "gram on a state of shape [K, K]")
            if a == "reverse" and d.kind != "state":
                raise SpecError(f"reverse on {d.kind} '{d.name}': only a state is scanned in a direction", d.loc,
                                "reverse on a state, e.g. 'state R: [K, V] reverse'")
        if d.levels is not None:
            decls.extend(_level_states(d, seen))
        else:
            decls.append(TensorDecl(d.name, d.kind, d.shape, d.annotations, d.loc))
    levels = {d.name: tuple(f"{d.name}_{m}" for m in range(d.levels)) for d in sdef.decls if d.levels is not None}
    if len({len(v) for v in levels.values()}) > 1:
        d = [d for d in sdef.decls if d.levels is not None][-1]
        raise SpecError(f"level states with different counts ({', '.join(f'{k}: {len(v)}' for k, v in levels.items())})",
                        d.loc, "one count of levels for every level state of a spec")
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
    reverse = next((s for s in states if s.reverse), None)
    if reverse is not None and ("score" in stages or "prefix" in stages or "select" in stages):
        raise NotImplementedError(f"spec '{sdef.name}': reverse state '{reverse.name}' in a hybrid spec (a score "
                                  "stage) is not implemented; reverse states are lowered for the linear family")
    if levels and ("score" in stages or "prefix" in stages or "select" in stages):
        raise NotImplementedError(f"spec '{sdef.name}': level states beside a score stage are not implemented; "
                                  "level states are lowered for the linear family")
    if "score" in stages or "prefix" in stages or "select" in stages:  # the softmax family: passes.lower_softmax
        return lower_softmax(sdef, inputs, outputs, states, params, chunk, funcs, stages)
    for d in inputs:
        if d.seq != "T":
            raise SpecError(f"input '{d.name}' has its own token axis {d.seq}: a key sequence is read by a score "
                            "stage (softmax family)", d.loc, "[B, T, H, D], or a 'score { ... }' block")
    if sdef.keypos:
        raise SpecError("'keypos' places the keys of a key sequence of a score stage; this spec has none",
                        sdef.keypos[0].loc, "a 'score { ... }' block reading inputs declared [B, S, H, D] key")
    if not states and "inter" in stages:
        raise SpecError("an inter stage needs a declared state", stages["inter"].loc, "a 'state S: [K, V]' line")

    base = base_visibility(inputs, outputs, params, feature_dims)
    counter = [0]
    taken: set[str] = set()

    level_hidden = _level_visibility(levels)
    intra_vis = dict(base)
    intra_vis.update({s: "hidden:intra sees only the chunk's own tokens; read states in merge or inter"
                      for s in [s.name for s in states] + list(levels)})
    intra_vis.update({k: v for k, v in level_hidden.items() if k == "lvl"})
    roles = {d.name: d.role for d in decls}
    roles.update({name: "state" for name in levels})
    intra, intra_names = lower_stage(stages.get("intra"), "intra", intra_vis, funcs, counter, {}, roles, {}, taken,
                                     levels)
    after_intra = dict(base)
    after_intra.update({s.name: "state" for s in states})
    after_intra.update(level_hidden)
    after_intra.update({op.out: "local" for op in intra.ops})
    merge, _ = lower_stage(stages["merge"], "merge", after_intra, funcs, counter, {o.name: o for o in outputs}, roles,
                            intra_names, taken, levels)
    expanded = {x for v in levels.values() for x in v}
    inter_targets = {**{s.name: s for s in states if s.name not in expanded}, **{name: None for name in levels}}
    inter, _ = lower_stage(stages.get("inter"), "inter", after_intra, funcs, counter, inter_targets,
                            roles, intra_names, taken, levels)
    if not states:  # (after the stages, whose errors are more specific) the outputs would depend on the chunk
        raise SpecError(f"spec '{sdef.name}' declares no state and no score stage: nothing carries information "
                        "from one chunk to the next", sdef.loc,
                        "a 'state S: [K, V]' line and an 'inter { S = ... }' stage (a chunked scan), or a "
                        "'score { s = ... }' stage (the softmax family)")
    return Spec(sdef.name, inputs, outputs, states,
                tuple(ParamDecl(p.name, params[p.name], p.loc) for p in sdef.params), chunk, intra, merge, inter)


MAX_LEVELS = 64


def _level_states(d: ast.Decl, seen: dict[str, Loc]) -> list[TensorDecl]:
    """`state A: [K, V] levels N` -> the N plain states A_0 .. A_{N-1}; the stages read them through
    `levelsum(...)` (merge) and update them with one statement (inter), `lvl` the level (passes.lower_stage)."""
    if d.kind != "state":
        raise SpecError(f"levels on {d.kind} '{d.name}': only a state has levels", d.loc,
                        "levels on a state, e.g. 'state A: [K, V] levels 16'")
    if not 1 <= d.levels <= MAX_LEVELS:
        raise SpecError(f"state '{d.name}' has {d.levels} levels", d.loc, f"1 to {MAX_LEVELS} levels")
    if "reverse" in d.annotations:
        raise NotImplementedError(f"state '{d.name}': a reverse state with levels is not implemented")
    out = []
    for m in range(d.levels):
        name = f"{d.name}_{m}"
        if name in seen:
            raise SpecError(f"'{name}' is declared, but it names level {m} of state '{d.name}' (at {d.loc})",
                            seen[name], f"a name other than {d.name}_0 .. {d.name}_{d.levels - 1}")
        out.append(TensorDecl(name, "state", d.shape, tuple(a for a in d.annotations if a != "levels"), d.loc))
    return out


def _level_visibility(levels: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """What merge and inter see of level states by name: each level state, its expanded states and `lvl` only
    where the lowering substitutes a level (inside levelsum(...), in the state's own update)."""
    vis = {}
    for name, states in levels.items():
        vis[name] = (f"hidden:level state '{name}' is read inside levelsum(...) in merge, or in its own update "
                     "in inter")
        vis.update({s: f"hidden:'{s}' is level {m} of state '{name}': read '{name}' inside levelsum(...)"
                    for m, s in enumerate(states)})
    if levels:
        vis["lvl"] = "hidden:'lvl' is the level inside levelsum(...) in merge, or in a level state's update in inter"
    return vis


def _check_shape(d: ast.Decl) -> None:
    dims = d.shape
    shown = "[" + ", ".join(dims) + "]"
    if len(set(dims)) != len(dims) and not (d.kind == "state" and len(dims) == 2):  # [K, K] is square
        raise SpecError(f"'{d.name}' repeats a dim in {shown}", d.loc, "distinct dim names")
    features = [n for n in dims if n not in O.RESERVED_DIMS]
    if d.kind == "state":
        if any(n in O.RESERVED_DIMS for n in dims) or len(dims) > 2:
            raise SpecError(f"state '{d.name}' has shape {shown}", d.loc,
                            "feature dims only, at most two: [], [K] or [K, V]")
        return
    if d.kind == "input" and "key" in d.annotations and len(dims) >= 3 and dims[1] not in ("B", "H") \
            and (dims[0], dims[2]) == ("B", "H") and len(dims) <= 4:
        return  # a key sequence of its own: [B, S, H] or [B, S, H, D] (passes.lower_softmax checks S)
    if tuple(dims[:3]) != ("B", "T", "H") or len(features) > 1:
        raise SpecError(f"{d.kind} '{d.name}' has shape {shown}", d.loc,
                        "[B, T, H] (one value per token and head) or [B, T, H, D] (a vector per token)")


