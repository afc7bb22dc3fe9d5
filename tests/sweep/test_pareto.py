from sae_lightning.sweep.pareto import dominates, pareto_front

MIN2 = ["minimize", "minimize"]


def test_dominates():
    assert dominates((1, 1), (2, 2), MIN2)
    assert dominates((1, 2), (2, 2), MIN2)
    assert not dominates((2, 2), (2, 2), MIN2)  # equal points do not dominate each other
    assert not dominates((1, 3), (2, 2), MIN2)
    assert dominates((3, 1), (2, 2), ["maximize", "minimize"])


def test_front_with_ties_and_dominated_points():
    pts = [
        (0.30, 8),  # 0 front
        (0.20, 16),  # 1 front
        (0.20, 16),  # 2 tie with 1: both kept
        (0.25, 16),  # 3 dominated by 1
        (0.10, 32),  # 4 front
        (0.10, 40),  # 5 dominated by 4 (same FVU, more L0)
        (0.35, 8),  # 6 dominated by 0 (same L0, worse FVU)
        (0.50, 4),  # 7 front (sparsest)
    ]
    assert pareto_front(pts, MIN2) == [4, 1, 2, 0, 7]


def test_front_of_one_and_of_none():
    assert pareto_front([(1.0, 1.0)], MIN2) == [0]
    assert pareto_front([], MIN2) == []


def test_every_variant_gets_its_own_colour():
    """The fixed colours of the registered variants, then spare ones: never two variants alike
    (matplotlib's cycle gave JumpReLU TopK's blue and Matryoshka MC MC's orange)."""
    import sae_lightning.allocators  # noqa: F401  (registers every allocator)
    from sae_lightning.allocators.base import ALLOCATORS
    from sae_lightning.sweep.report import variant_colours

    names = [*ALLOCATORS, "matryoshka_mutual_choice", "matryoshka_topk", "my_variant", "another"]
    colours = variant_colours(names)
    assert set(colours) == set(names) and len(set(colours.values())) == len(names)
    assert colours["topk"] == "tab:blue" and colours["jumprelu"] != colours["topk"]
