"""The house rules of DESIGN.md that a refactor could break silently: imports go one way, no module grows into
several concerns, and the documents' links lead somewhere."""

import ast
import re
from pathlib import Path

from tests.support import REPO

PACKAGE = REPO / "job"


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


def prose(markdown: str) -> str:
    """A document without its fenced code blocks: a `#` or `](` in code is neither a heading nor a link."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", prose(markdown), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_of_the_documents_reaches_a_file_and_its_heading():
    # A link in docs/ is relative to docs/: "docs/operations.md" there is docs/docs/operations.md, a dead link.
    documents = [*REPO.glob("*.md"), *REPO.glob("docs/*.md")]
    dead = []
    for document in documents:
        for target in re.findall(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)", prose(document.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            if not linked.exists():
                dead.append(f"{document.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
                dead.append(f"{document.relative_to(REPO)}: {target} (no such heading)")
    assert len(documents) >= 8 and not dead, dead
