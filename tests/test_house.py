"""The house rules of DESIGN.md that a refactor could break silently: imports go one way, no module grows into
several concerns."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "job"


def job_imports(path: Path) -> set[str]:
    """Modules of `job` that `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("job"):
            if node.module == "job":
                found.update(alias.name for alias in node.names)
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("job."))
    return found


def test_job_modules_import_each_other_without_a_cycle():
    graph = {path.stem: job_imports(path) for path in PACKAGE.glob("*.py")}
    assert graph["__main__"] == {"cli"}, "python -m job only starts the CLI"
    assert [m for m, deps in graph.items() if "cli" in deps] == ["__main__"], "nothing but __main__ imports cli"

    def visit(module: str, path: tuple[str, ...]) -> None:
        for dep in graph.get(module, ()):
            assert dep not in path, f"import cycle: {' -> '.join(path + (dep,))}"
            visit(dep, path + (dep,))

    for module in graph:
        visit(module, (module,))


def test_the_vat_loss_and_the_model_know_nothing_of_settings_files_or_logs():
    for name in ("vat", "model"):
        assert job_imports(PACKAGE / f"{name}.py") == set(), name


def test_no_module_grows_past_about_300_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert all(n <= 320 for n in sizes.values()), sizes
