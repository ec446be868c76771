"""codegen.at_first_use: a generated block's tile loads moved down to their first reader (registers a tile
holds before it is read; tests/test_snapshots.py holds the kernels it shapes)."""
from __future__ import annotations

from effc.codegen import at_first_use

BLOCK = """\
    a = 1
    v_x = tl.load(p + a)
    v_y = tl.load(q)
    v_z = tl.load(r)
    b = 2
    for i in range(3):
        c = v_y + i
    d = v_x + b
    a = 5"""


def test_a_load_moves_to_its_first_reader_and_above_a_block_that_reads_it():
    assert at_first_use(BLOCK).split("\n") == [
        "    a = 1", "    b = 2", "    v_y = tl.load(q)", "    for i in range(3):", "        c = v_y + i",
        "    v_x = tl.load(p + a)", "    d = v_x + b", "    a = 5", "    v_z = tl.load(r)"]


def test_a_load_stays_above_a_line_that_redefines_its_address():
    block = "    v_x = tl.load(p + a)\n    b = 2\n    a = 3\n    d = v_x"
    assert at_first_use(block).split("\n") == ["    b = 2", "    v_x = tl.load(p + a)", "    a = 3", "    d = v_x"]


def test_a_load_unread_in_its_loop_body_stays_in_it():
    block = ("    for vb in range(2):\n        v_s = tl.load(s + vb)\n        e = 1\n    v_g = tl.load(g)\n"
             "    f = v_g")
    assert at_first_use(block).split("\n") == [
        "    for vb in range(2):", "        e = 1", "        v_s = tl.load(s + vb)", "    v_g = tl.load(g)",
        "    f = v_g"]


def test_move_false_leaves_the_block():
    assert at_first_use(BLOCK, move=False) == BLOCK


def test_a_load_read_in_an_else_branch_goes_above_the_if():
    block = "    v_q = tl.load(q)\n    if A:\n        x = 1\n    else:\n        y = v_q\n    z = 2"
    assert at_first_use(block).split("\n") == [
        "    v_q = tl.load(q)", "    if A:", "        x = 1", "    else:", "        y = v_q", "    z = 2"]
