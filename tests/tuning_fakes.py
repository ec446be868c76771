"""A runner for effc.tools.tune.tune_problem without a GPU: compiles nothing, times with a given function,
and advances a fake clock by `cost` seconds per timing (so budgets are exact and instant)."""
from __future__ import annotations

from collections import deque


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    gpu = "FakeGPU 80GB"
    sm_count = 132
    smem_limit = 232448

    def __init__(self, ms, wrong=(), broken=(), clock=None, cost=0.0, faulty=()):
        self.ms, self.wrong, self.broken, self.faulty = ms, set(wrong), set(broken), set(faulty)
        self.clock, self.cost = clock, cost
        self.queue: deque = deque()
        self.timed: list = []

    def prepare(self, op, problem, dtype, default):
        self.queue.clear()
        self.default = default

    def submit(self, unit):
        self.queue.append(list(unit))

    def pending(self) -> int:
        return len(self.queue)

    def ready(self, timeout):
        if not self.queue:
            return []
        unit = self.queue.popleft()
        return [(unit, {c: "CompilationError: boom" for c in unit if c in self.broken})]

    FAULT = "AcceleratorError: CUDA error: an illegal memory access was encountered"

    def check(self, c):
        if c in self.faulty:
            return self.FAULT
        return "wrong output: normwise distance 1.00e+00 to the default's (allowed 0.02)" if c in self.wrong else None

    def time(self, c, final):
        if self.clock is not None:
            self.clock.now += self.cost
        self.timed.append((c, final))
        return self.ms(c)
