"""Prints the longest functions of a package by lines of code (docstrings, comments and blank
lines not counted), to keep orchestrators short.

  python scripts/function_lengths.py            # the 15 longest in kd_keras/
  python scripts/function_lengths.py -n 5 --max 80 kd_keras   # exit 1 if any is over 80

A nested function counts inside its parent too (the parent's body spans it), as a reader
reads it there.
"""

import argparse
import ast
import io
import os
import sys
import tokenize


def _docstring_lines(tree):
    """Line numbers covered by docstrings (module, class and function) in `tree`."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _code_lines(source):
    """Line numbers that hold a token other than comments and newlines."""
    lines = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip and tok.type != tokenize.ENDMARKER:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def function_lengths(path):
    """[(code lines, "path:line name")] for every function in the file `path`."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, path)
    code = _code_lines(source) - _docstring_lines(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            span = set(range(node.lineno, node.end_lineno + 1))
            out.append((len(span & code), f"{path}:{node.lineno} {node.name}"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["kd_keras"])
    parser.add_argument("-n", type=int, default=15, help="how many to print")
    parser.add_argument("--max", type=int, default=None, help="exit 1 if one is longer")
    args = parser.parse_args(argv)
    rows = []
    for root in args.paths:
        files = [root] if root.endswith(".py") else [
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")
        ]  # fmt: skip
        for path in sorted(files):
            rows += function_lengths(path)
    rows.sort(key=lambda r: (-r[0], r[1]))
    for count, where in rows[: args.n]:
        print(f"{count:5d}  {where}")
    if args.max is not None and rows and rows[0][0] > args.max:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
