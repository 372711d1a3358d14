"""The shape of the code holds: the import contracts of ``.importlinter``, and no import cycles.

* Each contract in ``.importlinter`` is checked in-process through import-linter's Python API
  (no child process, so these tests are in the fast ``-m "not e2e"`` loop); a broken contract
  fails with import-linter's own report: every forbidden import with its module and line.
* Each contract is also run against a small hand-made graph, clean and then with one bad
  import, so a contract that a typo made vacuous cannot pass unnoticed.
* The cycles are named one by one (grimp, the graph library import-linter uses): every group
  of modules, and every group of sibling subpackages, that import each other, as a chain
  ``a -> b -> a`` with the line of each import on it.

What counts as an import is decided once, in ``.importlinter``: every ``import`` statement,
at module top, inside a function, or under ``if TYPE_CHECKING:``.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import grimp
import pytest
from importlinter.api import read_configuration
from importlinter.application import use_cases
from importlinter.application.output import console
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.forbidden import ForbiddenContract

from tests.support.paths import REPO

CONFIG = REPO / ".importlinter"
OPTIONS = read_configuration(str(CONFIG))
SESSION = OPTIONS["session_options"]
CONTRACTS = {c["id"]: c for c in OPTIONS["contracts_options"]}
ROOT_PACKAGES = tuple(SESSION["root_packages"])


def import_graph() -> grimp.ImportGraph:
    """The graph of imports between modules of argus and worker, counted as ``.importlinter`` counts
    them (external packages left out; no cache written)."""
    return grimp.build_graph(
        *ROOT_PACKAGES,
        include_external_packages=False,
        exclude_type_checking_imports=SESSION.get("exclude_type_checking_imports", "False") == "True",
        cache_dir=None,
    )


# --------------------------------------------------------------------------- the contracts


def test_the_issues_contracts_are_all_configured():
    """Issue 11: engine stands alone, protocol is sans-I/O, argus uses three worker interfaces, no cycles."""
    assert {"engine-stands-alone", "protocol-is-sans-io", "argus-uses-worker-interfaces", "no-cycles"} <= set(CONTRACTS)
    assert set(ROOT_PACKAGES) == {"argus", "worker"}
    # every import counts: lazy (function-level) ones by grimp's nature, TYPE_CHECKING ones by this setting
    assert SESSION["exclude_type_checking_imports"] == "False"
    assert SESSION["include_external_packages"] == "True"  # so stdlib I/O modules can be forbidden


@pytest.mark.parametrize("contract_id", sorted(CONTRACTS))
def test_import_contract_is_kept(contract_id):
    width = console.width
    console.width = 200  # whole import lines, not wrapped at 80 columns
    try:
        with console.capture() as captured:
            kept = use_cases.lint_imports(config_filename=str(CONFIG), limit_to_contracts=(contract_id,),
                                          cache_dir=None, no_logo=True)
    finally:
        console.width = width
    report = captured.get()
    assert kept, f"import contract {contract_id!r} ({CONTRACTS[contract_id]['name']}) is broken:\n{report}"


# --------------------------------------------------------------------------- the contracts bite
# The same contract options, checked against a small hand-made graph: clean, then with one bad import.
# A contract that a typo made vacuous (a module name that matches nothing) would pass the real code
# silently; here it must catch the import it exists to catch.

TOY_MODULES = ["argus", "argus.core", "worker", "worker.engine", "worker.engine.ops", "worker.engine.block_range",
               "worker.protocol", "worker.protocol.envelope", "worker.control", "worker.daemon", "worker.placement"]
TOY_IMPORTS = [("argus.core", "worker.control"), ("argus.core", "worker.protocol.envelope"),
               ("argus.core", "worker.engine.ops"), ("worker.control", "worker.protocol.envelope"),
               ("worker.daemon", "worker.engine.ops"), ("worker.daemon", "worker.placement"),
               ("worker.protocol.envelope", "worker.engine.block_range"), ("worker.protocol.envelope", "json"),
               ("worker.engine.ops", "numpy")]


def toy_graph(extra: tuple[str, str] | None = None) -> grimp.ImportGraph:
    graph = grimp.ImportGraph()
    for m in TOY_MODULES:
        graph.add_module(m)
    for m in ("json", "numpy", "asyncio", "socket"):
        graph.add_module(m, is_squashed=True)
    for importer, imported in TOY_IMPORTS + ([extra] if extra else []):
        graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    return graph


def contract_check(contract_id: str, graph: grimp.ImportGraph) -> bool:
    options = dict(CONTRACTS[contract_id])
    cls = {"forbidden": ForbiddenContract, "acyclic_siblings": AcyclicSiblingsContract}[options["type"]]
    contract = cls(name=options["name"], session_options=SESSION, contract_options=options)
    return contract.check(graph, verbose=False).kept


@pytest.mark.parametrize("contract_id,bad_import", [
    ("engine-stands-alone", ("worker.engine.ops", "worker.protocol.envelope")),
    ("engine-stands-alone", ("worker.engine.block_range", "argus.core")),
    ("protocol-is-sans-io", ("worker.protocol.envelope", "asyncio")),
    ("protocol-is-sans-io", ("worker.protocol.envelope", "socket")),
    ("argus-uses-worker-interfaces", ("argus.core", "worker.placement")),
    ("argus-uses-worker-interfaces", ("argus.core", "worker.daemon")),
    ("worker-does-not-import-argus", ("worker.daemon", "argus.core")),
    ("no-cycles", ("worker.placement", "worker.daemon")),
    ("no-cycles", ("worker.engine.block_range", "worker.protocol.envelope")),
], ids=lambda v: v if isinstance(v, str) else " -> ".join(v))
def test_contract_catches_the_import_it_forbids(contract_id, bad_import):
    assert contract_check(contract_id, toy_graph()), "the toy graph itself should keep every contract"
    assert not contract_check(contract_id, toy_graph(bad_import))


# --------------------------------------------------------------------------- cycles, named one by one
# The no-cycles contract says which imports would break each cycle; these tests name the cycles
# themselves, as chains with the line of every import on them.

Edges = Callable[[str], set[str]]


def strongly_connected_components(nodes: set[str], edges: Edges) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of nodes that reach each other, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        work.append((v, iter(sorted(edges(v) & nodes))))

    for root in sorted(nodes):
        if root in index:
            continue
        work: list = []
        visit(root)
        while work:
            v, successors = work[-1]
            for w in successors:
                if w not in index:
                    visit(w)
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def shortest_cycle(start: str, within: set[str], edges: Edges) -> list[str]:
    """The shortest chain start -> ... -> start through nodes of ``within`` (breadth-first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges(v) & within):
            if w == start:
                chain = [v]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in no cycle")


