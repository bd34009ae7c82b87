"""Build hook: the gRPC stubs are generated from protos/ when the package is built (metadata: pyproject.toml)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    """Wheels carry `serve/_proto` (an editable install gets it in the source tree)."""

    def run(self) -> None:
        super().run()
        sys.path.insert(0, str(HERE / "protos"))
        from generate import generate

        editable = getattr(self, "editable_mode", False)
        generate(HERE / "serve" / "_proto" if editable else Path(self.build_lib) / "serve" / "_proto")


setup(cmdclass={"build_py": BuildPyWithStubs})
