"""The package stays one-way: import-linter's contracts in setup.cfg (no cycle, inside functions included, and each
layer importing only those below it) hold, and no module grows past 400 lines."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LONGEST_MODULE = 400  # lines


def test_the_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_no_module_is_over_400_lines():
    modules = (ROOT / "cifar_accel").rglob("*.py")
    lengths = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in modules}
    too_long = [f"{path.relative_to(ROOT)}: {lines}" for path, lines in lengths.items() if lines > LONGEST_MODULE]
    assert not too_long, f"split these modules (at most {LONGEST_MODULE} lines): {', '.join(too_long)}"
