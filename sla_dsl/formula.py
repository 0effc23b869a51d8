"""Constant-decay formulas of the head index, e.g. RetNet's `1 - 2**(-5 - h)`.

Parsed with `ast` against a whitelist and evaluated by our own walker: a spec file never runs code.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass

VARIABLES = {"h": "head index, 0-based", "H": "number of heads"}
FUNCTIONS = {"exp": math.exp, "log": math.log, "log2": math.log2, "sqrt": math.sqrt, "min": min, "max": max}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class FormulaError(ValueError):
    pass


@dataclass(frozen=True)
class Formula:
    text: str

    @staticmethod
    def parse(text: str) -> "Formula":
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise FormulaError(f"{text!r} is not a valid formula ({exc.msg})") from None
        _check(tree.body, text)
        return Formula(text)

    def evaluate(self, h: int, num_heads: int) -> float:
        tree = ast.parse(self.text, mode="eval")
        try:
            return float(_eval(tree.body, {"h": h, "H": num_heads}))
        except (ArithmeticError, ValueError) as exc:
            raise FormulaError(f"{self.text!r} fails at h={h}, H={num_heads}: {exc}") from None

    def evaluate_gamma(self, h: int, num_heads: int) -> float:
        gamma = self.evaluate(h, num_heads)
        if not (0.0 < gamma <= 1.0):
            raise FormulaError(f"{self.text!r} gives gamma={gamma} at h={h}, H={num_heads}; a decay must be in (0, 1]")
        return gamma


def _check(node: ast.AST, text: str) -> None:
    allowed = f"numbers, {', '.join(VARIABLES)}, + - * / **, and {', '.join(FUNCTIONS)}"
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return
    if isinstance(node, ast.Name) and node.id in VARIABLES:
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, text)
        _check(node.right, text)
        return
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, text)
        return
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and not node.keywords and node.args):
        for arg in node.args:
            _check(arg, text)
        return
    raise FormulaError(f"{text!r} uses {ast.unparse(node)!r}; a formula may use only {allowed}")


def _eval(node: ast.AST, env: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Pow) and abs(right) > 1024:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return FUNCTIONS[node.func.id](*(_eval(arg, env) for arg in node.args))
