"""study.structure: empty rows/columns, the random-mask expectation and max-pooling, against plain loops."""
import itertools

import pytest
import torch

from rosa_peft.study.structure import (STRUCTURE_FORMAT, layer_index, mask_structure, max_pool, module_type,
                                       pick_heatmaps, row_col_stats)


def test_row_col_stats_against_loops():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(12, 20, generator=g) < 0.04
    m[3, :] = False
    m[:, 7] = False
    stats = row_col_stats(m)
    rows = [not any(m[i, j] for j in range(20)) for i in range(12)]
    cols = [not any(m[i, j] for i in range(12)) for j in range(20)]
    d = float(m.double().sum()) / 240
    assert stats["density"] == pytest.approx(d)
    assert stats["empty_rows"] == pytest.approx(sum(rows) / 12) and rows[3]
    assert stats["empty_cols"] == pytest.approx(sum(cols) / 20) and cols[7]
    assert stats["random_empty_rows"] == pytest.approx((1 - d) ** 20)
    assert stats["random_empty_cols"] == pytest.approx((1 - d) ** 12)


def test_random_expectation_matches_random_masks():
    """(1 - d)^n is what uniformly random masks give on average."""
    g = torch.Generator().manual_seed(1)
    got = [row_col_stats(torch.rand(64, 48, generator=g) < 0.03)["empty_rows"] for _ in range(200)]
    assert sum(got) / len(got) == pytest.approx((1 - 0.03) ** 48, abs=0.01)


def test_max_pool_against_loops_with_ragged_edges():
    g = torch.Generator().manual_seed(2)
    m = torch.rand(10, 13, generator=g) < 0.05
    p = 4
    grid = max_pool(m, p)
    assert grid.shape == (3, 4) and grid.dtype == torch.bool
    for bi, bj in itertools.product(range(3), range(4)):
        assert bool(grid[bi, bj]) == bool(m[bi * p:(bi + 1) * p, bj * p:(bj + 1) * p].any())
    with pytest.raises(ValueError, match="pool"):
        max_pool(m, 0)


def test_names_and_heatmap_choice():
    assert layer_index("model.layers.17.mlp.down_proj") == 17 and layer_index("lm_head") is None
    assert module_type("model.layers.2.self_attn.q_proj") == "q_proj"
    names = [f"model.layers.{i}.{m}" for i in range(5) for m in ("self_attn.q_proj", "mlp.down_proj", "mlp.up_proj")]
    assert pick_heatmaps(names) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                    "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj",
                                    "model.layers.4.self_attn.q_proj", "model.layers.4.mlp.down_proj"]


def test_mask_structure_document():
    masks = {f"model.layers.{i}.self_attn.q_proj": torch.zeros(16, 16, dtype=torch.bool) for i in range(2)}
    masks["model.layers.0.self_attn.q_proj"][0, :4] = True  # one row holds everything: 15/16 rows empty
    masks["model.layers.1.self_attn.q_proj"][:, 3] = True  # one full column
    s = mask_structure(masks, pool=8)
    assert s["format"] == STRUCTURE_FORMAT and s["pool"] == 8
    assert s["weights"]["model.layers.0.self_attn.q_proj"]["empty_rows"] == pytest.approx(15 / 16)
    assert s["modules"]["q_proj"]["n"] == 2
    assert s["overall"]["empty_cols"] == pytest.approx((12 / 16 + 15 / 16) / 2)
    assert s["overall"]["density"] == pytest.approx((4 / 256 + 16 / 256) / 2)
    first = s["heatmaps"][0]
    assert first["pooled_shape"] == [2, 2] and first["rows"] == ["10", "00"]
    with pytest.raises(ValueError):
        mask_structure({})
    with pytest.raises(KeyError, match="nope"):
        mask_structure(masks, heatmaps=["nope"])
