"""Preprocessing helpers (privseg.data.transforms): the whole-volume patch."""

from __future__ import annotations

import pytest
import torch

from privseg.data.transforms import whole_volume_patch
from privseg.errors import ConfigError


def _item(*shape: int) -> dict:
    return {"image": torch.zeros(1, *shape)}


def test_whole_volume_patch_is_the_largest_extent_per_axis():
    assert whole_volume_patch([_item(10, 12, 8), _item(14, 9, 8), _item(3, 3, 11)]) == (14, 12, 11)
    assert whole_volume_patch([_item(5, 7)]) == (5, 7)  # 2D items: a 2D patch


@pytest.mark.parametrize(("items", "match"), [([], "at least one"), ([_item(4, 4), _item(4, 4, 4)], "2, 3D")])
def test_whole_volume_patch_refuses_no_items_or_mixed_dimensions(items, match):
    with pytest.raises(ConfigError, match=match):
        whole_volume_patch(items)
