"""The error tree: every class maps to one status and a unique stable code."""

from __future__ import annotations

import broker.errors as errors_module
from broker.errors import TaskleaseError, X509SvidRejectedError


def _all_error_classes() -> list[type[TaskleaseError]]:
    return [
        obj
        for obj in vars(errors_module).values()
        if isinstance(obj, type) and issubclass(obj, TaskleaseError)
    ]


def test_every_error_name_ends_in_error_and_codes_are_unique() -> None:
    classes = _all_error_classes()
    assert all(cls.__name__.endswith("Error") for cls in classes)
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))


def test_every_error_class_is_drawn_in_the_module_docstring() -> None:
    doc = errors_module.__doc__ or ""
    assert [cls.__name__ for cls in _all_error_classes() if cls.__name__ not in doc] == []


def test_reason_defaults_to_code_and_can_be_refined() -> None:
    assert TaskleaseError("x").reason == "internal_error"
    refined = X509SvidRejectedError("leaf is a CA", reason="x509.leaf_is_ca")
    assert (refined.status, refined.code, refined.reason, str(refined)) == (
        401,
        "x509_svid_rejected",
        "x509.leaf_is_ca",
        "leaf is a CA",
    )
