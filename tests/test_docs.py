"""Every public docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

import stylenorm

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(stylenorm.__path__, prefix="stylenorm.")
    if not name.rsplit(".", 1)[-1].startswith("_")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name: str):
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    globs = {"torch": torch, "nn": nn, "stylenorm": stylenorm, **vars(module)}
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, module_name, globs=globs)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


def test_public_names_documented():
    for name in stylenorm.__all__:
        obj = getattr(stylenorm, name)
        if not callable(obj) and not inspect.ismodule(obj):
            continue  # constants such as CONVENTIONS are documented where they are defined
        assert obj.__doc__ and len(obj.__doc__.strip()) > 40, f"{name} lacks a docstring"


def _public_api() -> list[tuple[str, object]]:
    """Every public function and class of the package, and every public method a stylenorm class
    adds (methods overriding a base class's, such as ``forward``, are documented by the class)."""
    found: dict[int, tuple[str, object]] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith("stylenorm"):
                continue
            found.setdefault(id(obj), (f"{obj.__module__}.{obj.__qualname__}", obj))
            if not inspect.isclass(obj):
                continue
            ours = [c for c in obj.__mro__ if c.__module__.startswith("stylenorm")]
            theirs = [c for c in obj.__mro__ if c not in ours]
            for cls in ours:
                for attr, value in vars(cls).items():
                    if attr.startswith("_") or not inspect.isfunction(value):
                        continue
                    if any(hasattr(base, attr) for base in theirs):
                        continue
                    found.setdefault(
                        id(value), (f"{cls.__module__}.{cls.__qualname__}.{attr}", value)
                    )
    return sorted(found.values(), key=lambda item: item[0])


def test_public_docstrings_have_examples():
    """The standard: every public function and class shows a short example."""
    api = _public_api()
    assert len(api) > 60  # the walk found the package's API
    missing = [name for name, obj in api if "Example" not in (inspect.getdoc(obj) or "")]
    assert missing == []
