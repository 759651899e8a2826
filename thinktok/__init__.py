"""thinktok: GPT-2 policies that think in tokens of their own."""

from pathlib import Path

# rl/, models/, envs/, kernels/ sit beside this package in the repository and install as thinktok.rl, ... (the
# package-dir of pyproject.toml). A source checkout on PYTHONPATH (the GPU machine: no install there) has no
# such mapping: look for the submodules in the repository root too. An installed wheel has them inside. An
# editable install finds thinktok.kernels (a namespace folder: no __init__.py) only through this path too.
_root = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "rl").is_dir() and (_root / "rl" / "__init__.py").is_file():
    __path__.append(str(_root))
