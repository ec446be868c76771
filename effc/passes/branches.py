"""Branches: several softmax walks in one spec, merged per token (NSA's compressed, selected and window
branches, arXiv:2502.11089: three attentions over different keys, summed with per-token gates).

    branch cmp {
      output oc: [B, T, H, V]
      keypos S = (S + 1) * 32 - 1
      score { s = (q @ kc.T) * scale
              mask kpos <= qpos }
      merge { oc = softmax(s) @ vc }
    }
    ...
    merge { o = gc[:, None] * oc + gs[:, None] * os + gw[:, None] * ow }

A branch is a softmax walk of its own: its keys (a key sequence, a select stage, masks) are its business.
The split (AST -> AST, before lowering): each branch but the last becomes a spec `<spec>__<branch>` over the
spec's inputs it reads, with the spec's params and the branch's outputs. The last branch's spec also takes
the earlier branches' outputs as per-token inputs and runs the spec's merge after its own, so its outputs
are the spec's. Each compiles as any softmax spec (lowering, backward, plan, kernels); at run time
(runtime.branched_op) they run in order and autograd chains their backwards: the last one's backward gives
the earlier outputs' cotangents. The cost over one fused kernel is a write and a read of each earlier
branch's output per token, and walks that share no loads.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dsl import ast
from ..errors import SpecError

BRANCH_STAGES = ("prefix", "select", "score", "merge")


@dataclass(frozen=True)
class PerBranch:
    """One compiler stage of a spec with branches: the stage of each branch's spec, in the order they run."""

    name: str
    parts: tuple[str, ...]
    values: tuple
    family = "branched"

    def __str__(self) -> str:
        return "\n\n".join(f"# branch spec {p}\n{v}" for p, v in zip(self.parts, self.values))


@dataclass(frozen=True)
class BranchSplit:
    spec: str
    parts: tuple[str, ...]  # the specs of the branches, in the order they run
    writes: tuple[tuple[str, ...], ...]  # the outputs each part but the last passes on
    module: ast.Module  # the file's module with the parts' specs added

    def __str__(self) -> str:
        runs = [f"{p}: writes {', '.join(w)} per token" for p, w in zip(self.parts, self.writes)]
        return (f"branches of '{self.spec}', in order: " + "; ".join(runs)
                + f"; {self.parts[-1]}: reads them and runs the spec's merge")


def _reads(node, out: set[str]) -> set[str]:
    """The names an expression or statement reads."""
    if isinstance(node, ast.Name):
        out.add(node.id)
    elif isinstance(node, ast.BinOp):
        _reads(node.left, out), _reads(node.right, out)
    elif isinstance(node, (ast.Neg, ast.Transpose, ast.Subscript)):
        _reads(node.operand, out)
    elif isinstance(node, ast.Call):
        for a in node.args:
            _reads(a, out)
    elif isinstance(node, (ast.Assign, ast.KeyPos)):
        _reads(node.value if isinstance(node, ast.Assign) else node.expr, out)
    elif isinstance(node, (ast.Mask, ast.Force)):
        _reads(node.predicate, out)
    elif isinstance(node, ast.Criterion):
        for x in (node.score, node.value, node.limit):
            if x is not None:
                _reads(x, out)
    return out


def _stage_reads(stages) -> set[str]:
    out: set[str] = set()
    for st in stages:
        for item in st.body:
            _reads(item, out)
    return out


def _assigned(stage: ast.Stage | None) -> set[str]:
    return {a.target for a in stage.body if isinstance(a, ast.Assign)} if stage else set()


def _check(sdef: ast.SpecDef) -> ast.Stage:
    """Located errors for what a spec with branches cannot hold; returns its merge."""
    if sdef.extends:
        raise SpecError(f"spec '{sdef.name}' has branches and extends '{sdef.extends}': a spec with branches "
                        "extends no other", sdef.extends_loc, "the branches written out in one spec")
    for st in sdef.stages:
        if st.name != "merge":
            raise SpecError(f"'{st.name}' at the top of spec '{sdef.name}', which has branches: each branch walks "
                            "its own keys", st.loc, f"'{st.name}' inside a branch, and only 'merge' outside")
    for d in sdef.decls:
        if d.kind == "state":
            raise SpecError(f"state '{d.name}' in spec '{sdef.name}', which has branches: a spec with branches "
                            "merges softmax walks only", d.loc, "no state (a state beside a score is a hybrid)")
    if sdef.keypos:
        raise SpecError("keypos at the top of a spec with branches", sdef.keypos[0].loc,
                        "the keypos line inside the branch whose score reads that key sequence")
    merge = next((st for st in sdef.stages if st.name == "merge"), None)
    if merge is None:
        raise SpecError(f"spec '{sdef.name}' has branches but no merge combining them", sdef.loc,
                        "merge { o = ... } reading the branches' outputs")
    _check_branches(sdef)
    _check_reads(sdef, merge)
    return merge


