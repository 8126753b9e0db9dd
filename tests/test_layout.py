"""The package's shape: imports form a tree, no module uses another's private names, every folder imports only from
the folders below it, old module paths name their new place, and importing the core does not pay for transformers,
peft or timm."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "siglip2_encoder"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of every ``from ... import`` inside the package, lazy ones included."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            if node.module:
                found.append((f"{base}.{node.module}", [alias.name for alias in node.names]))
            else:  # ``from . import jobs``: the submodules themselves
                found += [(f"{base}.{alias.name}", [alias.name]) for alias in node.names]
    return found


def test_imports_form_a_tree_without_private_names():
    graph: dict[str, set[str]] = {}
    private = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        graph.setdefault(name, set())
        for target, names in imports(path):
            if name.startswith(target + ".") and path.name == "__init__.py":
                continue  # a package's __init__ re-exporting its own modules
            graph[name].add(target)
            private += [f"{name} imports {n} from {target}" for n in names if n.startswith("_")]
    assert not private
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import circle: {' -> '.join(err.args[1])}") from None


# The rooms, lowest first: a module may import from its own room and the rooms below it, never from one above. The
# base is the package's top-level modules (config, presets, output, files, moved), which everyone uses.
ROOMS = (
    "base", "checkpoints", "data", "adapters", "models", "export", "pipeline", "integrations", "eval", "serve", "cli"
)  # fmt: skip


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[1] in ROOMS else "base"


def test_every_folder_imports_only_from_the_folders_below_it():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(ROOMS) - {"base"}, "a new folder needs its place in ROOMS"
    upward = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name == PACKAGE.name:
            continue  # the package's __init__ re-exports the public API from every room
        for target, _ in imports(path):
            if target != PACKAGE.name and ROOMS.index(room(target)) > ROOMS.index(room(name)):
                upward.append(f"{name} ({room(name)}) imports {target} ({room(target)})")
    assert not upward, "\n".join(upward)


def test_an_old_module_path_names_its_new_place():
    code = "import siglip2_encoder.lora"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    want = "ImportError: siglip2_encoder.lora moved to siglip2_encoder.models.lora in siglip2-encoder 0.2.0"
    assert want in result.stderr
    code = "from siglip2_encoder.integrations import serve"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "siglip2_encoder.integrations.serve moved to siglip2_encoder.serve.app" in result.stderr
    code = "from siglip2_encoder.checkpoints.convert import read_checkpoint"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "siglip2_encoder.checkpoints.convert moved to siglip2_encoder.checkpoints.hf_format (transformers)" in (
        result.stderr
    )
    assert "or .folders (read_checkpoint, write_checkpoint)" in result.stderr


def test_importing_the_core_loads_no_transformers_peft_or_timm():
    code = (
        "import sys, siglip2_encoder; m = siglip2_encoder.SigLIP2Encoder.from_preset('siglip2-base-patch16-224', "
        "num_hidden_layers=1); print(sorted(k for k in ('transformers', 'peft', 'timm') if k in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
