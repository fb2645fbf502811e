"""Results of a session: what each suite test measured, kept with its outcome.

Figures are attached to the test item's ``user_properties`` under the key ``llmopt``; pytest-xdist
serializes those with every report, so the controller sees what the workers measured.
"""

from __future__ import annotations

from typing import Any

import pytest

PROPERTY = "llmopt"


def record(node: pytest.Item, **metrics: Any) -> None:
    """Merge ``metrics`` into the item's llmopt property (one dict per test)."""
    for name, value in node.user_properties:
        if name == PROPERTY and isinstance(value, dict):
            value.update(metrics)
            return
    node.user_properties.append((PROPERTY, dict(metrics)))