def import_lines(graph: grimp.ImportGraph, importers: set[str], imported: set[str], limit: int = 4) -> list[str]:
    """``module l.N: import statement`` for imports from ``importers`` into ``imported``."""
    lines = []
    for importer in sorted(importers):
        for target in sorted(graph.find_modules_directly_imported_by(importer) & imported):
            for d in graph.get_import_details(importer=importer, imported=target):
                lines.append(f"    {importer} l.{d['line_number']}: {d['line_contents']}")
    return lines[:limit] + ([f"    ... and {len(lines) - limit} more"] if len(lines) > limit else [])


def module_cycles(graph: grimp.ImportGraph) -> list[str]:
    """Every group of modules that import each other, shown by its shortest cycle."""
    modules = set(graph.modules)
    edges = graph.find_modules_directly_imported_by
    found = []
    for component in strongly_connected_components(modules, edges):
        chain = shortest_cycle(component[0], set(component), edges)
        found.append("\n".join([" -> ".join(chain)] + [
            line for a, b in zip(chain, chain[1:]) for line in import_lines(graph, {a}, {b})]))
    return found


def sibling_cycles(graph: grimp.ImportGraph) -> list[str]:
    """Every group of sibling subpackages/modules (children of one package) that import each other,
    counting imports from and into everything inside them: what the no-cycles contract forbids."""
    found = []
    for package in sorted(m for m in graph.modules if not graph.is_module_squashed(m) and graph.find_children(m)):
        children = graph.find_children(package)
        inside = {c: {c} | graph.find_descendants(c) for c in children}
        owner = {m: c for c, ms in inside.items() for m in ms}

        def edges(c: str) -> set[str]:
            return {owner[w] for m in inside[c] for w in graph.find_modules_directly_imported_by(m)
                    if w in owner and owner[w] != c}

        for component in strongly_connected_components(set(children), edges):
            chain = shortest_cycle(component[0], set(component), edges)
            found.append("\n".join([f"in {package}: " + " -> ".join(chain)] + [
                line for a, b in zip(chain, chain[1:]) for line in import_lines(graph, inside[a], inside[b])]))
    return found


def test_no_module_imports_itself_through_a_cycle():
    """Module by module, package ``__init__`` modules included: a package's ``__init__`` that imports
    a child which imports the package back is a cycle too (the no-cycles contract compares whole
    siblings and does not see it)."""
    cycles = module_cycles(import_graph())
    assert not cycles, f"{len(cycles)} import cycle(s), each by its shortest chain:\n\n" + "\n\n".join(cycles)


def test_no_two_siblings_import_each_other():
    """The no-cycles contract, with each cycle named: subpackages or modules of one package that
    import each other, directly or through their siblings."""
    cycles = sibling_cycles(import_graph())
    assert not cycles, f"{len(cycles)} cycle(s) between siblings:\n\n" + "\n\n".join(cycles)


def test_the_cycle_finders_find_a_planted_cycle():
    clean, planted = toy_graph(), toy_graph(("worker.engine.block_range", "worker.protocol.envelope"))
    assert module_cycles(clean) == [] and sibling_cycles(clean) == []
    assert module_cycles(planted) == [
        "worker.engine.block_range -> worker.protocol.envelope -> worker.engine.block_range\n"
        "    worker.engine.block_range l.1: import worker.protocol.envelope\n"
        "    worker.protocol.envelope l.1: import worker.engine.block_range"]
    assert [c.splitlines()[0] for c in sibling_cycles(planted)] == [
        "in worker: worker.engine -> worker.protocol -> worker.engine"]
