"""The agent's built-in tools: safe by construction (no shell, no network, no files).

* ``calculator``: arithmetic over Python's syntax tree — numbers, ``+ - * / // % **``,
  parentheses and a short list of math functions and constants; nothing else parses.
  Powers are refused when the exponent is above 1,000 in size or the result would pass
  10**100 (checked before computing), as are integers above 10**100.
* ``current_time``: now, in UTC or a named IANA time zone.

A tool never raises: a problem comes back as text starting with ``error:``, which the
model reads as its observation. Results are cut to ``MAX_RESULT_CHARS``.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

MAX_RESULT_CHARS = 2000
MAX_EXPRESSION_CHARS = 500
MAX_INT = 10**100
MAX_EXPONENT = 1000


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    run: Callable[[dict[str, Any]], str]


class _Refused(Exception):
    pass


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _round(value: float | int, digits: float | int = 0) -> float | int:
    # round() with a huge number of digits takes unbounded time.
    if not isinstance(digits, int) or abs(digits) > 100:
        raise _Refused("round() digits must be a whole number up to 100")
    return round(value, digits)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Refused("only numbers")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise _Refused("a number above 10**100")
    if isinstance(value, float) and math.isinf(value):
        raise _Refused("the result is too large")
    return value


def _power(base: float | int, exponent: float | int) -> float | int:
    if abs(exponent) > MAX_EXPONENT:
        raise _Refused(f"an exponent above {MAX_EXPONENT}")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > 100:
        raise _Refused("a power above 10**100")
    return _number(base**exponent)


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        operation = _BINARY.get(type(node.op))
        if operation is None:
            raise _Refused(f"the operator {type(node.op).__name__}")
        return _number(operation(left, right))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        arguments = [_evaluate(argument) for argument in node.args]
        return _number(_FUNCTIONS[node.func.id](*arguments))
    raise _Refused(f"{type(node).__name__} is not arithmetic")


def _format(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, or ``error: ...``."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: the expression is longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
        return _format(_evaluate(tree))
    except _Refused as exc:
        return f"error: not allowed: {exc}"
    except ZeroDivisionError:
        return "error: division by zero"
    except SyntaxError:
        return "error: not an arithmetic expression"
    except (ValueError, OverflowError, TypeError) as exc:
        return f"error: {exc}"


def _calculator(arguments: dict[str, Any]) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        return 'error: give {"expression": "..."}'
    return calculate(expression)


def current_time_tool(clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Tool:
    def run(arguments: dict[str, Any]) -> str:
        zone_name = arguments.get("timezone") or "UTC"
        if not isinstance(zone_name, str):
            return "error: timezone must be a name such as Europe/Oslo"
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            return f"error: unknown time zone {zone_name!r}"
        now = clock().astimezone(zone)
        return f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')}, {zone_name})"

    return Tool(
        name="current_time",
        description="The current date and time, in UTC or a given IANA time zone.",
        parameters={
            "type": "object",
            "properties": {
                "timezone": {"type": "string", "description": "e.g. Europe/Oslo; default UTC"}
            },
        },
        run=run,
    )


CALCULATOR = Tool(
    name="calculator",
    description="Evaluates an arithmetic expression: + - * / // % ** (or ^), parentheses, "
    "sqrt, abs, round, min, max, log, exp, sin, cos, tan, floor, ceil, pi, e.",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. (17 * 23) / 4"}},
        "required": ["expression"],
    },
    run=_calculator,
)

BUILTIN_TOOLS: dict[str, Tool] = {tool.name: tool for tool in (CALCULATOR, current_time_tool())}


def run_tool(tools: Mapping[str, Tool], name: str, arguments: str | dict[str, Any]) -> str:
    """Runs a tool by name with JSON (or already parsed) arguments; never raises."""
    tool = tools.get(name)
    if tool is None:
        return f"error: unknown tool {name!r}; the tools are: {', '.join(tools)}"
    if isinstance(arguments, str):
        try:
            parsed = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            return "error: the Action Input is not valid JSON"
    else:
        parsed = arguments
    if not isinstance(parsed, dict):
        return "error: the Action Input must be a JSON object"
    try:
        result = tool.run(parsed)
    except Exception as exc:  # a tool is never allowed to break the run
        result = f"error: {type(exc).__name__}"
    return result[:MAX_RESULT_CHARS]


def openai_tool_specs(tools: Iterable[Tool]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in tools
    ]
