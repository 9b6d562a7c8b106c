"""Griffe extension for the docs build (mkdocs.yml: mkdocstrings `extensions`).

Loads folders without ``__init__.py`` inside a package.

``jattn/ops/`` has no ``__init__.py``: Python imports it as a namespace sub-package, but Griffe (the
parser behind mkdocstrings) skips such folders, so ``jattn.attention`` (re-exported from
``jattn.ops.attention``) could not be rendered. This extension visits those folders' modules and attaches
them to their parent package. It does nothing once every folder has an ``__init__.py``.

It also renders Sphinx roles that some docstrings use (``:class:`Attention```, ``:func:`f```) as code,
instead of printing the role literally.
"""
from __future__ import annotations

import re
from pathlib import Path

import griffe


SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc):`~?([^`]+)`")


class NamespaceSubpackages(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = SPHINX_ROLE.sub(r"`\1`", obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if not isinstance(pkg.filepath, Path) or pkg.filepath.name != "__init__.py":
            return
        self._attach(pkg, pkg.filepath.parent, loader)

    def _attach(self, parent: griffe.Module, folder: Path, loader: griffe.GriffeLoader) -> None:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isidentifier()):
            if (sub / "__init__.py").exists():
                if sub.name in parent.members:
                    self._attach(parent.members[sub.name], sub, loader)
                continue
            files = sorted(sub.glob("*.py"))
            if not files or sub.name in parent.members:
                continue
            namespace = griffe.Module(sub.name, filepath=[sub], parent=parent)
            parent.set_member(sub.name, namespace)
            for file in files:
                module = griffe.visit(file.stem, file, file.read_text(encoding="utf-8"), parent=namespace,
                                      extensions=loader.extensions, docstring_parser=loader.docstring_parser,
                                      docstring_options=loader.docstring_options,
                                      lines_collection=loader.lines_collection,
                                      modules_collection=loader.modules_collection)
                namespace.set_member(file.stem, module)
