"""Structure figures of the gdm_ray package: what a new engineer meets.

    python bench/structure.py               # this checkout; writes bench/results/structure.md
    python bench/structure.py --tree DIR    # another checkout (e.g. a clone at an older commit), printed only
    python bench/structure.py --before DIR  # this checkout and the figures of an older one beside it

Reports, from the source alone (ast, no imports run):
- the 10 longest functions and the 10 largest modules (lines);
- functions outside gdm_ray/cli that take an omegaconf DictConfig;
- import circles among gdm_ray's modules, counting imports inside functions
  too (they hold a circle together as much as top-level ones), and the
  longest command function in gdm_ray/cli.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(tree: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under tree/gdm_ray."""
    out = {}
    for path in sorted((tree / "gdm_ray").rglob("*.py")):
        parts = list(path.relative_to(tree).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def functions(path: Path) -> list[tuple[str, int, ast.AST]]:
    """(qualified name, lines, node) of every function in a file."""
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((name, child.end_lineno - child.lineno + 1, child))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(ast.parse(path.read_text()), "")
    return found


def takes_dictconfig(fn: ast.AST) -> bool:
    args = fn.args  # type: ignore[attr-defined]
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    return any(a.annotation is not None and "DictConfig" in ast.unparse(a.annotation) for a in every)


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """gdm_ray modules this module imports, anywhere in the file."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("gdm_ray"):
                out.add(t)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def figures(tree: Path) -> dict:
    mods = modules(tree)
    # a package's __init__ re-exporting its submodules is not a circle with them
    graph = {m: {t for t in imports(m, p, set(mods)) if not m.startswith(t + ".")} for m, p in mods.items()}
    fns = [(f"{m}.{q}", n, node) for m, p in mods.items() for q, n, node in functions(p)]
    return {
        "longest": sorted(((n, q) for q, n, _ in fns), reverse=True)[:10],
        "largest": sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), reverse=True)[:10],
        "dictconfig": sorted(q for q, _, node in fns if not q.startswith("gdm_ray.cli") and takes_dictconfig(node)),
        "dictconfig_cli": sum(1 for q, _, node in fns if q.startswith("gdm_ray.cli") and takes_dictconfig(node)),
        "circles": circles(graph),
        "modules": len(mods),
        "lines": sum(len(p.read_text().splitlines()) for p in mods.values()),
    }


def report(f: dict) -> str:
    from report import markdown_table

    parts = [
        f"{f['modules']} modules, {f['lines']} lines in gdm_ray.",
        "## The 10 longest functions\n\n" + markdown_table(["lines", "function"], [[n, f"`{q}`"] for n, q in f["longest"]]),
        "## The 10 largest modules\n\n" + markdown_table(["lines", "module"], [[n, f"`{m}`"] for n, m in f["largest"]]),
        f"## Functions taking a DictConfig outside gdm_ray/cli: {len(f['dictconfig'])}\n\n"
        + ("\n".join(f"- `{q}`" for q in f["dictconfig"]) or "(none)")
        + f"\n\nInside gdm_ray/cli: {f['dictconfig_cli']}.",
        f"## Import circles: {len(f['circles'])}\n\n" + ("\n".join(f"- {' <-> '.join(c)}" for c in f["circles"]) or "(none)"),
    ]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=None, help="another checkout to measure (printed, not written)")
    ap.add_argument("--before", type=Path, default=None, help="an older checkout whose figures the results file shows first")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    body = report(figures(args.tree or ROOT))
    if args.before is not None and args.tree is None:
        old = report(figures(args.before)).replace("## ", "### ")
        body = f"## Now\n\n{body.replace('## ', '### ')}\n## Before: {args.before}\n\n{old}"
    print(body)
    if args.tree is None:
        from report import write_result

        print(f"wrote {write_result('structure', 'Structure of the gdm_ray package', body)}")


if __name__ == "__main__":
    main()
