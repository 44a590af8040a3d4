"""Symbolic shape expressions and range constraints, checked as text and as a parsed (never
evaluated) tree before sympy sees them: only sympy's constructors for integers, symbols and
arithmetic, int64 literals, powers that cannot explode, and bounded length, depth and terms."""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from .common import UnsafeArchive, words

# what torch.export writes into symbolic expressions (sympy srepr and printed forms)
SYMPY_NAMES = words(
    "Symbol Integer Rational Float Mul Add Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge And Or Not "
    "Equality Unequality GreaterThan StrictGreaterThan LessThan StrictLessThan "
    "FloorDiv CeilDiv ModularIndexing CleanDiv PythonMod IntTrueDiv FloatTrueDiv ToFloat "
    "TruncToInt FloorToInt CeilToInt RoundToInt RoundDecimal PowByNatural FloatPow "
    "BitwiseFn_bitwise_and BitwiseFn_bitwise_or Identity OpaqueUnaryFn_sqrt "
    "true false True False positive integer nonnegative negative real finite infinite "
    "precision oo zoo nan"
)
_EXPR_TOKEN = re.compile(
    r"\s*(?:(\d+(?:\.\d*)?(?:e[-+]?\d+)?)|([A-Za-z_]\w*)|('[^']*')|(\S))", re.ASCII
)
# no "^": sympify reads it as "**"
_EXPR_PUNCTUATION = set("()[],=+-*/%<>!&|")
# How much sympy is asked to compute. torch.export writes a few symbols, small integers
# and int64 bounds, powers by a literal (Pow(s0, 2)) or a size (PowByNatural(2, s0 + 1)),
# a few levels deep; sympify evaluates whatever numbers an expression spells, and a power
# of a power (9**9**99999) or a shift (1 << 10**18) never finishes
MAX_EXPRESSION_CHARS = 10_000
MAX_EXPRESSION_DEPTH = 32  # brackets; sympy's parser and simplifiers recurse on them
MAX_EXPRESSION_TERMS = 256  # calls, names, literals and operators
MAX_MIN_MAX_ARGUMENTS = 16  # Max and Min compare every pair of their arguments
MAX_LITERAL_DIGITS = 19  # an int64: sizes, strides, bounds
MAX_EXPONENT = 64
MAX_FLOAT_PRECISION = 64  # bits; torch writes a double's 53
# an unbacked range-constraint key's number is counted up to, one by one, at load
MAX_UNBACKED_INDEX_DIGITS = 6
POWERS = words("Pow PowByNatural FloatPow")
ASSUMPTIONS = words("positive integer nonnegative negative real finite infinite")
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.BitAnd, ast.BitOr)
_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_FLOAT_TEXT = re.compile(r"-?\d{1,20}(\.\d{0,20})?(e[-+]?\d{1,3})?", re.ASCII)
_UNBACKED_KEY = re.compile(r"(zuf|u)(.*)", re.DOTALL)
# torch.export names every symbol a short prefix and a number (s0, u3, zuf1); requiring
# the number keeps every Python builtin (exec, open, chr) out of what sympify evaluates
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}_?\d+(_\d+)?", re.ASCII)


def check_range_constraint(key: str, bounds: Any) -> None:
    """A symbol (or a derived one: ``2*s0``) and its int64 bounds; ``None`` is unbounded.
    Torch never sympifies the key, but counts up to the number in an unbacked one (``u3``)."""
    check_expression(key)
    unbacked = _UNBACKED_KEY.fullmatch(key)
    if unbacked and not re.fullmatch(rf"\d{{1,{MAX_UNBACKED_INDEX_DIGITS}}}", unbacked[2]):
        raise UnsafeArchive(
            f"range constraint {key[:60]!r} is not an unbacked symbol's name ({unbacked[1]} "
            f"and at most {MAX_UNBACKED_INDEX_DIGITS} digits)"
        )
    fields = ("min_val", "max_val")
    if not isinstance(bounds, dict) or not all(
        bounds.get(f) is None or _is_small_int(bounds[f]) for f in fields
    ):
        raise UnsafeArchive(
            f"range constraint {key[:60]!r} has bounds {str(bounds)[:60]}, not integers "
            f"of at most {MAX_LITERAL_DIGITS} digits"
        )


def check_hint(hint: Any, expression: str) -> None:
    """The value an expression had when exported: an int64, a float or a bool."""
    if hint is None:
        return
    if not (isinstance(hint, dict) and len(hint) == 1 and _is_hint(*next(iter(hint.items())))):
        raise UnsafeArchive(
            f"symbolic expression {expression[:60]!r} has the hint {str(hint)[:60]}, not an "
            f"integer of at most {MAX_LITERAL_DIGITS} digits, a float or a bool"
        )