def _check_branches(sdef: ast.SpecDef) -> None:
    """Each branch: a softmax walk with its score and merge, outputs of its own that its merge assigns."""
    names: dict[str, ast.Branch] = {}
    taken = {d.name for d in sdef.decls} | {p.name for p in sdef.params}
    for b in sdef.branches:
        if b.name in names:
            raise SpecError(f"branch '{b.name}' declared twice", b.loc, "one branch per name")
        names[b.name] = b
        stages = {st.name: st for st in b.stages}
        for st in b.stages:
            if st.name not in BRANCH_STAGES:
                raise SpecError(f"'{st.name}' in branch '{b.name}': a branch is a softmax walk", st.loc,
                                "one of " + ", ".join(BRANCH_STAGES))
        for need in ("score", "merge"):
            if need not in stages:
                raise SpecError(f"branch '{b.name}' has no {need} stage", b.loc, f"{need} {{ ... }} in the branch")
        if not b.outputs:
            raise SpecError(f"branch '{b.name}' declares no output", b.loc,
                            "an 'output x: [B, T, H, V]' line: what the spec's merge reads of this branch")
        for o in b.outputs:
            if o.name in taken:
                raise SpecError(f"branch output '{o.name}' is already a name of spec '{sdef.name}'", o.loc,
                                "a name of its own")
            taken.add(o.name)
            if o.name not in _assigned(stages["merge"]):
                raise SpecError(f"branch '{b.name}' never assigns its output '{o.name}'", stages["merge"].loc,
                                f"'{o.name} = ...' in the branch's merge")


def _check_reads(sdef: ast.SpecDef, merge: ast.Stage) -> None:
    """Branches read inputs and params only; the spec's merge reads them and the branches' outputs, every
    output and every input read somewhere."""
    for b in sdef.branches:
        others = {o.name for x in sdef.branches if x is not b for o in x.outputs}
        for item in (i for st in b.stages for i in st.body):
            hit = _reads(item, set()) & others
            if hit:
                raise SpecError(f"branch '{b.name}' reads '{sorted(hit)[0]}', another branch's output: branches "
                                "walk independently", item.loc, "branch outputs read in the spec's merge only")
    read = _stage_reads([merge])
    outputs = {o.name for b in sdef.branches for o in b.outputs}
    for b in sdef.branches:
        inner = {x for st in b.stages for x in _assigned(st)} - outputs
        for item in merge.body:
            hit = sorted(_reads(item, set()) & inner - _assigned(merge))
            if hit:
                raise SpecError(f"merge reads '{hit[0]}', a value of branch '{b.name}'", item.loc,
                                f"the branch's outputs ({', '.join(o.name for o in b.outputs)}), inputs and params")
    everywhere = read | _stage_reads([st for b in sdef.branches for st in b.stages])
    for d in sdef.decls:
        if d.kind == "input" and d.name not in everywhere:
            raise SpecError(f"input '{d.name}' of spec '{sdef.name}' is read by no branch and not by merge", d.loc,
                            "a read of it, or no such input")
    for b in sdef.branches:
        for o in b.outputs:
            if o.name not in read:
                raise SpecError(f"branch '{b.name}''s output '{o.name}' is never read by the spec's merge", o.loc,
                                f"'{o.name}' in merge (or drop it)")


def _params_read(params: tuple[ast.Param, ...], reads: set[str]) -> tuple[ast.Param, ...]:
    """The params a branch reads, and those their defaults read (a call-time value reaches the branches that
    declare it)."""
    by_name = {p.name: p for p in params}
    need, todo = set(), [n for n in reads if n in by_name]
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo += [x for x in _reads(by_name[n].default, set()) if x in by_name]
    return tuple(p for p in params if p.name in need)


def split_branches(module: ast.Module, name: str) -> BranchSplit:
    """The specs of spec `name`'s branches (see the module doc), added to `module`."""
    specs = {s.name: s for s in module.specs}
    sdef = specs[name]
    if not sdef.branches:
        raise SpecError(f"spec '{name}' extends '{sdef.extends}', which has branches: a spec with branches is "
                        "extended by none", sdef.extends_loc, "the branches written out in this spec")
    merge = _check(sdef)
    inputs = [d for d in sdef.decls if d.kind == "input"]
    outputs = [d for d in sdef.decls if d.kind == "output"]
    parts, writes, specs = [], [], []
    last = sdef.branches[-1]
    for b in sdef.branches:
        stages = tuple(st for st in b.stages if st.name != "merge")
        b_merge = next(st for st in b.stages if st.name == "merge")
        reads = _stage_reads(b.stages) | (_reads(b.keypos[0], set()) if b.keypos else set())
        if b is last:
            reads |= _stage_reads([merge])
            earlier = [ast.Decl("input", o.name, o.shape, (), o.loc) for x in sdef.branches[:-1] for o in x.outputs]
            decls = tuple(d for d in inputs if d.name in reads) + tuple(earlier) + tuple(outputs)
            body = ast.Stage("merge", b_merge.body + merge.body, b_merge.loc)
        else:
            decls = tuple(d for d in inputs if d.name in reads) + tuple(b.outputs)
            body = b_merge
            writes.append(tuple(o.name for o in b.outputs))
        if not any(d.kind == "input" for d in decls):
            raise SpecError(f"branch '{b.name}' reads no input of spec '{sdef.name}'", b.loc, "a score over inputs")
        part = f"{sdef.name}__{b.name}"
        parts.append(part)
        specs.append(ast.SpecDef(part, decls, _params_read(sdef.params, reads), sdef.chunk, stages + (body,), None,
                                 b.loc, sdef.chunk_loc, sdef.extends_loc, b.keypos))
    mod = ast.Module(module.funcs, module.specs + tuple(specs), module.file, tuple(parts))
    return BranchSplit(sdef.name, tuple(parts), tuple(writes), mod)
