"""What the README and the code's cross-references promise a reader: the README's code imports what
it names, and every reference to a document points at a file and section in this repository."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".toml", ".sh")
           and not {".git", ".venv", "runs", "__pycache__"} & set(p.relative_to(ROOT).parts)]


def readme_imports() -> list[str]:
    """The import statements of the README's Python code blocks, in order."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if re.match(r"(from \S+ )?import ", line)]


def test_the_readme_code_imports_what_it_names():
    lines = readme_imports()
    assert any("masa_kernels" in line for line in lines) and any("from model import" in line for line in lines)
    # A fresh interpreter in the repository root, as a reader runs the snippets.
    out = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=child_env())
    assert out.returncode == 0, f"the README's imports fail:\n{out.stderr[-2000:]}"


def test_every_section_reference_names_a_section_of_the_document():
    doc = (ROOT / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## (§\d+)", doc, flags=re.M))
    assert sections == {"§1", "§2", "§3", "§4", "§5"}
    cited = {(path.relative_to(ROOT), section) for path in SOURCES
             for section in re.findall(r"docs/method\.md (§\d+)", path.read_text(errors="replace"))}
    assert len(cited) >= 10
    missing = sorted(f"{path} cites docs/method.md {section}" for path, section in cited if section not in sections)
    assert not missing, missing


def test_no_reference_points_at_a_document_outside_the_repository():
    # The design document this project grew from lives outside the repository; a reader of a clone
    # cannot follow a reference to it.
    name = "DESIGN" + ".md"  # spelled in two pieces so that this file does not cite it
    outside = [str(path.relative_to(ROOT)) for path in SOURCES if name in path.read_text(errors="replace")]
    assert not outside, f"these files cite {name}, which is not in the repository: {outside}"