def _is_hint(kind: str, value: Any) -> bool:
    if kind == "as_int":
        return _is_small_int(value)
    if kind == "as_float":
        return type(value) is float or _is_small_int(value)
    return kind == "as_bool" and type(value) is bool


def _is_small_int(value: Any) -> bool:
    return type(value) is int and abs(value) < 10**MAX_LITERAL_DIGITS


def check_expression(text: str) -> None:
    """Sympy's constructors for integers, symbols and arithmetic, spelled as torch.export
    spells them, and no more than sympy evaluates at once: refused before anything parses
    it (sympify evaluates the numbers it spells, however large)."""

    def refuse(why: str) -> None:
        raise UnsafeArchive(f"symbolic expression {text[:60]!r} {why}")

    if "__" in text or len(text) > MAX_EXPRESSION_CHARS:
        refuse("is not sympy's")
    depth = 0
    for number, word, quoted, other in _EXPR_TOKEN.findall(text):
        if number:
            _check_number_text(number, refuse)
        if word and word not in SYMPY_NAMES and not _SYMBOL_NAME.fullmatch(word):
            refuse(f"names {word!r}")
        if quoted and re.match(r"'-?\d", quoted):  # Float('1.5', precision=53)
            _check_number_text(quoted[1:-1], refuse)
        elif quoted and not _SYMBOL_NAME.fullmatch(quoted[1:-1]):
            refuse(f"names {quoted[:30]}")
        if other and other not in _EXPR_PUNCTUATION:
            refuse(f"holds {other!r}")
        if other in ("(", "["):
            depth += 1
            if depth > MAX_EXPRESSION_DEPTH:
                refuse(f"nests more than {MAX_EXPRESSION_DEPTH} brackets deep")
        elif other in (")", "]"):
            depth -= 1
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        refuse("is not an expression")
    _ExpressionShape(refuse).check(tree.body)


def _check_number_text(number: str, refuse: Any) -> None:
    """A literal as spelled: sympify makes an Integer or Float of the text itself."""
    if number.isdigit():
        if len(number.lstrip("0")) > MAX_LITERAL_DIGITS:
            refuse(f"holds a literal of more than {MAX_LITERAL_DIGITS} digits")
    elif not _FLOAT_TEXT.fullmatch(number) or not math.isfinite(float(number)):
        refuse(f"holds the number {number[:30]}, not a finite double")


