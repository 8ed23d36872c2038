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