class _ExpressionShape:
    """Walks the parsed (never evaluated) expression: only calls of the names the token
    check let through, arithmetic and comparisons; literals of at most 19 digits; at most
    ``MAX_EXPRESSION_TERMS`` terms and ``MAX_MIN_MAX_ARGUMENTS`` Max/Min arguments; and
    powers (``Pow``, ``PowByNatural``, ``FloatPow``, ``**``) that never nest, raised to a
    literal of at most ``MAX_EXPONENT``, or (``PowByNatural``, ``FloatPow``) to a size
    expression that cannot collapse to a number: torch bounds those itself (``safe_pow``,
    a double), where sympy's ``Pow`` of two integers computes the whole number.

    So nothing sympy evaluates exceeds about ``terms * 64 * MAX_EXPONENT`` bits even with
    every symbol replaced by an int64."""

    def __init__(self, refuse: Any) -> None:
        self.refuse = refuse
        self.terms = 0
        self.min_max_arguments = 0

    def check(self, node: ast.expr, in_power: str = "") -> None:
        self.terms += 1
        if self.terms > MAX_EXPRESSION_TERMS:
            self.refuse(f"has more than {MAX_EXPRESSION_TERMS} terms")
        if isinstance(node, ast.Constant):
            if type(node.value) is str or not self._is_number(node.value):
                self.refuse(f"holds the literal {str(node.value)[:30]!r} there")
        elif isinstance(node, ast.Name):
            pass  # a symbol or a sympy name, as the token check made sure
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            self.check(node.operand, in_power)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            self._power("**", node.left, node.right, in_power)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
            self.check(node.left, in_power)
            self.check(node.right, in_power)
        elif isinstance(node, ast.Compare) and all(isinstance(o, _COMPARISONS) for o in node.ops):
            for operand in [node.left, *node.comparators]:
                self.check(operand, in_power)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            self._call(node.func.id, node, in_power)
        else:
            self.refuse(f"holds {_unparse(node)!r}, which is not sympy arithmetic")

    def _call(self, name: str, node: ast.Call, in_power: str) -> None:
        args, keywords = node.args, node.keywords
        if name == "Symbol":
            if not (
                len(args) == 1
                and _string_constant(args[0], _SYMBOL_NAME)
                and all(k.arg in ASSUMPTIONS and _bool_constant(k.value) for k in keywords)
            ):
                self.refuse(f"makes the symbol {_unparse(node)!r}")
            return
        if name == "Float":
            if not (
                len(args) == 1
                and (_string_constant(args[0], _FLOAT_TEXT) or self._is_literal(args[0]))
                and all(k.arg == "precision" and _precision(k.value) for k in keywords)
            ):
                self.refuse(f"makes the float {_unparse(node)!r}, not a double")
            return
        if keywords:
            self.refuse(f"passes {name} keywords")
        if name in POWERS:
            if len(args) != 2:
                self.refuse(f"calls {name} with {len(args)} arguments")
            self._power(name, args[0], args[1], in_power)
            return
        if name in ("Max", "Min"):
            self.min_max_arguments += len(args)
            if self.min_max_arguments > MAX_MIN_MAX_ARGUMENTS:
                self.refuse(f"has more than {MAX_MIN_MAX_ARGUMENTS} Max and Min arguments")
        for arg in args:
            self.check(arg, in_power)

    def _power(self, name: str, base: ast.expr, exponent: ast.expr, in_power: str) -> None:
        if in_power:
            self.refuse(f"nests {name} inside {in_power}")
        if not (
            self._is_small_exponent(exponent)
            or (name == "FloatPow")
            or (name == "PowByNatural" and _never_a_number(exponent))
        ):
            self.refuse(
                f"raises to {_unparse(exponent)[:30]!r}: {name} takes a literal exponent of "
                f"at most {MAX_EXPONENT}"
                + (", or a size expression" if name == "PowByNatural" else "")
            )
        self.check(base, name)
        self.check(exponent, name)

    def _is_small_exponent(self, node: ast.expr) -> bool:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            node = node.operand
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "Integer" and len(node.args) == 1 and not node.keywords:
                return self._is_small_exponent(node.args[0])
            if (
                node.func.id == "Float"
                and node.args
                and _string_constant(node.args[0], _FLOAT_TEXT)
            ):
                return abs(float(node.args[0].value)) <= MAX_EXPONENT  # type: ignore[attr-defined]
            return False
        return self._is_literal(node) and abs(node.value) <= MAX_EXPONENT  # type: ignore[attr-defined]

    def _is_literal(self, node: ast.expr) -> bool:
        return isinstance(node, ast.Constant) and self._is_number(node.value)

    def _is_number(self, value: Any) -> bool:
        if type(value) is int:
            if abs(value) >= 10**MAX_LITERAL_DIGITS:  # 0x/0o/0b spellings get here
                self.refuse(f"holds a literal of more than {MAX_LITERAL_DIGITS} digits")
            return True
        if type(value) is float:
            return math.isfinite(value)
        return type(value) is bool


def _never_a_number(node: ast.expr) -> bool:
    """A sum of products of symbols, each named once, and nonzero integer literals: it
    stays symbolic (PowByNatural stays unevaluated) until every symbol has a value."""
    names: list[str] = []

    def symbolic(n: ast.expr) -> bool | None:  # None: not a polynomial of this kind
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Symbol":
            if n.args and _string_constant(n.args[0], _SYMBOL_NAME):
                names.append(n.args[0].value)  # type: ignore[attr-defined]
                return True
            return None
        if isinstance(n, ast.Name) and _SYMBOL_NAME.fullmatch(n.id):
            names.append(n.id)
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Integer":
            return False if len(n.args) == 1 and _nonzero_int(n.args[0]) else None
        if _nonzero_int(n):
            return False
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub | ast.UAdd):
            return symbolic(n.operand)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add | ast.Sub | ast.Mult):
            operands = [n.left, n.right]
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.keywords:
            if n.func.id not in ("Add", "Mul"):
                return None
            operands = n.args
        else:
            return None
        # a literal operand is one nonzero literal: a sum or product of literals alone may
        # be zero (and zero a product) or huge
        kinds = [symbolic(o) for o in operands]
        return None if None in kinds or not any(kinds) else True

    return bool(symbolic(node)) and len(names) == len(set(names))


def _nonzero_int(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value != 0


def _string_constant(node: ast.expr, pattern: re.Pattern[str]) -> bool:
    return (
        isinstance(node, ast.Constant)
        and type(node.value) is str
        and bool(pattern.fullmatch(node.value))
    )


def _bool_constant(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is bool


def _precision(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Constant)
        and type(node.value) is int
        and 0 < node.value <= MAX_FLOAT_PRECISION
    )


def _unparse(node: ast.expr) -> str:
    return ast.unparse(node)[:40]
